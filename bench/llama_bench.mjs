#!/usr/bin/env node
// Times llama.cpp (node-llama-cpp's prebuilt CPU build) on a GGUF file: prefill of
// P seeded random token ids, then decode of N tokens, on T threads.
//
//   node bench/llama_bench.mjs -m MODEL.gguf [-p 128] [-n 64] [-t 2] [--seed 1]
//        [--decode greedy|random] [--repeat 3] [--batch 512] [--pin]
//   node bench/llama_bench.mjs -m MODEL.gguf --sweep [--threads-list 1,2] ...
//
// Prints one JSON object: {prefill_tokens_per_s, decode_tokens_per_s, ...}.
// --sweep gives llama.cpp its best setting: it runs each thread count, plain and
// --pin, in a fresh process, and reports the best prefill and the best decode
// speed (with the setting that gave each) plus every measurement.
// Speeds are wall-clock over the evaluation calls, best of --repeat runs after
// a warm-up (which pages the mmap'd weights in). Each run also carries
// llama.cpp's own prompt-eval / eval timings (its perf counters) as llama_internal.
//
// Decode modes: "greedy" lets the model pick each next token (temperature 0);
// "random" feeds seeded random ids, one decode step each (and still computes the
// full logits and samples each step). Never one repeated token: that routes to
// the same experts every step and flatters MoE.
//
// Threads on small VMs: node-llama-cpp runs each evaluation on a libuv worker and
// ggml (no OpenMP in this build, no threadpool attached) creates its worker
// threads anew for every graph, with no CPU affinity, and node-llama-cpp exposes
// no cpumask / strict-cpu option. --pin preloads a small shim (compiled here with
// cc) that keeps each thread that starts threads on its CPU and puts the new
// threads on the other CPUs, so a ggml worker never shares its creator's core.

import { execFileSync, spawnSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { importNodeLlamaCpp, guardNoVocab } from "../tests/conformance/oracle.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));

function parseArgs(argv) {
  const o = { model: null, prompt: 128, gen: 64, threads: 2, seed: 1, decode: "greedy",
              repeat: 3, batch: 512, pin: false, sweep: false, threadsList: null, cache: "f32",
              flash: "off", flashList: null };
  const num = (v, name) => {
    const x = Number(v);
    if (!Number.isFinite(x)) throw new Error(`${name} needs a number, got ${v}`);
    return x;
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i], v = argv[i + 1];
    switch (a) {
      case "-m": case "--model": o.model = v; i++; break;
      case "-p": case "--prompt": o.prompt = num(v, a); i++; break;
      case "-n": case "--gen": o.gen = num(v, a); i++; break;
      case "-t": case "--threads": o.threads = num(v, a); i++; break;
      case "--seed": o.seed = num(v, a); i++; break;
      case "--decode": o.decode = v; i++; break;
      case "--repeat": o.repeat = num(v, a); i++; break;
      case "--batch": o.batch = num(v, a); i++; break;
      case "--pin": o.pin = true; break;
      case "--cache-type": o.cache = v; i++; break;
      case "--flash-attn": o.flash = v; i++; break;
      case "--flash-list": o.flashList = v.split(","); i++; break;
      case "--sweep": o.sweep = true; break;
      case "--threads-list": o.threadsList = v.split(",").map(x => num(x, a)); i++; break;
      case "-h": case "--help":
        process.stdout.write("usage: llama_bench.mjs -m MODEL [-p P] [-n N] [-t T] [--seed S] " +
                             "[--decode greedy|random] [--repeat R] [--batch B] [--pin] [--cache-type f32|f16] " +
                             "[--flash-attn on|off] [--sweep [--threads-list 1,2] [--flash-list off,on]]\n");
        process.exit(0);
      default: throw new Error(`unknown argument ${a}`);
    }
  }
  if (!o.model) throw new Error("give the model: -m MODEL.gguf");
  if (!["greedy", "random"].includes(o.decode)) throw new Error("--decode is greedy or random");
  if (!["f32", "f16"].includes(o.cache)) throw new Error("--cache-type is f32 or f16");
  for (const f of [o.flash, ...(o.flashList ?? [])])
    if (!["on", "off"].includes(f)) throw new Error("--flash-attn and --flash-list take on or off");
  if (o.prompt < 1 || o.gen < 1 || o.threads < 1 || o.repeat < 1) throw new Error("-p, -n, -t, --repeat must be >= 1");
  return o;
}

