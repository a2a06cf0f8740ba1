#!/usr/bin/env node
// llama.cpp as a test oracle, through node-llama-cpp (prebuilt CPU binaries).
//
// Usage: node oracle.mjs [job.json]        (reads the job from stdin without a file)
//
// A job: {model, threads, mode: "greedy"|"teacher"|"target_logprobs"|"tokenize", prompt_ids,
//         n_predict, top_n, score_from, texts}
// Several jobs on one model load: an array of jobs (all with the same model and
// threads), or {model, threads, jobs: [{mode, ...}, ...]}.
// Output: one JSON object on stdout. A single job gives its result object; an
// array or {jobs} gives {"results": [...]}. On error: {"error": "..."} and exit 1.
//
// Results:
//   greedy:   {tokens: [id...], top_logprobs: [[{id, logprob}...] per generated
//              position], n_probs: [size of each distribution]}
//             top_logprobs[i] is the distribution tokens[i] was chosen from.
//   teacher:  {teacher_logprobs: [[{id, logprob}...] per prompt position i,
//              the distribution after prompt_ids[0..i]]}
//   target_logprobs: {logprobs: [log p(prompt_ids[j+1]) for j = score_from .. n-2]}
//   tokenize: {tokens: [[id...] per text], texts: [detokenized...]}
// logprob = natural log of llama.cpp's probability, which node-llama-cpp
// computes as the softmax over the whole vocabulary of the raw logits (the
// greedy sampler chain does not alter the logits).
//
// Settings for exact comparisons: CPU only, no mmap tricks, F32 KV cache and
// flash attention off (llama.cpp's F16 KV cache moves results). "kv_type": "f16"
// in the job (or its common part) gives llama.cpp's default F16 cache instead.

import fs from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));

export async function importNodeLlamaCpp() {
  const dir = process.env.NODE_LLAMA_CPP_DIR ||
      path.join(here, "..", "..", "third_party", "npm", "node_modules", "node-llama-cpp");
  const entry = path.join(dir, "dist", "index.js");
  if (!fs.existsSync(entry)) {
    throw new Error(`node-llama-cpp not found at ${dir}: run scripts/setup.sh ` +
                    `(or set NODE_LLAMA_CPP_DIR)`);
  }
  return import(pathToFileURL(entry).href);
}

// Files with tokenizer.ggml.model = "none" have no tokenizer: llama.cpp aborts
// the process (GGML_ASSERT) on tokenize/detokenize, and node-llama-cpp's
// loadModel runs a tokenize round trip in getWarnings() (inside a try). Make
// those calls throw a JS error instead, so id-only models load and run.
export function guardNoVocab(nlc) {
  const proto = nlc.LlamaModel.prototype;
  if (proto.__moeNoVocabGuard) return;
  const noVocab = m => {
    const t = m.fileInfo?.metadata?.tokenizer?.ggml?.model;
    return t === "none" || t === "no_vocab";
  };
  for (const name of ["tokenize", "detokenize"]) {
    const orig = proto[name];
    proto[name] = function (...args) {
      if (noVocab(this)) throw new Error(`model has no vocabulary (tokenizer.ggml.model = none): cannot ${name}`);
      return orig.apply(this, args);
    };
  }
  proto.__moeNoVocabGuard = true;
}

export async function loadLlama(nlc, threads) {
  guardNoVocab(nlc);
  return nlc.getLlama({
    gpu: false,
    build: "never",
    skipDownload: true,
    usePrebuiltBinaries: true,
    maxThreads: threads,
    logLevel: nlc.LlamaLogLevel.error,
    // llama.cpp's log lines go to stderr so stdout stays one JSON object.
    logger: (level, message) => process.stderr.write(String(message)),
    progressLogs: false,
  });
}

// Vocabulary size from the file: <arch>.vocab_size, else the token list.
function vocabSize(model) {
  const md = model.fileInfo?.metadata ?? {};
  const arch = md.general?.architecture;
  const v = md[arch]?.vocab_size ?? md.tokenizer?.ggml?.tokens?.length;
  if (!Number.isInteger(v)) throw new Error("cannot tell the vocabulary size of the model");
  return v;
}

function topN(probabilities, n) {
  // The Map is sorted by probability, highest first.
  const out = [];
  for (const [id, p] of probabilities) {
    if (out.length >= n) break;
    out.push({ id, logprob: p > 0 ? Math.log(p) : -Infinity });
  }
  return out;
}

function checkIds(ids, nVocab, what) {
  if (!Array.isArray(ids) || ids.length === 0) throw new Error(`${what}: prompt_ids must be a non-empty array`);
  for (const t of ids) {
    if (!Number.isInteger(t) || t < 0 || t >= nVocab) {
      throw new Error(`${what}: token id ${t} is outside the vocabulary [0, ${nVocab})`);
    }
  }
}

async function runGreedy(sequence, job, nVocab) {
  checkIds(job.prompt_ids, nVocab, "greedy");
  const nPredict = job.n_predict ?? 16;
  const top = job.top_n ?? 5;
  const tokens = [], topLogprobs = [], nProbs = [];
  if (nPredict > 0) {
    const it = sequence.evaluateWithMetadata(job.prompt_ids, { probabilities: true },
                                             { temperature: 0, yieldEogToken: true });
    for await (const item of it) {
      tokens.push(item.token);
      topLogprobs.push(topN(item.probabilities, top));
      nProbs.push(item.probabilities.size);
      if (tokens.length >= nPredict) break;
    }
  }
  return { mode: "greedy", tokens, top_logprobs: topLogprobs, n_probs: nProbs };
}

