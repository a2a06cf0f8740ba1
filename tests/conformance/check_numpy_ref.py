#!/usr/bin/python3
"""numpy reference (ref_forward.py) vs llama.cpp (oracle.mjs) on tiny_gguf.py models.

Validates our reading of llama.cpp's conventions for each architecture, and the
oracle itself (its log-probabilities are full-vocabulary log-softmax values of
the raw logits): teacher-forced top-5 log-probabilities at every position and a
greedy continuation must agree within 1e-3 nats on F32 files. A sensitivity
check makes sure the comparison can fail: the reference with the other rope
pairing or the other expert-weight normalisation must disagree.

  check_numpy_ref.py [--only NAME] [--keep DIR] [-v]
Prints one line per case and "N passed, M failed"; exits 1 on any failure.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ref_forward  # noqa: E402
import tiny_gguf  # noqa: E402

TOL = 1e-3

# name: (tiny_gguf.make_model kwargs, tolerance)
CASES = {
    "llama_gqa": (dict(arch="llama", layers=2, dim=64, ffn=96, experts=4, experts_used=2,
                       heads=4, kv_heads=2, vocab=160, seed=11), TOL),
    "llama_odd_k1": (dict(arch="llama", layers=3, dim=72, ffn=40, experts=5, experts_used=1,
                          heads=6, kv_heads=3, vocab=97, seed=12), TOL),
    "llama_k3_mqa": (dict(arch="llama", layers=2, dim=96, ffn=64, experts=8, experts_used=3,
                          heads=4, kv_heads=1, vocab=130, seed=13, rope_base=1e6), TOL),
    # A large eps makes its place matter (inside the sqrt, added to mean(x^2)).
    "llama_big_eps": (dict(arch="llama", layers=2, dim=64, ffn=64, experts=4, experts_used=2,
                           heads=2, kv_heads=1, vocab=100, seed=14, eps=0.5), TOL),
    "qwen2moe_shared": (dict(arch="qwen2moe", layers=2, dim=64, ffn=48, experts=6, experts_used=2,
                             heads=4, kv_heads=2, shared_ffn=80, vocab=128, seed=21), TOL),
    "olmoe": (dict(arch="olmoe", layers=2, dim=80, ffn=56, experts=6, experts_used=3,
                   heads=5, vocab=150, seed=31), TOL),
    "qwen3moe_headdim": (dict(arch="qwen3moe", layers=2, dim=64, ffn=48, experts=8, experts_used=2,
                              heads=4, kv_heads=2, head_dim=24, vocab=128, seed=41), TOL),
    # Half/bfloat16 weights: llama.cpp rounds activations to the weight type before
    # each product, so the reference (exact activations) is only close.
    "llama_f16": (dict(arch="llama", layers=2, dim=64, ffn=96, experts=4, experts_used=2,
                       heads=4, kv_heads=2, vocab=128, seed=51, wtype="f16"), 0.05),
    "qwen3moe_bf16": (dict(arch="qwen3moe", layers=2, dim=64, ffn=64, experts=4, experts_used=2,
                           heads=4, kv_heads=2, vocab=128, seed=52, wtype="bf16"), 0.1),
    # Q8_0 weights (the benchmark models' format), activations quantized to Q8_0 in llama.cpp.
    "llama_q8_0": (dict(arch="llama", layers=2, dim=128, ffn=96, experts=4, experts_used=2,
                        heads=4, kv_heads=2, vocab=128, seed=53, wtype="q8_0"), 0.3),
    # Planted next-token margins: greedy paths of an exact reference and of
    # llama.cpp (8-bit activations) must agree for every step.
    "llama_q8_0_planted": (dict(arch="llama", layers=2, dim=256, ffn=256, experts=4,
                                experts_used=2, heads=4, kv_heads=2, vocab=256, seed=54,
                                wtype="q8_0", plant_margin=30.0, embd_scale=4.0), 0.3),
}

ORACLE = os.path.join(HERE, "oracle.mjs")


def run_oracle(jobs_doc, timeout=300):
    p = subprocess.run(["node", ORACLE], input=json.dumps(jobs_doc), capture_output=True,
                       text=True, timeout=timeout)
    try:
        out = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else None
    except json.JSONDecodeError:
        out = None
    if p.returncode != 0 or out is None or "error" in out:
        msg = (out or {}).get("error") or p.stderr.strip()[-400:] or "exit %d" % p.returncode
        raise RuntimeError("oracle failed: " + msg)
    return out


def diff_top(ref_row, top):
    """Max |llama.cpp logprob - reference logprob| over llama.cpp's top entries."""
    return max(abs(e["logprob"] - ref_row[e["id"]]) for e in top)


