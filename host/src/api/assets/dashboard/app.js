// The Stagehand dashboard: one page, no dependencies, talks to the same API as every client.
// Views by URL hash: #/ (jobs), #/jobs/ID (one job, live), #/dead-letters[?job=ID], #/stages.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);

// An element with attributes and children; text goes in as text, never as HTML.
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

// --- Token: kept in localStorage, sent as a bearer header; also a cookie, because EventSource
// cannot send headers (the server accepts the cookie for reads only).
const TOKEN_KEY = "stagehand_token";
const token = () => localStorage.getItem(TOKEN_KEY) || "";
function useToken(value) {
  localStorage.setItem(TOKEN_KEY, value);
  document.cookie = `${TOKEN_KEY}=${value}; path=/; SameSite=Strict`;
}

async function api(method, path, body, contentType) {
  const headers = {};
  if (token()) headers.Authorization = `Bearer ${token()}`;
  if (body !== undefined) headers["Content-Type"] = contentType || "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined || contentType ? body : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (!response.ok) {
    const message = (data && data.error && data.error.message) || text || response.statusText;
    throw new Error(`${response.status}: ${message}`);
  }
  return data;
}

function say(message, ok = false) {
  const banner = $("#banner");
  banner.textContent = message;
  banner.className = ok ? "ok" : "";
  banner.hidden = !message;
}

// What the current view must stop (timers, streams) when the view changes.
let cleanups = [];
function onLeave(fn) { cleanups.push(fn); }
function every(ms, fn) { const t = setInterval(fn, ms); onLeave(() => clearInterval(t)); }

function route() {
  for (const fn of cleanups) fn();
  cleanups = [];
  say("");
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query || "");
  const view = $("#view");
  view.replaceChildren();
  for (const a of document.querySelectorAll("header nav a")) a.classList.remove("active");
  let match;
  if ((match = path.match(/^\/jobs\/([0-9a-f-]+)$/))) {
    $("#nav-jobs").classList.add("active");
    jobView(view, match[1]);
  } else if (path === "/dead-letters") {
    $("#nav-dead-letters").classList.add("active");
    deadLettersView(view, params.get("job"));
  } else if (path === "/pipelines" || path === "/stages") {
    $("#nav-pipelines").classList.add("active");
    pipelinesView(view);
  } else {
    $("#nav-jobs").classList.add("active");
    jobsView(view);
  }
}

const when = (ms) => (ms ? new Date(ms).toLocaleString() : "");
const stateSpan = (state, id) => h("span", { class: `state-${state}`, id }, state);
const done = (job) => job.succeeded + job.failed;

// --- Jobs: newest first, refreshed every 2 s; by state and pipeline.
function jobsView(view) {
  const filter = h("select", { id: "state-filter", onchange: () => { cursors = [null]; load(); } },
    ["", "running", "completed", "cancelled", "failed"].map((s) => h("option", { value: s }, s || "any state")));
  const pipelineFilter = h("select", { id: "pipeline-filter", onchange: () => { cursors = [null]; load(); } },
    h("option", { value: "" }, "any pipeline"));
  api("GET", "/v1/pipelines").then(({ pipelines }) => {
    pipelineFilter.append(...pipelines.map((p) => h("option", { value: p.name }, p.name)));
  }, (error) => say(error.message));
  const body = h("tbody");
  const older = h("button", { id: "jobs-older", onclick: () => { cursors.push(next); load(); } }, "Older");
  const newer = h("button", { id: "jobs-newer", onclick: () => { cursors.pop(); load(); } }, "Newer");
  view.append(
    h("h1", {}, "Jobs"),
    h("p", {}, filter, " ", pipelineFilter),
    h("table", { id: "jobs" },
      h("thead", {}, h("tr", {}, h("th", {}, "job"), h("th", {}, "pipeline"), h("th", {}, "state"), h("th", {}, "progress"),
        h("th", { class: "num" }, "done / total"), h("th", { class: "num" }, "failed"), h("th", {}, "created"))),
      body),
    h("div", { class: "pager" }, newer, older));
  let cursors = [null];
  let next = null;
  async function load() {
    const before = cursors[cursors.length - 1];
    const query = new URLSearchParams({ limit: "25" });
    if (filter.value) query.set("state", filter.value);
    if (pipelineFilter.value) query.set("pipeline", pipelineFilter.value);
    if (before) query.set("before", before);
    try {
      const page = await api("GET", `/v1/jobs?${query}`);
      next = page.next_before;
      older.disabled = !next;
      newer.disabled = cursors.length === 1;
      body.replaceChildren(...page.jobs.map((job) => h("tr", {
        class: "clickable", dataset: { job: job.id }, onclick: () => { location.hash = `#/jobs/${job.id}`; },
      },
        h("td", {}, h("code", {}, job.id)),
        h("td", { class: "pipeline" }, job.pipeline),
        h("td", {}, stateSpan(job.state)),
        h("td", {}, h("progress", { max: job.total || 1, value: done(job) })),
        h("td", { class: "num" }, `${done(job)} / ${job.total}`),
        h("td", { class: "num" }, job.failed),
        h("td", {}, when(job.created_at)))));
      if (page.jobs.length === 0) body.append(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "no jobs")));
    } catch (error) { say(error.message); }
  }
  load();
  every(2000, load);
}