async function runTeacher(sequence, job, nVocab) {
  checkIds(job.prompt_ids, nVocab, "teacher");
  const top = job.top_n ?? 5;
  const input = job.prompt_ids.map(t => [t, { generateNext: { probabilities: true, options: { temperature: 0 } } }]);
  const res = await sequence.controlledEvaluate(input);
  const out = [];
  for (let i = 0; i < res.length; i++) {
    const p = res[i]?.next?.probabilities;
    if (p == null) throw new Error(`teacher: no distribution at position ${i}`);
    out.push(topN(p, top));
  }
  return { mode: "teacher", teacher_logprobs: out };
}

// The log-probability of each next token: position j's distribution evaluated at prompt_ids[j + 1],
// for j = score_from .. n - 2 (a held-out loss, as llama.cpp's perplexity tool scores a chunk).
async function runTargets(sequence, job, nVocab) {
  checkIds(job.prompt_ids, nVocab, "target_logprobs");
  const ids = job.prompt_ids, from = job.score_from ?? 0;
  const input = ids.map((t, j) => (j >= from && j + 1 < ids.length)
      ? [t, { generateNext: { probabilities: true, options: { temperature: 0 } } }] : t);
  const res = await sequence.controlledEvaluate(input);
  const out = [];
  for (let j = from; j + 1 < ids.length; j++) {
    const p = res[j]?.next?.probabilities;
    if (p == null) throw new Error(`target_logprobs: no distribution at position ${j}`);
    const q = p.get(ids[j + 1]) ?? 0;
    out.push(q > 0 ? Math.log(q) : -1e30);
  }
  return { mode: "target_logprobs", logprobs: out };
}

function runTokenize(model, job) {
  const texts = job.texts ?? [];
  const tokens = texts.map(t => Array.from(model.tokenize(t, job.special ?? false)));
  return { mode: "tokenize", tokens, texts: tokens.map(ids => model.detokenize(ids)) };
}

function normaliseJobs(input) {
  if (Array.isArray(input)) return { common: input[0] ?? {}, jobs: input, many: true };
  if (Array.isArray(input.jobs)) {
    const { jobs, ...common } = input;
    return { common, jobs: jobs.map(j => ({ ...common, ...j })), many: true };
  }
  return { common: input, jobs: [input], many: false };
}

async function main() {
  const file = process.argv[2];
  const text = file && file !== "-" ? fs.readFileSync(file, "utf8") : fs.readFileSync(0, "utf8");
  const { common, jobs, many } = normaliseJobs(JSON.parse(text));
  const modelPath = common.model;
  const threads = common.threads ?? 2;
  if (!modelPath) throw new Error("job has no \"model\"");
  for (const j of jobs) {
    if (j.model !== modelPath || (j.threads ?? threads) !== threads) {
      throw new Error("all jobs of one run must share model and threads");
    }
  }
  const nlc = await importNodeLlamaCpp();
  const kvType = { f32: nlc.GgmlType.F32, f16: nlc.GgmlType.F16 }[common.kv_type ?? "f32"];
  if (kvType === undefined) throw new Error(`kv_type ${JSON.stringify(common.kv_type)}: use "f32" or "f16"`);

  const llama = await loadLlama(nlc, threads);
  const t0 = performance.now();
  const model = await llama.loadModel({ modelPath: path.resolve(modelPath), gpuLayers: 0, useMmap: true });
  const loadMs = performance.now() - t0;
  const nVocab = vocabSize(model);

  let maxLen = 16;
  for (const j of jobs) {
    const n = (j.prompt_ids?.length ?? 0) + (j.mode === "greedy" ? (j.n_predict ?? 16) : 0);
    maxLen = Math.max(maxLen, n + 1);
  }
  const needsContext = jobs.some(j => j.mode !== "tokenize");
  let context = null, sequence = null;
  if (needsContext) {
    const batch = Math.max(...jobs.map(j => j.prompt_ids?.length ?? 1), 1);
    context = await model.createContext({
      contextSize: Math.max(maxLen, 32),
      batchSize: batch,
      sequences: 1,
      threads: { ideal: threads, min: threads },
      flashAttention: false,
      experimentalKvCacheKeyType: kvType,
      experimentalKvCacheValueType: kvType,
    });
    sequence = context.getSequence();
  }

  const results = [];
  for (const job of jobs) {
    const t = performance.now();
    let r;
    if (job.mode === "greedy") r = await runGreedy(sequence, job, nVocab);
    else if (job.mode === "teacher") r = await runTeacher(sequence, job, nVocab);
    else if (job.mode === "tokenize") r = runTokenize(model, job);
    else if (job.mode === "target_logprobs") r = await runTargets(sequence, job, nVocab);
    else throw new Error(`unknown mode ${JSON.stringify(job.mode)} (greedy, teacher, target_logprobs or tokenize)`);
    r.elapsed_ms = performance.now() - t;
    if (job.name !== undefined) r.name = job.name;
    results.push(r);
    if (sequence) await sequence.clearHistory();
  }
  const out = many ? { model: modelPath, n_vocab: nVocab, load_ms: loadMs, results } : { ...results[0], n_vocab: nVocab };
  process.stdout.write(JSON.stringify(out) + "\n");
  if (context) await context.dispose();
  await model.dispose();
  await llama.dispose();
}

// Run as a script only (bench/llama_bench.mjs imports the loaders).
if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch(err => {
    process.stdout.write(JSON.stringify({ error: String(err?.message ?? err) }) + "\n");
    process.exit(1);
  });
}
