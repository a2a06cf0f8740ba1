#!/usr/bin/env node
// Runs a GGUF model in llama.cpp (node-llama-cpp's prebuilt CPU build, installed by
// scripts/setup.sh) and prints its greedy continuation of a prompt: the demo shows that the file
// `moe train` writes is a model llama.cpp runs.
//
// Usage: node scripts/llamacpp_generate.mjs MODEL.gguf "prompt" [n_tokens] [threads]
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const oracle = await import(pathToFileURL(path.join(here, "..", "tests", "conformance", "oracle.mjs")).href);

const [modelPath, prompt, nArg, threadsArg] = process.argv.slice(2);
if (!modelPath || prompt === undefined) {
  console.error("usage: llamacpp_generate.mjs MODEL.gguf PROMPT [n_tokens] [threads]");
  process.exit(2);
}
const n = Number(nArg ?? 32), threads = Number(threadsArg ?? 2);
const nlc = await oracle.importNodeLlamaCpp();
const llama = await oracle.loadLlama(nlc, threads);
const model = await llama.loadModel({ modelPath: path.resolve(modelPath), gpuLayers: 0 });
const context = await model.createContext({ contextSize: 512, threads: { ideal: threads, min: threads } });
const sequence = context.getSequence();
const ids = model.tokenize(prompt, false);
const input = model.tokens.bos != null ? [model.tokens.bos, ...ids] : ids;
const out = [];
for await (const t of sequence.evaluate(input, { temperature: 0, yieldEogToken: true })) {
  out.push(t);
  if (out.length >= n) break;
}
process.stdout.write(JSON.stringify({ prompt_tokens: input, tokens: out, text: prompt + model.detokenize(out) }) + "\n");
await context.dispose();
await model.dispose();
await llama.dispose();
