//! Redis mode end to end: a real `redis-server` on a free port and three Stagehand nodes
//! (two `serve --redis`, one `worker --redis`) sharing one job.
//!
//! - a 2,000-item job submitted to node 1 is followed over SSE on node 2 to its end, and
//!   resumed with `Last-Event-ID` on node 1;
//! - node 3 is killed with SIGKILL while it holds items: the others reclaim and finish them;
//! - every item has exactly one result, and each `item.finished` is in the log once;
//! - each effect key is accepted once at most, whichever nodes' items emit it;
//! - a cancel sent to node 2 stops work on every node: no LLM request starts 200 ms after it;
//! - an item every node dies on is given up after three reclaims;
//! - dead letters are listed, read, reprocessed and discarded from any node, whichever node
//!   ran the item; automatic reprocessing runs on the one node that holds its lease, and the
//!   lease passes to another node when its holder is killed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use redis::streams::StreamPendingReply;
use serde_json::{Value, json};
use stagehand_tests::cluster::{RedisServer, Worker};
use stagehand_tests::{
    MockLlm, Server, client, eco_items, eco_scan_pipeline, get_json, job_results, job_status,
    read_frames, serve, submit_job, wait_for_job, wait_until,
};

const ITEMS: u64 = 2000;

/// The admin token of the nodes that take admin requests.
const ADMIN: &str = "cluster-admin";

/// What every test here starts from: a `redis-server`, a directory for the nodes' data, and
/// the eco-scan pipeline file in it.
struct Setup {
    redis: RedisServer,
    dir: tempfile::TempDir,
    pipeline: std::path::PathBuf,
    url: String,
}

fn setup() -> Setup {
    setup_with(RedisServer::start().expect("redis-server starts"))
}

fn setup_with(redis: RedisServer) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = eco_scan_pipeline(dir.path(), |text| text);
    let url = redis.url();
    Setup {
        redis,
        dir,
        pipeline,
        url,
    }
}

impl Setup {
    /// `serve` node `name` on this Redis (its data in a directory of that name), its LLM
    /// calls to `mock`, with `extra` flags.
    fn node(&self, name: &str, mock: &MockLlm, extra: &[&str]) -> Server {
        let mut flags = vec!["--redis", self.url.as_str()];
        flags.extend_from_slice(extra);
        serve(
            &self.pipeline,
            &self.dir.path().join(name),
            Some(mock),
            &flags,
        )
    }
}

/// The cluster's effects once none waits or runs, by (handler, key); each asserted to have run
/// once at most: `done`, or `interrupted` (its node died while it ran; not run again).
fn settled_effects(redis: &RedisServer) -> BTreeMap<(String, String), Value> {
    let mut effects = Vec::new();
    wait_until("no effect waits or runs", || {
        effects = stagehand_tests::inspect_redis(&redis.url(), &["effects"]);
        effects
            .iter()
            .all(|e| e["state"] != "pending" && e["state"] != "running")
    });
    effects
        .into_iter()
        .map(|e| {
            assert!(e["state"] == "done" || e["state"] == "interrupted", "{e}");
            assert_eq!(e["runs"], 1, "{e}");
            let slot = (
                e["handler"].as_str().unwrap().to_string(),
                e["key"].as_str().unwrap().to_string(),
            );
            (slot, e)
        })
        .collect()
}