// --- One job: live progress over SSE, time per stage, paged results, cancel.
const COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f"];
const PAGE_SIZE = 20;

function jobView(view, id) {
  const stateEl = stateSpan("…", "job-state");
  const counts = h("span", { id: "job-counts" }, "");
  const tokens = h("span", { id: "job-tokens" }, "");
  const failure = h("p", { id: "job-error", class: "status-failed" });
  const bar = h("progress", { id: "job-progress", max: 100, value: 0 });
  const cancel = h("button", { id: "cancel", class: "danger", onclick: cancelJob }, "Cancel");
  const stageBar = h("div", { class: "bar", id: "stage-bar" });
  const stageRows = h("tbody");
  const resultRows = h("tbody");
  const prev = h("button", { id: "results-prev", onclick: () => { cursors.pop(); loadResults(); } }, "Previous");
  const next = h("button", { id: "results-next", onclick: () => { cursors.push(nextAfter); loadResults(); } }, "Next");
  const pageLabel = h("span", { id: "results-page", class: "muted" });
  view.append(
    h("h1", {}, "Job ", h("code", {}, id)),
    h("p", {}, "State: ", stateEl, " · ", counts, " · ", tokens, " · ",
      h("a", { href: `#/dead-letters?job=${id}` }, "dead letters"), " ", cancel),
    failure,
    bar,
    h("h2", {}, "Time per stage"),
    stageBar,
    h("table", { id: "stage-times" },
      h("thead", {}, h("tr", {}, h("th", {}, "stage"), h("th", { class: "num" }, "runs"),
        h("th", { class: "num" }, "mean"), h("th", { class: "num" }, "total"), h("th", { class: "num" }, "share"))),
      stageRows),
    h("h2", {}, "Results"),
    h("table", { id: "results" },
      h("thead", {}, h("tr", {}, h("th", { class: "num" }, "#"), h("th", {}, "status"),
        h("th", {}, "stages (ms)"), h("th", {}, "output or error"))),
      resultRows),
    h("div", { class: "pager" }, prev, pageLabel, next));

  let cursors = [null];
  let nextAfter = null;
  let running = true;

  function show(state, succeeded, failed, total) {
    stateEl.textContent = state;
    stateEl.className = `state-${state}`;
    running = state === "running";
    cancel.disabled = !running;
    counts.textContent = `${succeeded + failed} / ${total} (${failed} failed)`;
    bar.value = total ? ((succeeded + failed) * 100) / total : 100;
  }

  async function cancelJob() {
    try {
      const answer = await api("POST", `/v1/jobs/${id}/cancel`);
      say(`job ${answer.state}`, true);
    } catch (error) { say(error.message); }
  }

  async function loadStages() {
    try {
      const times = await api("GET", `/v1/jobs/${id}/stages`);
      stageBar.replaceChildren(...times.stages.map((s, i) => h("span", {
        title: `${s.stage} ${(s.share * 100).toFixed(1)} %`,
        style: `width: ${s.share * 100}%; background: ${COLORS[i % COLORS.length]}`,
      })));
      stageRows.replaceChildren(...times.stages.map((s, i) => h("tr", { dataset: { stage: s.stage } },
        h("td", {}, h("span", { class: "swatch", style: `background: ${COLORS[i % COLORS.length]}` }), s.stage),
        h("td", { class: "num" }, s.runs),
        h("td", { class: "num" }, `${s.mean_ms.toFixed(0)} ms`),
        h("td", { class: "num" }, `${(s.total_ms / 1000).toFixed(1)} s`),
        h("td", { class: "num share" }, `${(s.share * 100).toFixed(1)} %`))));
    } catch (error) { say(error.message); }
  }

  async function loadResults() {
    const after = cursors[cursors.length - 1];
    const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (after !== null) query.set("after", after);
    try {
      const page = await api("GET", `/v1/jobs/${id}/results?${query}`);
      nextAfter = page.next_after;
      next.disabled = nextAfter === null || nextAfter === undefined;
      prev.disabled = cursors.length === 1;
      pageLabel.textContent = `page ${cursors.length}`;
      resultRows.replaceChildren(...page.results.map((r) => h("tr", { dataset: { index: r.index } },
        h("td", { class: "num" }, r.index),
        h("td", { class: `status-${r.status}` }, r.status),
        h("td", { class: "mono" }, r.stages.map((s) => `${s.stage} ${s.duration_ms.toFixed(0)}`).join(" · ")),
        h("td", { class: "mono preview" },
          r.error ? `${r.error.stage}: ${r.error.kind}: ${r.error.message}` : JSON.stringify(r.output)))));
      if (page.results.length === 0) {
        resultRows.append(h("tr", {}, h("td", { colspan: 4, class: "muted" }, "no results yet")));
      }
    } catch (error) { say(error.message); }
  }

  // The job's LLM tokens so far, against its budget if it has one; why it failed, if it did.
  function showUsage(job) {
    tokens.textContent = `${job.llm_tokens} LLM tokens` + (job.max_tokens ? ` of ${job.max_tokens}` : "");
    failure.textContent = job.error || "";
  }

  api("GET", `/v1/jobs/${id}`).then((job) => {
    show(job.state, job.succeeded, job.failed, job.total);
    showUsage(job);
    follow();
  }, (error) => say(error.message));
  loadStages();
  loadResults();
  // While it runs, the tables catch up every few seconds; the bar moves with every event.
  every(3000, () => { if (running) { loadStages(); if (cursors.length === 1) loadResults(); } });

  function follow() {
    const events = new EventSource(`/v1/jobs/${id}/events?interval_ms=300`);
    onLeave(() => events.close());
    let total = 0;
    events.addEventListener("job.started", (e) => { total = JSON.parse(e.data).total; });
    events.addEventListener("job.progress", (e) => {
      const d = JSON.parse(e.data);
      show("running", d.completed, d.failed, d.total);
    });
    for (const end of ["job.completed", "job.cancelled", "job.failed"]) {
      events.addEventListener(end, (e) => {
        const d = JSON.parse(e.data);
        events.close();
        show(end.slice(4), d.succeeded || 0, d.failed || 0, d.total || total);
        api("GET", `/v1/jobs/${id}`).then(showUsage, (error) => say(error.message));
        loadStages();
        loadResults();
      });
    }
  }
}