def prompts(rng, vocab):
    return [rng.integers(0, vocab, n).tolist() for n in (1, 7, 20)]


def check_case(name, kw, tol, tmp, verbose):
    path = os.path.join(tmp, name + ".gguf")
    tiny_gguf.make_model(path, **kw)
    ref = ref_forward.RefModel(path)
    rng = np.random.default_rng(kw["seed"] + 1000)
    ps = prompts(rng, kw["vocab"])
    n_gen = 8
    jobs = [{"mode": "teacher", "prompt_ids": p, "top_n": 5} for p in ps]
    jobs += [{"mode": "greedy", "prompt_ids": p, "n_predict": n_gen, "top_n": 5} for p in ps]
    out = run_oracle({"model": path, "threads": 2, "jobs": jobs})["results"]
    worst, problems = 0.0, []
    for p, r in zip(ps, out[:len(ps)]):
        lp = ref.logprobs(p)
        for i, top in enumerate(r["teacher_logprobs"]):
            worst = max(worst, diff_top(lp[i], top))
    for p, r in zip(ps, out[len(ps):]):
        if any(n != kw["vocab"] for n in r["n_probs"]):
            problems.append("distribution over %s entries, vocab %d" % (r["n_probs"], kw["vocab"]))
        # Reference logprobs along llama.cpp's own path, so one near-tie does not
        # derail the comparison of the remaining positions.
        lp = ref.logprobs(p + r["tokens"][:-1])[len(p) - 1:]
        ref_tokens = [int(np.argmax(row)) for row in lp]
        for i, top in enumerate(r["top_logprobs"]):
            worst = max(worst, diff_top(lp[i], top))
            s = np.sort(lp[i])[::-1]
            if ref_tokens[i] != r["tokens"][i] and s[0] - s[1] > 2 * tol:
                problems.append("greedy step %d: llama.cpp %d, reference %d" %
                                (i, r["tokens"][i], ref_tokens[i]))
        # The logprobs must be a normalised distribution's (sum of p over top-5 <= 1).
        if sum(np.exp(e["logprob"]) for e in r["top_logprobs"][0]) > 1 + 1e-6:
            problems.append("top-5 probabilities sum above 1")
    if verbose:
        print("  %s: prompts %s, llama.cpp tokens %s" % (name, [len(p) for p in ps],
                                                        out[len(ps)]["tokens"]))
    return worst, problems, ref, ps, out


def sensitivity(ref, ps, out, tol, verbose):
    """The other rope pairing / weight normalisation must move the logprobs."""
    msgs = []
    p = ps[2]
    top = out[2]["teacher_logprobs"]
    for attr in ("neox", "norm_w"):
        setattr(ref, attr, not getattr(ref, attr))
        lp = ref.logprobs(p)
        setattr(ref, attr, not getattr(ref, attr))
        d = max(diff_top(lp[i], t) for i, t in enumerate(top))
        if verbose:
            print("  flipping %s moves the reference by %.3g nats" % (attr, d))
        if d <= 10 * tol:
            msgs.append("flipping %s changes logprobs by only %.2g" % (attr, d))
    return msgs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="run one case: " + ", ".join(CASES))
    ap.add_argument("--keep", help="write models into this directory and keep them")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    names = [a.only] if a.only else list(CASES)
    for n in names:
        if n not in CASES:
            ap.error("unknown case %s" % n)
    passed = failed = 0
    with tempfile.TemporaryDirectory(prefix="moe_numpy_ref_") as tmpd:
        tmp = a.keep or tmpd
        os.makedirs(tmp, exist_ok=True)
        for name in names:
            kw, tol = CASES[name]
            t0 = time.time()
            try:
                worst, problems, ref, ps, out = check_case(name, kw, tol, tmp, a.verbose)
                if name in ("llama_gqa", "qwen3moe_headdim"):
                    problems += sensitivity(ref, ps, out, tol, a.verbose)
                ok = worst <= tol and not problems
                msg = "max |dlogprob| %.2e (tol %.0e)" % (worst, tol)
                if problems:
                    msg += "; " + "; ".join(problems[:3])
            except Exception as e:  # one broken case must not hide the others
                ok, msg = False, "error: %s" % e
            print("%s %s: %s [%.1fs]" % ("PASS" if ok else "FAIL", name, msg, time.time() - t0),
                  flush=True)
            passed += ok
            failed += not ok
    print("%d passed, %d failed" % (passed, failed))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