// Small seeded generator (mulberry32) for reproducible token ids.
function rng(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6D2B79F5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function vocabSize(model) {
  const md = model.fileInfo?.metadata ?? {};
  const v = md[md.general?.architecture]?.vocab_size ?? md.tokenizer?.ggml?.tokens?.length;
  if (!Number.isInteger(v)) throw new Error("cannot tell the vocabulary size of the model");
  return v;
}

// llama.cpp's perf lines, e.g. "prompt eval time = 12.3 ms / 128 tokens".
function parseTimings(lines) {
  const out = {};
  for (const l of lines) {
    let m = /prompt eval time\s*=\s*([\d.]+)\s*ms\s*\/\s*(\d+)\s*tokens/.exec(l);
    if (m) { out.prompt_eval_ms = +m[1]; out.prompt_eval_tokens = +m[2]; continue; }
    m = /\beval time\s*=\s*([\d.]+)\s*ms\s*\/\s*(\d+)\s*runs/.exec(l);
    if (m) { out.eval_ms = +m[1]; out.eval_runs = +m[2]; }
  }
  return out;
}

// LD_PRELOAD shim: wraps pthread_create. The creating thread is pinned to the
// CPU it runs on; each new thread is pinned to another CPU, round robin.
const PIN_SHIM = String.raw`
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <unistd.h>
typedef int (*create_fn)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);
struct start { void *(*fn)(void *); void *arg; int cpu; };
static __thread int pinned_self = 0;
static __thread unsigned spawned = 0;
static void pin(int cpu) {
  cpu_set_t s; CPU_ZERO(&s); CPU_SET(cpu, &s); sched_setaffinity(0, sizeof s, &s);
}
static void *trampoline(void *p) {
  struct start st = *(struct start *)p; free(p);
  pin(st.cpu); pinned_self = 1;
  return st.fn(st.arg);
}
int pthread_create(pthread_t *t, const pthread_attr_t *a, void *(*fn)(void *), void *arg) {
  static create_fn real = 0;
  if (!real) real = (create_fn)dlsym(RTLD_NEXT, "pthread_create");
  int n = (int)sysconf(_SC_NPROCESSORS_ONLN);
  struct start *st = n >= 2 ? malloc(sizeof *st) : NULL;
  if (!st) return real(t, a, fn, arg);
  int me = sched_getcpu();
  if (!pinned_self) { pin(me); pinned_self = 1; }
  st->fn = fn; st->arg = arg;
  st->cpu = (me + 1 + (int)(spawned++ % (unsigned)(n - 1))) % n;
  int rc = real(t, a, trampoline, st);
  if (rc) free(st);
  return rc;
}
`;

function pinShim() {
  const hash = crypto.createHash("sha1").update(PIN_SHIM).digest("hex").slice(0, 12);
  const dir = path.join(os.tmpdir(), `moe-bench-pin-${hash}`);
  const lib = path.join(dir, "libpin.so");
  if (!fs.existsSync(lib)) {
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, "pin.c"), PIN_SHIM);
    execFileSync("cc", ["-O2", "-shared", "-fPIC", "-o", lib, path.join(dir, "pin.c"), "-ldl"],
                 { stdio: ["ignore", "ignore", "inherit"] });
  }
  return lib;
}

// Re-runs this script in a fresh process (optionally with the pin shim), with every option of
// this one but the threads, the pinning and the flash attention setting, which it is given.
function child(o, threads, pin, flash) {
  const args = [fileURLToPath(import.meta.url), "-m", o.model, "-p", String(o.prompt),
                "-n", String(o.gen), "-t", String(threads), "--seed", String(o.seed),
                "--decode", o.decode, "--repeat", String(o.repeat), "--batch", String(o.batch),
                "--cache-type", o.cache, "--flash-attn", flash];
  const env = { ...process.env };
  if (pin) env.LD_PRELOAD = [pinShim(), env.LD_PRELOAD].filter(Boolean).join(":");
  delete env.MOE_BENCH_PINNED;
  if (pin) env.MOE_BENCH_PINNED = "1";
  const r = spawnSync(process.execPath, args, { env, encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] });
  if (r.status !== 0) throw new Error(`llama_bench child (-t ${threads}${pin ? " --pin" : ""} --flash-attn ${flash}) failed`);
  return JSON.parse(r.stdout.trim().split("\n").pop());
}

function sweep(o) {
  const ncpu = os.availableParallelism?.() ?? os.cpus().length;
  const list = o.threadsList ?? [...new Set([1, Math.min(2, ncpu), ncpu])];
  const configs = [];
  for (const t of list) {
    for (const pin of t > 1 ? [false, true] : [false]) {
      for (const flash of o.flashList ?? [o.flash]) {
        const r = child(o, t, pin, flash);
        configs.push({ setting: `threads ${t}${pin ? " pinned" : ""}${flash === "on" ? " flash-attn" : ""}`,
                       threads: t, pinned: pin, flash_attn: flash === "on",
                       prefill_tokens_per_s: r.prefill_tokens_per_s,
                       decode_tokens_per_s: r.decode_tokens_per_s, runs: r.runs });
      }
    }
  }
  const bestOf = key => configs.reduce((a, b) => (b[key] > a[key] ? b : a));
  const bp = bestOf("prefill_tokens_per_s"), bd = bestOf("decode_tokens_per_s");
  return {
    engine: "llama.cpp (node-llama-cpp, best setting)", model: o.model,
    prompt_tokens: o.prompt, gen_tokens: o.gen, decode_mode: o.decode,
    prefill_tokens_per_s: bp.prefill_tokens_per_s, prefill_setting: bp.setting,
    decode_tokens_per_s: bd.decode_tokens_per_s, decode_setting: bd.setting,
    configs,
  };
}