// --- Dead letters: reprocess or discard (admin token).
function deadLettersView(view, job) {
  const body = h("tbody");
  view.append(
    h("h1", {}, "Dead letters", job ? h("span", { class: "muted" }, " of job ", h("code", {}, job)) : ""),
    h("table", { id: "dead-letters" },
      h("thead", {}, h("tr", {}, h("th", {}, "job / item"), h("th", {}, "stage"), h("th", {}, "error"),
        h("th", { class: "num" }, "tries"), h("th", { class: "num" }, "reprocessed"), h("th", {}, ""))),
      body));
  async function act(letter, method, path, done) {
    try {
      await api(method, path);
      say(done, true);
      setTimeout(load, 500);
    } catch (error) { say(error.message); }
  }
  async function load() {
    const query = new URLSearchParams({ limit: "100" });
    if (job) query.set("job", job);
    try {
      const page = await api("GET", `/v1/dead-letters?${query}`);
      body.replaceChildren(...page.dead_letters.map((l) => {
        const key = `${l.job_id}/${l.index}`;
        return h("tr", { dataset: { key } },
          h("td", {}, h("a", { href: `#/jobs/${l.job_id}` }, h("code", {}, key))),
          h("td", {}, l.stage),
          h("td", { class: "preview" }, `${l.error.kind}: ${l.error.message}`),
          h("td", { class: "num" }, (l.error.attempts || []).length),
          h("td", { class: "num reprocessed" }, l.reprocessed || 0),
          h("td", {},
            h("button", { class: "reprocess",
              onclick: () => act(l, "POST", `/v1/dead-letters/${key}/reprocess`, `reprocessing ${key}`) }, "Reprocess"),
            " ",
            h("button", { class: "discard danger",
              onclick: () => act(l, "DELETE", `/v1/dead-letters/${key}`, `discarded ${key}`) }, "Discard")));
      }));
      if (page.dead_letters.length === 0) body.append(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "no dead letters")));
    } catch (error) { say(error.message); }
  }
  load();
  every(5000, load);
}

