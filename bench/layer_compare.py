#!/usr/bin/python3
"""MoE layer speed: moe.cpp (`moe bench-layer`) against PyTorch (bench/layer_bench_torch.py).

Both time the same layer (router + SwiGLU experts, float32), forward and forward + backward,
on fresh random inputs, with the same thread count. Rounds alternate moe / PyTorch, one fresh
process each, so drift of the machine hits both alike; each tool reports medians over its own
repeats and this script takes the medians over rounds. The ratio is against PyTorch's best
variant (per-expert loop as in Hugging Face's Mixtral block, or sorted tokens), chosen per
measure. A section with the machine, command, date and ratios goes to the top of
bench/RESULTS.md (newest first).

    bench/layer_compare.py [--moe build/bin/moe] [--rounds 5] [--tokens 4096 ...]
    bench/layer_compare.py --dry-run    # PyTorch side only, print the section, write nothing

The moe CLI contract (issue 3): `moe bench-layer --router R --tokens T --dim D --ffn F
--experts E --experts-used K --threads N --json` prints a JSON object with forward_ms and
forward_backward_ms (its last output line).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402
from benchutil import cpu_name  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PY = "/usr/bin/python3"   # Debian python3-torch; a pyenv python3 on PATH lacks torch
MEASURES = ("forward_ms", "forward_backward_ms")






def check_moe(moe):
    """Fails with a clear message unless `moe bench-layer` exists."""
    if not os.path.exists(moe):
        raise SystemExit(f"layer_compare: no moe CLI at {moe}: build it (make) or pass --moe PATH")
    # Ask the CLI for its subcommands: an unknown subcommand followed by --help may still print
    # the top-level help and exit 0, so the exit code alone proves nothing.
    p = subprocess.run([moe, "--help"], capture_output=True, text=True)
    listed = any(line.split()[:1] == ["bench-layer"] for line in (p.stdout + p.stderr).splitlines())
    if not listed:
        raise SystemExit(f"layer_compare: '{moe}' has no bench-layer subcommand yet (issue 3: "
                         "moe bench-layer --router R --tokens T ... --json); build a moe that has it, "
                         "or use --dry-run to time only the PyTorch side")


def layer_flags(a):
    return ["--router", a.router, "--tokens", str(a.tokens), "--dim", str(a.dim), "--ffn", str(a.ffn),
            "--experts", str(a.experts), "--experts-used", str(a.experts_used), "--threads", str(a.threads)]


def section(a, med_moe, med_torch, version, date):
    best = {m: min(med_torch[v][m] for v in med_torch) for m in MEASURES}
    best_v = {m: min(med_torch, key=lambda v: med_torch[v][m]) for m in MEASURES}
    cmd = (f"bench/layer_compare.py --router {a.router} --tokens {a.tokens} --dim {a.dim} --ffn {a.ffn} "
           f"--experts {a.experts} --experts-used {a.experts_used} --threads {a.threads} --rounds {a.rounds} --torch-omp-wait {a.torch_omp_wait}")
    lines = [f"## MoE layer: moe.cpp vs PyTorch ({date})", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}. "
             f"Command: `{cmd}`. Router {a.router}, T={a.tokens}, D={a.dim}, F={a.ffn}, E={a.experts}, "
             f"k={a.experts_used}, SwiGLU experts, float32, {a.threads} threads, "
             f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}, fresh random inputs per repeat, "
             f"medians of {a.rounds} alternating rounds (each tool: median of its own repeats). "
             f"PyTorch {version}: `loop` = per-expert loop as in Hugging Face's Mixtral "
             "block, `sorted` = tokens sorted by expert, one slab per expert; `(passive)` = run with "
             "OMP_WAIT_POLICY=PASSIVE (OpenMP's spin-waiting is far slower when the cores are shared). Ratio = PyTorch's best / moe.cpp "
             "(above 1: moe.cpp is faster).", ""]
    head = "| measure | " + " | ".join(f"PyTorch {v} ms" for v in med_torch) + " | moe.cpp ms | ratio vs best |"
    lines += [head, "|---" * (len(med_torch) + 3) + "|"]
    for m in MEASURES:
        name = "forward" if m == "forward_ms" else "forward + backward"
        cells = " | ".join(f"{med_torch[v][m]:.1f}" for v in med_torch)
        if med_moe is None:
            lines.append(f"| {name} | {cells} | (dry run) | - |")
        else:
            lines.append(f"| {name} | {cells} | {med_moe[m]:.1f} | {best[m] / med_moe[m]:.2f}x "
                         f"(vs {best_v[m]}) |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe", default=os.path.join(ROOT, "build", "bin", "moe"))
    ap.add_argument("--router", default="softmax_topk")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--experts-used", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--torch-repeats", type=int, default=5, help="repeats inside each PyTorch run")
    ap.add_argument("--torch-omp-wait", default="default,passive",
                    help="OpenMP wait policies to run PyTorch under, each a variant of its own "
                         "(default = as the environment has it; passive = OMP_WAIT_POLICY=PASSIVE, "
                         "far faster on a busy machine); the ratio is against the best of all")
    ap.add_argument("--dry-run", action="store_true", help="PyTorch side only; print, do not write")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    a = ap.parse_args()
    if a.router not in ("softmax_topk", "sigmoid_bias"):
        ap.error("--router: the PyTorch peer implements softmax_topk and sigmoid_bias")
    policies = [p for p in a.torch_omp_wait.split(",") if p]
    if not policies or any(p not in ("default", "passive", "active") for p in policies):
        ap.error("--torch-omp-wait: a comma-separated list of default, passive, active")
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    if not a.dry_run:
        check_moe(a.moe)
    torch_cmd = [TORCH_PY, os.path.join(ROOT, "bench", "layer_bench_torch.py"), *layer_flags(a),
                 "--repeats", str(a.torch_repeats)]
    moe_runs, torch_runs = [], []
    version = ""
    for r in range(a.rounds):
        msg = f"round {r}:"
        if not a.dry_run:
            m = benchutil.run_json([a.moe, "bench-layer", *layer_flags(a), "--json"], "moe bench-layer")
            for key in MEASURES:
                if key not in m:
                    raise SystemExit(f"moe bench-layer --json printed no '{key}': {json.dumps(m)}")
            moe_runs.append(m)
            msg += f" moe fwd {m['forward_ms']:.1f} ms fwd+bwd {m['forward_backward_ms']:.1f} ms |"
        t = {}
        for pol in policies:
            extra = [] if pol == "default" else ["--omp-wait", pol]
            res = benchutil.run_json([*torch_cmd, "--seed", str(100 + r), *extra], "layer_bench_torch.py")
            version = res.get("torch", "")
            for v in ("loop", "sorted"):
                t[v if pol == "default" else f"{v} ({pol})"] = res[v]
        torch_runs.append(t)
        msg += " PyTorch " + ", ".join(f"{v} fwd {x['forward_ms']:.1f} fwd+bwd {x['forward_backward_ms']:.1f}"
                                       for v, x in t.items())
        print(msg, flush=True)
    med_torch = {v: {m: statistics.median(t[v][m] for t in torch_runs) for m in MEASURES}
                 for v in torch_runs[0]}
    med_moe = ({m: statistics.median(x[m] for x in moe_runs) for m in MEASURES} if moe_runs else None)
    text = section(a, med_moe, med_torch, version, datetime.date.today().isoformat())
    print(text)
    if a.dry_run:
        print("(dry run: nothing written)")
        return 0
    benchutil.write_section(a.out, text)
    print(f"appended to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