async function main() {
  const o = parseArgs(process.argv.slice(2));
  if (o.sweep) {
    process.stdout.write(JSON.stringify(sweep(o)) + "\n");
    return;
  }
  if (o.pin && process.env.MOE_BENCH_PINNED !== "1") {
    process.stdout.write(JSON.stringify(child(o, o.threads, true, o.flash)) + "\n");
    return;
  }
  const nlc = await importNodeLlamaCpp();
  guardNoVocab(nlc);
  const logLines = [];
  const llama = await nlc.getLlama({
    gpu: false, build: "never", skipDownload: true, usePrebuiltBinaries: true,
    maxThreads: o.threads, progressLogs: false, logLevel: nlc.LlamaLogLevel.info,
    logger: (level, message) => {
      logLines.push(String(message));
      if (level === nlc.LlamaLogLevel.error || level === nlc.LlamaLogLevel.fatal) process.stderr.write(String(message));
    },
  });
  const model = await llama.loadModel({ modelPath: path.resolve(o.model), gpuLayers: 0, useMmap: true });
  const nVocab = vocabSize(model);
  const context = await model.createContext({
    contextSize: o.prompt + o.gen + 16,
    batchSize: Math.min(o.batch, o.prompt),
    sequences: 1,
    threads: { ideal: o.threads, min: o.threads },
    flashAttention: o.flash === "on",
    experimentalKvCacheKeyType: o.cache === "f16" ? nlc.GgmlType.F16 : nlc.GgmlType.F32,
    experimentalKvCacheValueType: o.cache === "f16" ? nlc.GgmlType.F16 : nlc.GgmlType.F32,
    performanceTracking: true,
  });
  const seq = context.getSequence();
  const next = rng(o.seed);
  const randomIds = n => Array.from({ length: n }, () => Math.floor(next() * nVocab));

  async function once(prompt, gen) {
    await seq.clearHistory();
    const ids = prompt.map((t, i) => i === prompt.length - 1
      ? [t, { generateNext: { token: true, options: { temperature: 0 } } }] : t);
    let t0 = performance.now();
    const res = await seq.controlledEvaluate(ids);
    const prefillMs = performance.now() - t0;
    let last = res[res.length - 1]?.next?.token;
    let decoded = 0;
    t0 = performance.now();
    if (o.decode === "greedy") {
      // evaluate() feeds `last` and then each token it picks.
      for await (const tok of seq.evaluate([last], { temperature: 0, yieldEogToken: true })) {
        if (++decoded >= gen) break;
      }
    } else {
      for (const t of randomIds(gen)) {
        await seq.controlledEvaluate([[t, { generateNext: { token: true, options: { temperature: 0 } } }]]);
        decoded++;
      }
    }
    const decodeMs = performance.now() - t0;
    return { prefillMs, decodeMs, decoded };
  }

  // Warm-up: pages in the weights (most experts are touched by a random prompt).
  await once(randomIds(o.prompt), Math.min(8, o.gen));
  const runs = [];
  for (let r = 0; r < o.repeat; r++) {
    const prompt = randomIds(o.prompt);
    await context.printTimings();  // prints and resets llama.cpp's perf counters
    logLines.length = 0;
    const res = await once(prompt, o.gen);
    logLines.length = 0;
    await context.printTimings();
    runs.push({ prefill_tokens_per_s: o.prompt / res.prefillMs * 1e3,
                decode_tokens_per_s: res.decoded / res.decodeMs * 1e3,
                llama_internal: parseTimings(logLines) });
  }
  const best = key => Math.max(...runs.map(r => r[key]));
  const out = {
    engine: "llama.cpp (node-llama-cpp " + (await nlc.getModuleVersion?.() ?? "?") + ")",
    model: o.model, threads: o.threads, pinned: process.env.MOE_BENCH_PINNED === "1",
    cache_type: o.cache, flash_attn: o.flash === "on",
    prompt_tokens: o.prompt, gen_tokens: o.gen,
    decode_mode: o.decode, repeat: o.repeat,
    prefill_tokens_per_s: best("prefill_tokens_per_s"),
    decode_tokens_per_s: best("decode_tokens_per_s"),
    runs,
  };
  process.stdout.write(JSON.stringify(out) + "\n");
  await context.dispose();
  await model.dispose();
  await llama.dispose();
}

main().catch(err => {
  process.stderr.write(`llama_bench: ${err?.message ?? err}\n`);
  process.exit(1);
});
