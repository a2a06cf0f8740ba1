#!/usr/bin/env python3
"""Speed against prompt length and against threads: moe.cpp and llama.cpp on the same file.

    bench/sweep.py [--moe build/bin/moe] [--shape medium] [--type Q4_K_M]
                   [--prompts 32,64,128,256,512] [--threads 1,2] [-n 32] [--rounds 3]

For each prompt length (at the largest thread count) and each thread count (at 128 prompt
tokens): prefill and decode tokens/s of both engines, medians of alternating rounds, random
tokens. Writes a section with the tables and bar charts to the top of bench/RESULTS.md. The
model file is compare.py's (build/bench/SHAPE-TYPE.gguf; run compare.py first to make it).
"""
import argparse
import datetime
import os
import platform
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(a, path, p, t, r):
    m = benchutil.run_json([a.moe, "bench", "-m", path, "-p", str(p), "-n", str(a.n), "-t", str(t),
                            "--seed", str(200 + r), "--cache-type", a.cache_type, "--json"], "moe bench")
    l = benchutil.run_json(["node", os.path.join(ROOT, "bench", "llama_bench.mjs"), "-m", path, "-p", str(p),
                            "-n", str(a.n), "-t", str(t), "--seed", str(200 + r), "--decode", "random",
                            "--repeat", "1", "--cache-type", a.cache_type], "llama_bench.mjs")
    return (m["prefill_tokens_per_s"], m["decode_tokens_per_s"],
            l["prefill_tokens_per_s"], l["decode_tokens_per_s"])


def medians(a, path, p, t):
    runs = [measure(a, path, p, t, r) for r in range(a.rounds)]
    med = [statistics.median(x[i] for x in runs) for i in range(4)]
    print(f"p={p} t={t}: moe pp {med[0]:.1f} tg {med[1]:.1f} | llama.cpp pp {med[2]:.1f} tg {med[3]:.1f}",
          flush=True)
    return med


def bars(title, label, rows, col_moe, col_llama):
    """A text bar chart: one bar per engine per row, scaled to the largest value."""
    top = max(max(r[1][col_moe], r[1][col_llama]) for r in rows)
    width = 48
    out = [title, "```"]
    for key, med in rows:
        for name, v in (("moe.cpp  ", med[col_moe]), ("llama.cpp", med[col_llama])):
            n = int(round(width * v / top)) if top > 0 else 0
            head = f"{label} {key:>4}" if name.startswith("moe") else " " * (len(label) + 5)
            out.append(f"{head}  {name} {'█' * n} {v:.0f}")
    out.append("```")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe", default=os.path.join(ROOT, "build", "bin", "moe"))
    ap.add_argument("--shape", default="medium")
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--prompts", default="32,64,128,256,512")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("-n", type=int, default=32, help="decoded tokens per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache-type", choices=("f32", "f16"), default="f16",
                    help="KV cache of both engines (f16: llama.cpp's default)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    a = ap.parse_args()
    path = os.path.join(ROOT, "build", "bench", f"{a.shape}-{a.type}.gguf")
    if not os.path.exists(path):
        raise SystemExit(f"{path} does not exist: run bench/compare.py --shape {a.shape} --types {a.type} first")
    prompts = [int(x) for x in a.prompts.split(",")]
    threads = [int(x) for x in a.threads.split(",")]
    tmax = max(threads)
    by_p = [(p, medians(a, path, p, tmax)) for p in prompts]
    by_t = [(t, medians(a, path, 128, t)) for t in threads]
    date = datetime.date.today().isoformat()
    cmd = (f"bench/sweep.py --shape {a.shape} --type {a.type} --prompts {a.prompts} --threads {a.threads} "
           f"-n {a.n} --rounds {a.rounds}" + (f" --cache-type {a.cache_type}" if a.cache_type != "f16" else ""))
    lines = [f"## Speed against prompt length and threads: moe.cpp vs llama.cpp ({date})", "",
             f"Machine: {benchutil.cpu_name()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}. "
             f"Command: `{cmd}`. File: build/bench/{a.shape}-{a.type}.gguf (bench/compare.py's), random tokens, "
             f"{a.n} decoded tokens after each prompt (decode speed is at that context), medians of {a.rounds} "
             f"alternating rounds. llama.cpp = node-llama-cpp 3.21.1 prebuilt CPU build; both engines with {a.cache_type.upper()} KV caches.", "",
             f"| prompt tokens ({tmax} threads) | moe prefill tok/s | llama.cpp prefill tok/s | ratio | "
             "moe decode tok/s | llama.cpp decode tok/s | ratio |",
             "|---|---|---|---|---|---|---|"]
    for p, m in by_p:
        lines.append(f"| {p} | {m[0]:.1f} | {m[2]:.1f} | {m[0] / m[2]:.2f}x | {m[1]:.1f} | {m[3]:.1f} | "
                     f"{m[1] / m[3]:.2f}x |")
    lines += ["", "| threads (128 prompt tokens) | moe prefill tok/s | llama.cpp prefill tok/s | ratio | "
              "moe decode tok/s | llama.cpp decode tok/s | ratio |", "|---|---|---|---|---|---|---|"]
    for t, m in by_t:
        lines.append(f"| {t} | {m[0]:.1f} | {m[2]:.1f} | {m[0] / m[2]:.2f}x | {m[1]:.1f} | {m[3]:.1f} | "
                     f"{m[1] / m[3]:.2f}x |")
    lines.append("")
    lines += bars(f"Prefill tokens/s against prompt length ({tmax} threads):", "prompt", by_p, 0, 2)
    lines.append("")
    lines += bars(f"Decode tokens/s against the prompt length before it ({tmax} threads):", "prompt", by_p, 1, 3)
    lines.append("")
    lines += bars("Prefill tokens/s against threads (128-token prompt):", "threads", by_t, 0, 2)
    lines.append("")
    lines += bars("Decode tokens/s against threads:", "threads", by_t, 1, 3)
    section = "\n".join(lines) + "\n"
    print(section)
    benchutil.write_section(a.out, section)


if __name__ == "__main__":
    main()
