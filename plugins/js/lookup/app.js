// The fact-check example's `lookup` stage in JavaScript (plugins/lookup is the Rust one):
// `fetch` the item's question from the facts service (an allowed host, with its API key as a
// secret the host fills in), then have the pipeline's LLM answer from the facts found.
// Built with `jco componentize` by `cargo xtask plugins` into `lookup_js.wasm`.
//
// Imports are the WIT interfaces of wit/pipeline.wit; a WIT `result` error arrives as a thrown
// error whose `payload` is the variant ({tag, val}), and a stage fails an item by throwing a
// `stage-error` variant: {tag: 'retryable' | 'fatal', val: message}.

import { chat } from 'stagehand:pipeline/llm@0.2.0';
import { get } from 'stagehand:pipeline/config@0.2.0';
import { write } from 'stagehand:pipeline/log@0.2.0';

const fatal = (message) => ({ tag: 'fatal', val: message });
const retryable = (message) => ({ tag: 'retryable', val: message });

/** A setting of the stage (`[stage.config]`), or a fatal error naming it. */
function setting(name) {
  try {
    return get(name);
  } catch (e) {
    throw fatal(`the stage needs the setting \`${name}\``);
  }
}

export async function run(ctx, input) {
  const question = JSON.parse(input).item?.question;
  if (typeof question !== 'string') {
    throw fatal('the item has no `question`');
  }
  const url = `${setting('facts_url')}?q=${encodeURIComponent(question)}`;
  let reply;
  try {
    reply = await fetch(url, { headers: { authorization: 'Bearer {{secret:FACTS_KEY}}' } });
  } catch (e) {
    // A refused destination or a failed connection: the host logs which.
    throw retryable(`outbound request failed: ${e}`);
  }
  if (reply.status !== 200) {
    throw retryable(`the facts service answered ${reply.status}: ${await reply.text()}`);
  }
  const { facts } = await reply.json();
  write('debug', `${facts.length} facts for ${JSON.stringify(question)} (js)`);

  const prompt = setting('prompt')
    .replace('{question}', question)
    .replace('{facts}', facts.map((f) => `- ${f.topic}: ${f.fact}`).join('\n'));
  let answer;
  try {
    answer = chat({
      model: safeGet('model'),
      messages: [{ role: 'user', content: [{ tag: 'text', val: prompt }] }],
      maxTokens: 200,
      temperature: 0,
      jsonMode: false,
    });
  } catch (e) {
    const error = e.payload ?? { tag: 'unknown', val: String(e) };
    const again = error.tag === 'rate-limited' || error.tag === 'unavailable';
    const message = `the LLM failed: ${error.tag} ${error.val ?? ''}`;
    throw again ? retryable(message) : fatal(message);
  }
  return JSON.stringify({
    question,
    facts: facts.map(({ topic, fact }) => ({ topic, fact })),
    answer: answer.text,
    model: answer.model,
  });
}

/** A setting that may be missing. */
function safeGet(name) {
  try {
    return get(name);
  } catch {
    return undefined;
  }
}