// --- Pipelines: each with its revision, handlers and kv, and its stages' versions: upload (at
// once or as a canary), promote, rollback (admin token).
function pipelinesView(view) {
  const list = h("div", { id: "pipelines" });
  view.append(h("h1", {}, "Pipelines"), list);
  const short = (digest) => digest.slice(0, 12);
  async function change(method, path, body, contentType, done) {
    try {
      const answer = await api(method, path, body, contentType);
      say(done(answer), true);
      load();
    } catch (error) { say(error.message); }
  }
  async function load() {
    try {
      const { pipelines } = await api("GET", "/v1/pipelines");
      list.replaceChildren(...pipelines.map((p) => h("section", { dataset: { pipeline: p.name } },
        h("h2", {}, p.name, " ", h("code", { class: "revision", title: p.revision }, short(p.revision)),
          p.deployed ? h("span", { class: "muted" }, " deployed") : ""),
        h("p", { class: "muted" }, `handlers: ${p.handlers.join(", ") || "none"} · kv: ${p.kv.map((k) => k.name).join(", ") || "none"}`),
        stagesTable(p))));
    } catch (error) { say(error.message); }
  }
  function stagesTable(p) {
    const pipeline = `pipeline=${encodeURIComponent(p.name)}`;
    return h("table", { class: "stages" },
      h("thead", {}, h("tr", {}, h("th", {}, "stage"), h("th", {}, "current"), h("th", {}, "canary"),
        h("th", { class: "num" }, "earlier"), h("th", {}, "upload a .wasm"), h("th", {}, ""))),
      h("tbody", {}, ...p.stages.map((s) => {
        const file = h("input", { type: "file", class: "upload-file", accept: ".wasm" });
        const percent = h("input", { type: "number", class: "canary-percent", min: 1, max: 99, placeholder: "canary %", style: "width: 6rem" });
        const upload = h("button", { class: "upload", onclick: async () => {
          if (!file.files[0]) { say("choose a .wasm file first"); return; }
          const bytes = await file.files[0].arrayBuffer();
          const query = percent.value ? `?${pipeline}&canary=${percent.value}` : `?${pipeline}`;
          change("PUT", `/v1/stages/${s.name}${query}`, bytes, "application/wasm",
            (a) => (a.canary ? `${s.name}: ${short(a.canary.digest)} on trial for ${a.canary.percent} %`
              : `${s.name}: now ${short(a.current.digest)}`));
        } }, "Upload");
        return h("tr", { dataset: { stage: s.name } },
          h("td", {}, s.name),
          h("td", {}, h("code", { class: "current", title: s.current.digest }, short(s.current.digest))),
          h("td", {}, s.canary ? [h("code", { class: "canary", title: s.canary.digest }, short(s.canary.digest)),
            ` ${s.canary.percent} % `,
            h("button", { class: "promote", onclick: () => change("POST", `/v1/stages/${s.name}/promote?${pipeline}`, undefined, undefined,
              (a) => `${s.name}: canary promoted to ${short(a.current.digest)}`) }, "Promote")] : h("span", { class: "muted" }, "none")),
          h("td", { class: "num" }, s.previous.length),
          h("td", {}, file, percent, upload),
          h("td", {}, h("button", { class: "rollback", disabled: !s.canary && s.previous.length === 0,
            onclick: () => change("POST", `/v1/stages/${s.name}/rollback?${pipeline}`, undefined, undefined,
              (a) => (a.canary_dropped ? `${s.name}: canary dropped` : `${s.name}: back to ${short(a.current.digest)}`)) }, "Roll back")));
      })));
  }
  load();
}

$("#token").value = token();
$("#token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  useToken($("#token").value.trim());
  route();
  say("token saved", true);
});
window.addEventListener("hashchange", route);
route();