/// The effects `results` say their items' stages had accepted, as (handler, key).
fn accepted_effects(results: &[Value]) -> BTreeSet<(String, String)> {
    results
        .iter()
        .flat_map(|r| r["output"]["reward"]["effects"].as_array().cloned())
        .flatten()
        .filter(|e| e["outcome"] == "accepted")
        .map(|e| {
            (
                e["handler"].as_str().unwrap().to_string(),
                e["key"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Work entries pending per node, from the consumer group.
fn pending_per_node(redis: &RedisServer) -> Vec<(String, usize)> {
    let reply: StreamPendingReply = redis::cmd("XPENDING")
        .arg("sh:work")
        .arg("workers")
        .query(&mut redis.connection())
        .expect("XPENDING answers");
    match reply {
        StreamPendingReply::Data(data) => data
            .consumers
            .into_iter()
            .map(|c| (c.name, c.pending))
            .collect(),
        _ => Vec::new(),
    }
}

/// Wait for cancelled `job` to end: its `job.cancelled` event's counts, which must settle all
/// `total` items.
fn cancelled_counts(node: &Server, job: &str, total: u64) -> Value {
    let end = wait_for_job(node, job);
    assert_eq!(end["state"], "cancelled", "{end}");
    let told = follow(node, job, None);
    let last = told.last().unwrap();
    assert_eq!(last.event, "job.cancelled");
    let counts = last.data.clone();
    assert_eq!(
        counts["succeeded"].as_u64().unwrap()
            + counts["failed"].as_u64().unwrap()
            + counts["not_run"].as_u64().unwrap(),
        total,
        "{counts}"
    );
    counts
}

fn finished(status: &Value) -> u64 {
    status["succeeded"].as_u64().unwrap() + status["failed"].as_u64().unwrap()
}

/// The item indexes in the `job.progress` frames of a stream.
fn indexes(frames: &[stagehand_tests::Frame]) -> Vec<u64> {
    frames
        .iter()
        .filter(|f| f.event == "job.progress")
        .flat_map(|f| f.data["items"].as_array().unwrap().clone())
        .map(|item| item["index"].as_u64().unwrap())
        .collect()
}

fn follow(server: &Server, job: &str, last_event_id: Option<u64>) -> Vec<stagehand_tests::Frame> {
    let mut request = client().get(server.url(&format!("/v1/jobs/{job}/events")));
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id.to_string());
    }
    let response = request.send().expect("the node answers");
    assert_eq!(response.status(), 200);
    read_frames(response, |f| {
        f.event.starts_with("job.") && f.event != "job.progress" && f.event != "job.started"
    })
}

#[test]
fn three_nodes_share_a_job_survive_a_kill_and_cancel_together() {
    let Setup {
        redis,
        dir,
        pipeline,
        url,
    } = setup();
    let mock = MockLlm::start(&["--latency-ms", "100"]);
    let node_flags = ["--slots", "16", "--reclaim-idle-ms", "3000"];
    let serve_flags: Vec<&str> = ["--redis", url.as_str()]
        .into_iter()
        .chain(node_flags)
        .collect();
    let node1 = serve(&pipeline, &dir.path().join("n1"), Some(&mock), &serve_flags);
    let node2 = serve(&pipeline, &dir.path().join("n2"), Some(&mock), &serve_flags);
    let mut node3 = Worker::start(
        &pipeline,
        &dir.path().join("n3"),
        &mock,
        &redis,
        &node_flags,
    )
    .expect("the worker starts");

    // Submitted to node 1, followed on node 2.
    let job = submit_job(&node1, eco_items(ITEMS as usize), json!({}));
    let follower = {
        let (address, job) = (node2.address.clone(), job.clone());
        std::thread::spawn(move || {
            let response = client()
                .get(format!("http://{address}/v1/jobs/{job}/events"))
                .send()
                .expect("node 2 answers");
            read_frames(response, |f| {
                f.event == "job.completed" || f.event == "job.cancelled"
            })
        })
    };

    // Node 3 dies (SIGKILL) while it holds items and the job is under way.
    wait_until("node 3 holds items", || {
        pending_per_node(&redis)
            .iter()
            .any(|(node, pending)| *node == node3.node && *pending > 0)
            && finished(&job_status(&node2, &job)) >= 200
    });
    node3.child().kill().unwrap();
    node3.child().wait().unwrap();
    let at_kill = finished(&job_status(&node2, &job));
    assert!(at_kill < ITEMS, "the job was over before the kill");

    let end = wait_for_job(&node2, &job);
    assert_eq!(end["state"], "completed", "{end}");
    assert_eq!(end["succeeded"], ITEMS, "{end}");

    // Node 2's stream told every item once, and ended with the job.
    let frames = follower.join().unwrap();
    let last = frames.last().unwrap();
    assert_eq!(last.event, "job.completed");
    assert_eq!(
        (
            &last.data["succeeded"],
            &last.data["failed"],
            &last.data["total"]
        ),
        (&json!(ITEMS), &json!(0), &json!(ITEMS)),
        "{}",
        last.data
    );
    let progress = frames.iter().rev().find(|f| f.event == "job.progress");
    assert_eq!(
        progress.unwrap().data["completed"],
        ITEMS,
        "counts of item events"
    );
    let told = indexes(&frames);
    assert_eq!(told.len() as u64, ITEMS, "each item.finished once");
    assert_eq!(
        told.iter().copied().collect::<BTreeSet<_>>().len() as u64,
        ITEMS
    );

    // Resuming on node 1 from the middle of node 2's stream gives exactly the rest.
    let middle = frames
        .iter()
        .filter(|f| f.event == "job.progress")
        .nth(frames.len() / 4)
        .unwrap();
    let resumed = follow(&node1, &job, middle.id);
    let before: usize = frames
        .iter()
        .take_while(|f| f.id != middle.id)
        .chain(std::iter::once(middle))
        .filter(|f| f.event == "job.progress")
        .map(|f| f.data["items"].as_array().unwrap().len())
        .sum();
    assert_eq!(indexes(&resumed).len() + before, ITEMS as usize);
    assert!(resumed[0].id > middle.id);

    // Exactly one result per item, read from node 1; and each effect key (user, character)
    // (per handler) accepted once at most, though items emitting it ran on three nodes.
    let mut seen = BTreeSet::new();
    let mut accepted = std::collections::BTreeMap::<String, u32>::new();
    let mut after: Option<u64> = None;
    loop {
        let query = after.map_or(String::new(), |a| format!("&after={a}"));
        let page: Value = client()
            .get(node1.url(&format!("/v1/jobs/{job}/results?limit=500{query}")))
            .send()
            .unwrap()
            .json()
            .unwrap();
        for result in page["results"].as_array().unwrap() {
            assert_eq!(result["status"], "succeeded", "{result}");
            assert!(
                seen.insert(result["index"].as_u64().unwrap()),
                "a second result"
            );
            for effect in result["output"]["reward"]["effects"].as_array().unwrap() {
                if effect["outcome"] == "accepted" {
                    let key = format!("{}/{}", effect["handler"], effect["key"]);
                    *accepted.entry(key).or_default() += 1;
                }
            }
        }
        match page["next_after"].as_u64() {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, (0..ITEMS).collect::<BTreeSet<_>>());
    assert!(!accepted.is_empty(), "no effect was accepted");
    assert!(
        accepted.values().all(|&n| n == 1),
        "an effect key accepted on two nodes: {accepted:?}"
    );
    // Every accepted effect is in the cluster's queue, though node 3 died holding some (those
    // it was running end interrupted), and each ran once at most.
    let effects = settled_effects(&redis);
    let recorded: BTreeSet<String> = effects
        .keys()
        .map(|(handler, key)| format!("\"{handler}\"/\"{key}\""))
        .collect();
    assert_eq!(recorded, accepted.keys().cloned().collect());

    // Node 3's items were reclaimed by the others, and nothing is left in the queue.
    let metrics = |node: &Server| -> String {
        client()
            .get(node.url("/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap()
    };
    let reclaimed: f64 = [&node1, &node2]
        .iter()
        .flat_map(|node| {
            metrics(node)
                .lines()
                .filter_map(|l| l.strip_prefix("stagehand_items_reclaimed_total "))
                .map(|v| v.trim().parse::<f64>().unwrap())
                .collect::<Vec<_>>()
        })
        .sum();
    assert!(reclaimed >= 1.0, "no node reclaimed node 3's work");
    assert!(pending_per_node(&redis).iter().all(|(_, p)| *p == 0));

    // A new node joins; a second job runs on all three; a cancel on node 2 stops them all.
    let node3 = Worker::start(
        &pipeline,
        &dir.path().join("n3b"),
        &mock,
        &redis,
        &node_flags,
    )
    .expect("the worker starts");
    let job = submit_job(&node1, eco_items(3000), json!({}));
    wait_until("all three nodes run items", || {
        let busy: Vec<String> = pending_per_node(&redis)
            .into_iter()
            .filter(|(_, pending)| *pending > 0)
            .map(|(node, _)| node)
            .collect();
        busy.len() == 3 && busy.contains(&node3.node)
    });
    let answer = client()
        .post(node2.url(&format!("/v1/jobs/{job}/cancel")))
        .send()
        .unwrap();
    assert_eq!(answer.status(), 202);
    std::thread::sleep(Duration::from_millis(200));
    let requests_then = mock.stats()["requests"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let requests_later = mock.stats()["requests"].as_u64().unwrap();
    assert_eq!(
        requests_then, requests_later,
        "LLM requests started more than 200 ms after the cancel"
    );
    let counts = cancelled_counts(&node1, &job, 3000);
    assert!(counts["not_run"].as_u64().unwrap() > 0, "{counts}");
}

/// The API of Redis mode, on two nodes: idempotent submission across nodes, counts and errors
/// of failed items, replay and resume of a finished job's log, cancel of an ended job, a scan's
/// stage events, and dead letters from any node.
#[test]
fn any_node_answers_for_any_job() {
    let Setup {
        redis,
        dir,
        pipeline,
        url,
    } = setup();
    let mock = MockLlm::start(&[]);
    let flags = [
        "--redis",
        url.as_str(),
        "--slots",
        "8",
        "--admin-token",
        ADMIN,
    ];
    let timer = ["--reprocess-every-secs", "1"];
    let flags: Vec<&str> = flags.iter().chain(&timer).copied().collect();
    let node1 = serve(&pipeline, &dir.path().join("n1"), Some(&mock), &flags);
    let node2 = serve(&pipeline, &dir.path().join("n2"), Some(&mock), &flags);

    // The same key on either node names one job; another body with it is a conflict.
    let mut items = eco_items(20);
    items.push(json!({ "user_id": "u1", "image_url": "https://images.example/alien_thing.jpg" }));
    let body = json!({ "items": items });
    let send = |node: &Server, body: &Value| {
        client()
            .post(node.url("/v1/jobs"))
            .header("Idempotency-Key", "batch-7")
            .json(body)
            .send()
            .unwrap()
    };
    let first = send(&node1, &body);
    assert_eq!(first.status(), 202);
    let job = first.json::<Value>().unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let again = send(&node2, &body);
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().unwrap()["job_id"], job.as_str());
    assert_eq!(
        send(&node2, &json!({ "items": [{"user_id": "u2"}] })).status(),
        409
    );

    // Counts, and the failed item's error, whichever node ran it.
    let end = wait_for_job(&node2, &job);
    assert_eq!(end["state"], "completed", "{end}");
    assert_eq!(
        (end["succeeded"].as_u64(), end["failed"].as_u64()),
        (Some(20), Some(1))
    );
    let page: Value = client()
        .get(node1.url(&format!("/v1/jobs/{job}/results?after=19")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let failed = &page["results"][0];
    assert_eq!(failed["index"], 20);
    // Offset paging reads the same results from Redis as `after` does.
    let by_page: Value = client()
        .get(node2.url(&format!("/v1/jobs/{job}/results?page=3&page_size=10")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(by_page["page"], 3, "{by_page}");
    assert_eq!(by_page["results"].as_array().unwrap().len(), 1, "{by_page}");
    assert_eq!(by_page["results"][0], *failed);
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown category"),
        "{failed}"
    );

    // A finished job's log replays on any node and ends; resuming after its end ends at once.
    let frames = follow(&node2, &job, None);
    assert_eq!(frames[0].event, "job.started");
    let last = frames.last().unwrap();
    assert_eq!(last.event, "job.completed");
    assert_eq!(indexes(&frames).len(), 21);
    assert!(follow(&node1, &job, last.id).is_empty());
    let first_end = last.id;

    // Cancelling an ended job says how it ended; an unknown job is 404 on every node.
    let cancel = client()
        .post(node1.url(&format!("/v1/jobs/{job}/cancel")))
        .send()
        .unwrap();
    assert_eq!(cancel.status(), 200);
    assert_eq!(cancel.json::<Value>().unwrap()["state"], "completed");
    let unknown = uuid::Uuid::now_v7();
    for node in [&node1, &node2] {
        let status = client()
            .get(node.url(&format!("/v1/jobs/{unknown}")))
            .send()
            .unwrap()
            .status();
        assert_eq!(status, 404);
    }

    // A scan (one item) gets its stage events, in order, before its end.
    let scan: Value = client()
        .post(node2.url("/v1/scans"))
        .json(&eco_items(1)[0])
        .send()
        .unwrap()
        .json()
        .unwrap();
    let frames = follow(&node1, scan["task_id"].as_str().unwrap(), None);
    let stages: Vec<(String, String)> = frames
        .iter()
        .filter(|f| f.event == "item.stage")
        .map(|f| {
            let stage = f.data["stage"].as_str().unwrap().to_string();
            (stage, f.data["status"].as_str().unwrap().to_string())
        })
        .collect();
    let expected: Vec<(String, String)> = ["vision", "rule", "answer", "reward"]
        .into_iter()
        .flat_map(|s| [(s.into(), "running".into()), (s.into(), "succeeded".into())])
        .collect();
    assert_eq!(stages, expected);
    assert_eq!(frames.last().unwrap().event, "job.completed");

    // The job list is the same on both nodes, newest first.
    let list = |node: &Server| -> Vec<Value> {
        let body: Value = client()
            .get(node.url("/v1/jobs"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        body["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].clone())
            .collect()
    };
    assert_eq!(list(&node1), vec![scan["task_id"].clone(), json!(job)]);
    assert_eq!(list(&node1), list(&node2));

    // Time per stage, summed over the results in Redis.
    let times: Value = client()
        .get(node2.url(&format!("/v1/jobs/{job}/stages")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(times["items"], 21, "{times}");
    let vision = &times["stages"][0];
    assert_eq!(
        (vision["stage"].as_str(), vision["runs"].as_u64()),
        (Some("vision"), Some(21))
    );

    // The failed item is a dead letter, the same on both nodes, whichever ran it.
    let letters = |node: &Server| -> Value {
        get_json(node, &format!("/v1/dead-letters?job={job}"))["dead_letters"].clone()
    };
    let on_node1 = letters(&node1);
    assert_eq!(on_node1.as_array().unwrap().len(), 1, "{on_node1}");
    assert_eq!(on_node1[0]["index"], 20);
    assert_eq!(on_node1[0]["stage"], "rule");
    assert_eq!(on_node1, letters(&node2));
    // Read back with its failed stage's input: the item and the outputs before the stage.
    let letter = get_json(&node2, &format!("/v1/dead-letters/{job}/20"));
    assert_eq!(letter["input"]["item"], items[20], "{letter}");
    assert!(letter["input"]["stages"]["vision"].is_object(), "{letter}");

    // Reprocessed from node 2: any node runs it, it fails again (the category stays unknown)
    // and the job ends again with the same counts; the letter counts the round.
    let started = client()
        .post(node2.url(&format!("/v1/jobs/{job}/reprocess")))
        .bearer_auth(ADMIN)
        .send()
        .unwrap();
    assert_eq!(started.status(), 202);
    assert_eq!(started.json::<Value>().unwrap()["reprocessing"], 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while letters(&node1)[0]["reprocessed"] != 1 {
        assert!(
            Instant::now() < deadline,
            "not reprocessed: {}",
            letters(&node1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let end = wait_for_job(&node1, &job);
    assert_eq!(
        (
            end["state"].as_str(),
            end["succeeded"].as_u64(),
            end["failed"].as_u64()
        ),
        (Some("completed"), Some(20), Some(1)),
        "{end}"
    );
    // The log goes on after the first end: the item again, then a second end.
    let again = follow(&node2, &job, first_end);
    assert_eq!(indexes(&again), [20]);
    assert_eq!(again.last().unwrap().event, "job.completed");
    // Discarded on node 1: gone on node 2.
    let discard = client()
        .delete(node1.url(&format!("/v1/dead-letters/{job}/20")))
        .bearer_auth(ADMIN)
        .send()
        .unwrap();
    assert_eq!(discard.status(), 204);
    assert_eq!(letters(&node2), json!([]));

    // Both nodes run the reprocessing timer; one holds its lease. Killed, it hands over.
    let lease_holder = || -> Option<u32> {
        let holder: Option<String> = redis::cmd("GET")
            .arg("sh:lease:reprocess")
            .query(&mut redis.connection())
            .unwrap();
        holder.and_then(|h| h.split('-').next()?.parse().ok())
    };
    // (Between an expiry and the next round nobody holds it: a loaded machine can starve a
    // round past the lease's three.)
    let mut holder = None;
    wait_until("a node holds the reprocessing lease", || {
        holder = lease_holder();
        holder.is_some()
    });
    let holder = holder.unwrap();
    let mut nodes = vec![node1, node2];
    let position = nodes.iter().position(|node| node.pid() == holder);
    let position = position.unwrap_or_else(|| panic!("{holder} is not a node's pid"));
    let killed = nodes.remove(position).pid();
    // Dropped: killed with SIGKILL, its lease left to expire.
    let survivor = nodes[0].pid();
    let deadline = Instant::now() + Duration::from_secs(10);
    while lease_holder() != Some(survivor) {
        assert!(
            Instant::now() < deadline,
            "the lease stayed with the killed node {killed}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_item_whose_nodes_keep_dying_is_abandoned() {
    let Setup {
        redis,
        dir,
        pipeline,
        url,
    } = setup();
    // The item's LLM call never answers while a node holds it.
    let mock = MockLlm::start(&["--latency-ms", "60000"]);
    let reclaim = ["--reclaim-idle-ms", "300"];
    let api_flags: Vec<&str> = ["--redis", url.as_str(), "--slots", "0"]
        .into_iter()
        .chain(reclaim)
        .collect();
    let api = serve(&pipeline, &dir.path().join("api"), Some(&mock), &api_flags);
    let job = submit_job(&api, eco_items(1), json!({}));
    // No node runs items yet: the API node's gauge counts the cluster's queue.
    let unfinished = |node: &Server| stagehand_tests::metric(node, "stagehand_items_unfinished");
    assert_eq!(unfinished(&api), Some(1.0));
    // The first run, then three reclaims: each node dies holding the item.
    for _ in 0..4 {
        let mut worker = Worker::start(&pipeline, &dir.path().join("w"), &mock, &redis, &reclaim)
            .expect("the worker starts");
        wait_until("the worker holds the item", || {
            pending_per_node(&redis)
                .iter()
                .any(|(node, pending)| *node == worker.node && *pending > 0)
        });
        worker.child().kill().unwrap();
        worker.child().wait().unwrap();
        assert_eq!(job_status(&api, &job)["state"], "running");
    }
    let _last = Worker::start(&pipeline, &dir.path().join("w"), &mock, &redis, &reclaim)
        .expect("the worker starts");
    let end = wait_for_job(&api, &job);
    assert_eq!(end["state"], "completed", "{end}");
    assert_eq!(end["failed"], 1, "{end}");
    assert_eq!(unfinished(&api), Some(0.0));
    let page: Value = client()
        .get(api.url(&format!("/v1/jobs/{job}/results")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let error = &page["results"][0]["error"];
    assert_eq!(error["kind"], "abandoned", "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("after 4 runs"),
        "{error}"
    );
    // The API node never read work.
    let consumers: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg("sh:work")
        .arg("workers")
        .query(&mut redis.connection())
        .unwrap();
    assert_eq!(
        consumers.len(),
        5,
        "one consumer per worker, none for the API node"
    );
}

/// The current and canary digests of `stage` as `node` serves them.
fn stage_versions(node: &Server, stage: &str) -> (String, Option<String>) {
    let stage = stagehand_tests::stage_entry(node, stage);
    (
        stage["current"]["digest"].as_str().unwrap().to_string(),
        stage["canary"]["digest"].as_str().map(str::to_string),
    )
}

/// A hot swap, a canary and a rollback sent to one node are served by every node: nodes that
/// follow (two API nodes and a worker that never saw the component's bytes) and a node that
/// starts after them.
#[test]
fn a_stage_change_on_one_node_is_served_by_every_node() {
    let Setup {
        redis,
        dir,
        pipeline,
        url,
    } = setup();
    let mock = MockLlm::start(&[]);
    let flags = [
        "--redis",
        url.as_str(),
        "--slots",
        "0",
        "--admin-token",
        ADMIN,
    ];
    let node1 = serve(&pipeline, &dir.path().join("n1"), Some(&mock), &flags);
    let node2 = serve(&pipeline, &dir.path().join("n2"), Some(&mock), &flags);
    let _worker = Worker::start(&pipeline, &dir.path().join("w"), &mock, &redis, &[])
        .expect("the worker starts");
    let (old, _) = stage_versions(&node2, "answer");
    let changed = |node: &Server, what: &str, expected: &(String, Option<String>)| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while stage_versions(node, "answer") != *expected {
            assert!(
                Instant::now() < deadline,
                "{what} did not reach {}",
                node.url("")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    let install = |node: &Server, query: &str, tag: &str| -> String {
        let wasm =
            stagehand_tests::with_custom_section(stagehand_tests::plugin_bytes("answer"), tag);
        let response = client()
            .put(node.url(&format!("/v1/stages/answer{query}")))
            .bearer_auth(ADMIN)
            .body(wasm)
            .send()
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().unwrap();
        let digest = &body["canary"]["digest"];
        let digest = if digest.is_null() {
            &body["current"]["digest"]
        } else {
            digest
        };
        digest.as_str().unwrap().to_string()
    };

    // Every node says in Redis up to which change it serves: the way to know the worker does.
    let every_node_serves_the_last_change = |nodes: usize| -> bool {
        let mut conn = redis.connection();
        let last: u64 = redis::cmd("GET")
            .arg("sh:changes:n")
            .query(&mut conn)
            .unwrap();
        let applied: std::collections::HashMap<String, u64> = redis::cmd("HGETALL")
            .arg("sh:changes:applied")
            .query(&mut conn)
            .unwrap();
        applied.len() == nodes && applied.values().all(|n| *n >= last)
    };
    let wait_for_every_node = |nodes: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !every_node_serves_the_last_change(nodes) {
            assert!(
                Instant::now() < deadline,
                "a node does not serve the last change"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    // A swap on node 1: node 2 serves it, and the worker runs items on it.
    let new = install(&node1, "", "v2");
    assert_ne!(new, old);
    changed(&node2, "the swap", &(new.clone(), None));
    wait_for_every_node(3);
    let job = submit_job(&node2, eco_items(4), json!({}));
    assert_eq!(wait_for_job(&node2, &job)["succeeded"], 4);
    for result in job_results(&node1, &job) {
        assert_eq!(
            stagehand_tests::stage_run(&result, "answer")["digest"],
            new.as_str(),
            "{result}"
        );
    }

    // A canary on node 2 reaches node 1; its rollback on node 1 reaches node 2.
    let trial = install(&node2, "?canary=50", "trial");
    changed(&node1, "the canary", &(new.clone(), Some(trial)));
    let rollback = client()
        .post(node1.url("/v1/stages/answer/rollback"))
        .bearer_auth(ADMIN)
        .send()
        .unwrap();
    assert_eq!(rollback.status(), 200);
    changed(&node2, "the rollback", &(new.clone(), None));

    // A node that starts now serves the cluster's version from its first request.
    let late = serve(&pipeline, &dir.path().join("n3"), Some(&mock), &flags);
    assert_eq!(stage_versions(&late, "answer"), (new, None));
}

/// A client of an API node that runs no items follows the live tokens of an answer streamed
/// on a worker node.
#[test]
fn live_tokens_reach_a_follower_on_another_node() {
    let Setup {
        redis,
        dir,
        pipeline,
        url,
    } = setup();
    // Vision is slow enough for the worker to learn of the follower before `answer` streams.
    let mock = MockLlm::start(&["--vision-latency-ms", "2000", "--token-delay-ms", "5"]);
    let api = serve(
        &pipeline,
        &dir.path().join("api"),
        Some(&mock),
        &["--redis", url.as_str(), "--slots", "0"],
    );
    let _worker = Worker::start(&pipeline, &dir.path().join("w"), &mock, &redis, &[])
        .expect("the worker starts");
    let task = stagehand_tests::submit_scan(
        &api,
        json!({ "user_id": "u1", "image_url": "https://images.example/battery_1.jpg" }),
    );
    let response = client()
        .get(api.url(&format!("/v1/jobs/{task}/events?tokens=true")))
        .send()
        .unwrap();
    let frames = read_frames(response, |_| false);
    let tokens: Vec<_> = frames.iter().filter(|f| f.event == "item.token").collect();
    assert!(tokens.len() > 5, "{} tokens", tokens.len());
    assert!(tokens.iter().all(|t| t.data["stage"] == "answer"));
    let text: String = tokens
        .iter()
        .map(|t| t.data["text"].as_str().unwrap())
        .collect();
    let streamed: Value = serde_json::from_str(&text).expect("every token, in order");
    let results = job_results(&api, &task);
    assert_eq!(streamed["answer"], results[0]["output"]["answer"]["answer"]);
    assert_eq!(frames.last().unwrap().event, "job.completed");
}

/// A 100,000-item job: its items are written in chunks and the work stream gets at most the
/// job's window (4,096) of entries at once, refilled as items settle; results page with
/// `?page=` as in embedded mode; a cancel settles the items never queued at once, and the
/// cluster's queue gauge returns to zero.
#[test]
fn a_100000_item_job_reaches_the_work_stream_a_window_at_a_time() {
    let cluster = setup();
    let mock = MockLlm::start(&["--latency-ms", "200"]);
    let node = cluster.node("n1", &mock, &["--slots", "4"]);
    let mut conn = cluster.redis.connection();
    let count = |conn: &mut redis::Connection, command: &str, key: &str| -> u64 {
        redis::cmd(command)
            .arg(key)
            .query::<Option<u64>>(conn)
            .unwrap()
            .unwrap_or(0)
    };

    let job = submit_job(&node, eco_items(100_000), json!({}));
    assert_eq!(job_status(&node, &job)["total"], 100_000);
    let items_key = format!("sh:{{{job}}}:items");
    assert_eq!(count(&mut conn, "HLEN", &items_key), 100_000);
    let ttl: i64 = redis::cmd("TTL").arg(&items_key).query(&mut conn).unwrap();
    assert_eq!(
        ttl, -1,
        "the items no longer expire once the job is written"
    );
    let queued = count(&mut conn, "XLEN", "sh:work");
    assert!(queued <= 4096, "{queued} work entries for one job");
    assert!(count(&mut conn, "GET", "sh:unqueued") >= 100_000 - 4096);

    let page = get_json(&node, &format!("/v1/jobs/{job}/results?page=2&page_size=3"));
    assert_eq!(page["page"], 2, "{page}");

    let cancelled = client()
        .post(node.url(&format!("/v1/jobs/{job}/cancel")))
        .send()
        .unwrap();
    assert_eq!(cancelled.status(), 202);
    cancelled_counts(&node, &job, 100_000);
    assert_eq!(count(&mut conn, "GET", "sh:unqueued"), 0);
    wait_until("the work stream is empty", || {
        count(&mut conn, "XLEN", "sh:work") == 0
    });
    wait_until("the queue gauge is back to zero", || {
        stagehand_tests::metric(&node, "stagehand_items_unfinished") == Some(0.0)
    });
}

/// `redis-server` (append-only file, `appendfsync always`) killed with SIGKILL and restarted
/// mid-job: nothing acknowledged is lost. The nodes reconnect, the job finishes with every item
/// settled once, and its log and results agree.
#[test]
fn a_redis_restart_mid_job_loses_nothing_acknowledged() {
    let mut cluster = setup_with(
        RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
            .expect("redis-server starts"),
    );
    let mock = MockLlm::start(&["--latency-ms", "40"]);
    let nodes: Vec<Server> = ["n1", "n2"]
        .iter()
        .map(|name| cluster.node(name, &mock, &["--slots", "8", "--reclaim-idle-ms", "3000"]))
        .collect();
    let job = submit_job(&nodes[0], eco_items(300), json!({}));
    wait_until("some items are done", || {
        finished(&job_status(&nodes[1], &job)) >= 30
    });

    cluster.redis.kill_and_restart().unwrap();
    // The nodes answer 500 while Redis is down (and a node's first request after it is back
    // may still meet the broken connection, which it then replaces); the job is there once
    // every node reaches Redis again.
    let mut done_after_restart = 0;
    wait_until("Redis is back with the job on every node", || {
        nodes.iter().all(|node| {
            let status = get_json(node, &format!("/v1/jobs/{job}"));
            done_after_restart = if status["state"].is_string() {
                finished(&status)
            } else {
                0
            };
            status["state"].is_string()
        })
    });
    assert!(done_after_restart >= 30, "acknowledged results survive");

    let status = wait_for_job(&nodes[1], &job);
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["succeeded"], 300, "{status}");
    let told = follow(&nodes[0], &job, None);
    assert_eq!(told.last().unwrap().event, "job.completed");
    let finished_events = indexes(&told);
    assert_eq!(
        finished_events.iter().collect::<BTreeSet<_>>().len(),
        300,
        "one item.finished per item"
    );
    assert_eq!(finished_events.len(), 300, "and no more");

    // Every effect a stage was told was accepted is in Redis, and ran once at most. (A claim
    // whose answer the restart cut off may be there too: its stage's retry saw a duplicate.)
    let effects = settled_effects(&cluster.redis);
    let accepted = accepted_effects(&job_results(&nodes[0], &job));
    assert!(!accepted.is_empty());
    let missing: Vec<_> = accepted
        .iter()
        .filter(|slot| !effects.contains_key(*slot))
        .collect();
    assert!(missing.is_empty(), "accepted, then lost: {missing:?}");
}

/// A node cut off from Redis (stopped with SIGSTOP) for longer than the reclaim time: the other
/// node reclaims its items and finishes the job; when it comes back its late runs of those
/// items record no second result, event or effect.
#[test]
fn a_node_cut_off_past_the_reclaim_time_adds_no_second_result_or_effect() {
    let cluster = setup();
    let redis = &cluster.redis;
    let mock = MockLlm::start(&["--latency-ms", "300"]);
    let flags = ["--slots", "8", "--reclaim-idle-ms", "1000"];
    let survivor = cluster.node("survivor", &mock, &flags);
    let victim = cluster.node("victim", &mock, &flags);
    let job = submit_job(&survivor, eco_items(48), json!({}));
    wait_until("both nodes hold items", || {
        pending_per_node(redis)
            .iter()
            .filter(|(_, n)| *n > 0)
            .count()
            == 2
    });
    let signal = |name: &str, pid: u32| {
        let sent = std::process::Command::new("kill")
            .args([name, &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    signal("-STOP", victim.pid());
    let status = wait_for_job(&survivor, &job);
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["succeeded"], 48, "{status}");
    let before = follow(&survivor, &job, None).len();

    // Back: its items, reclaimed long ago, run on to their end here and are refused there.
    signal("-CONT", victim.pid());
    wait_until("the node that came back holds no work", || {
        pending_per_node(redis).iter().all(|(_, n)| *n == 0)
    });
    std::thread::sleep(Duration::from_secs(2));
    let after = job_status(&victim, &job);
    assert_eq!(after["succeeded"], 48, "{after}");
    let told = follow(&victim, &job, None);
    assert_eq!(told.len(), before, "no event after the job ended");
    assert_eq!(indexes(&told).len(), 48, "one item.finished per item");

    // Each accepted (handler, key) ran once at most, on whichever node took it: those the
    // victim was running when it stopped were marked interrupted by the survivor's reclaim,
    // and not run there again.
    let effects = settled_effects(redis);
    assert!(!effects.is_empty(), "eco-scan's reward stage emits effects");
    let accepted = accepted_effects(&job_results(&survivor, &job));
    assert_eq!(effects.keys().cloned().collect::<BTreeSet<_>>(), accepted);
}

/// Redis mode: a stage change computed from versions another node has since replaced (a
/// change this node has not heard of yet) is refused with a 409 and changes nothing, rather
/// than publishing over it; once the node follows, the same change goes through.
#[test]
fn a_stage_change_over_versions_another_node_replaced_is_a_409() {
    let cluster = setup();
    let mock = MockLlm::start(&[]);
    let node = cluster.node("n1", &mock, &["--admin-token", ADMIN]);
    let swap = |tag: &str| {
        let wasm =
            stagehand_tests::with_custom_section(stagehand_tests::plugin_bytes("answer"), tag);
        client()
            .put(node.url("/v1/stages/answer"))
            .bearer_auth(ADMIN)
            .body(wasm)
            .send()
            .unwrap()
    };
    assert_eq!(swap("one").status(), 200);
    let serving = stage_versions(&node, "answer");

    // Another node's change, which this one has not heard of (no counter, no message).
    let mut conn = cluster.redis.connection();
    let field = "versions/eco-scan/answer";
    let record: Vec<u8> = redis::cmd("HGET")
        .arg("sh:changes")
        .arg(field)
        .query(&mut conn)
        .unwrap();
    let mut record: Value = serde_json::from_slice(&record).unwrap();
    record["previous"] = json!([]);
    let () = redis::cmd("HSET")
        .arg("sh:changes")
        .arg(field)
        .arg(record.to_string())
        .query(&mut conn)
        .unwrap();

    let refused = swap("two");
    assert_eq!(refused.status(), 409);
    let body: Value = refused.json().unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("changed on another node"), "{message}");
    assert_eq!(stage_versions(&node, "answer"), serving, "nothing changed");

    // Told of the change, the node follows it; the same change now goes through.
    let n: u64 = redis::cmd("INCR")
        .arg("sh:changes:n")
        .query(&mut conn)
        .unwrap();
    wait_until("the node follows the change", || {
        let applied: Vec<u64> = redis::cmd("HVALS")
            .arg("sh:changes:applied")
            .query(&mut conn)
            .unwrap();
        applied.iter().all(|a| *a >= n)
    });
    assert_eq!(swap("two").status(), 200);
}
