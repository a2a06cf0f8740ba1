#!/usr/bin/python3
"""Training speed: moe.cpp (`moe bench-train`) against PyTorch (bench/train_bench_torch.py).

Both train the same model from the same file (`moe init`: llama, 4 layers, dim 256, expert ffn
512, 8 experts top-2, 4 heads, vocab 4096, float32) with the same step: batch x seq random token
ids (fresh every step), cross-entropy + Switch aux loss (0.01) + router z-loss (0.001), AdamW
with clipping, on the same number of threads. Rounds alternate moe / PyTorch, one fresh process
each, so drift of the machine hits both alike; each tool reports the median step over its own
timed steps (after untimed warm-up steps) and this script takes the medians over rounds. The
ratio is moe.cpp's tokens/s over PyTorch's best variant (MoE dispatch `loop` as Hugging Face's
Mixtral block or `sorted`, each under several process settings, --torch-settings: OpenMP and
OpenBLAS threads that sleep instead of spinning, glibc malloc tunables, and OpenBLAS's AVX-512
kernels instead of the environment's OPENBLAS_CORETYPE, after a check of their products). moe
bench-train also reports its model FLOP/s and the peak of its own fp32 GEMM measured in the
same command; their quotient is the share of the machine's matrix throughput that training
reaches (MFU). A section with the machine, command, date and results goes to the top of
bench/RESULTS.md (newest first).

    bench/train_compare.py [--moe build/bin/moe] [--rounds 3] [--steps 10] [--threads 2] ...
    bench/train_compare.py --dry-run    # print the section, write nothing (without a moe that
                                        # has bench-train: the PyTorch side only)

The moe CLI contract: `moe bench-train -m M.gguf --batch B --seq S --steps N --warmup W
--threads T --seed X --json` prints one JSON object (its last output line) with tokens_per_s,
step_ms, model_gflop_per_token, model_gflops, gemm_peak_gflops and mfu.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402
from benchutil import cpu_name  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PY = "/usr/bin/python3"   # Debian python3-torch; a pyenv python3 on PATH lacks torch
MODEL = ["--arch", "llama", "--layers", "4", "--dim", "256", "--ffn", "512", "--experts", "8",
         "--experts-used", "2", "--heads", "4", "--vocab", "4096", "--seed", "1"]
MOE_KEYS = ("tokens_per_s", "step_ms", "model_gflop_per_token", "model_gflops", "gemm_peak_gflops", "mfu")
# --torch-settings words -> train_bench_torch.py flags (joined with +: passive+blas+malloc).
SETTINGS = {"passive": ["--omp-wait", "passive"], "active": ["--omp-wait", "active"],
            "blas": ["--blas-wait", "passive"], "malloc": ["--malloc", "tuned"],
            "skx": ["--openblas-coretype", "SkylakeX"]}
BLAS_CHECK_FAILED = 3   # train_bench_torch.py's exit code when its float32 products are wrong




def run_torch(cmd):
    """Runs train_bench_torch.py: its JSON, or None when its BLAS check failed (exit code 3)."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode == BLAS_CHECK_FAILED:
        print(p.stderr.strip(), flush=True)
        return None
    if p.returncode != 0:
        raise SystemExit(f"train_bench_torch.py failed (exit {p.returncode}): {' '.join(cmd)}\n"
                         f"{p.stderr.strip()[-2000:]}")
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise SystemExit(f"train_bench_torch.py: the last output line is not JSON: {' '.join(cmd)}\n{p.stdout[-2000:]}")


def cpu_has(flag):
    try:
        return any(line.startswith("flags") and flag in line.split() for line in open("/proc/cpuinfo"))
    except OSError:
        return False


def has_bench_train(moe):
    """Whether the moe CLI lists a bench-train subcommand (exit codes of `X --help` prove nothing)."""
    if not os.path.exists(moe):
        raise SystemExit(f"train_compare: no moe CLI at {moe}: build it (make) or pass --moe PATH")
    p = subprocess.run([moe, "--help"], capture_output=True, text=True)
    return any(line.split()[:1] == ["bench-train"] for line in (p.stdout + p.stderr).splitlines())


def make_model(moe, a, path):
    cmd = [moe, "init", *MODEL, "--ctx", str(max(256, a.seq)), "-o", path]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"train_compare: moe init failed (exit {p.returncode}): {' '.join(cmd)}\n"
                         f"{p.stderr.strip()[-2000:]}")


def step_flags(a):
    return ["--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup),
            "--threads", str(a.threads)]


def section(a, moe_runs, moe_med, torch_med, info, skipped, date):
    """The RESULTS.md section: settings, a table of tokens/s, the ratio and moe.cpp's MFU."""
    best_v = max(torch_med, key=lambda v: torch_med[v]["tokens_per_s"])
    best = torch_med[best_v]["tokens_per_s"]
    cmd = (f"bench/train_compare.py --batch {a.batch} --seq {a.seq} --steps {a.steps} --warmup {a.warmup} "
           f"--threads {a.threads} --rounds {a.rounds} --torch-settings {a.torch_settings}")
    lines = [f"## Training: moe.cpp vs PyTorch ({date})", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}. "
             f"Command: `{cmd}`. Model: `moe init {' '.join(MODEL)} --ctx {max(256, a.seq)}` (F32; llama "
             f"attention with 4 heads and RoPE, 8 SwiGLU experts of width 512, softmax top-2 renormalised, "
             f"untied output). Step: batch {a.batch} x seq {a.seq} = {a.batch * a.seq} tokens of uniform "
             "random ids, fresh every step; mean cross-entropy + Switch aux loss (0.01) + router z-loss "
             "(0.001); AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.1 on matrices, clip 1.0); float32, "
             f"{a.threads} threads, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}. "
             f"Medians of {a.rounds} alternating rounds (each tool: median of {a.steps} timed steps after "
             f"{a.warmup} untimed). PyTorch {info.get('torch', '?')} (bench/train_bench_torch.py, the same model "
             f"and step; attention {info.get('attention', '?')} + causal mask, AdamW foreach="
             f"{info.get('adamw_foreach', '?')}): `loop` = per-expert loop as in Hugging Face's Mixtral "
             "block, `sorted` = tokens sorted by expert, one slab per expert. Process settings in "
             "parentheses (none: as the environment has them): `passive` = OMP_WAIT_POLICY=PASSIVE "
             "(OpenMP threads sleep instead of spinning), `blas` = OPENBLAS_THREAD_TIMEOUT=4 (the same "
             "for OpenBLAS's threads), `malloc` = GLIBC_TUNABLES="
             f"{info.get('malloc_tunables', '?')} (glibc keeps freed memory and uses transparent huge "
             "pages: PyTorch allocates fresh tensors every step, and first touches of pages are slow "
             "on these VMs), `skx` = OPENBLAS_CORETYPE=SkylakeX for PyTorch (OpenBLAS's AVX-512 kernels "
             "instead of the environment's; every PyTorch run first checks its float32 products against "
             "float64)." + "".join(f" Not run: {v} ({why})." for v, why in skipped.items()), "",
             "| tool / variant | step ms | tokens/s | moe.cpp / this |", "|---|---|---|---|"]
    if moe_med is not None:
        lines.append(f"| moe.cpp | {moe_med['step_ms']:.0f} | {moe_med['tokens_per_s']:.0f} | - |")
    for v, m in torch_med.items():
        ratio = f"{moe_med['tokens_per_s'] / m['tokens_per_s']:.2f}x" if moe_med is not None else "-"
        lines.append(f"| PyTorch {v} | {m['step_ms']:.0f} | {m['tokens_per_s']:.0f} | {ratio} |")
    lines.append("")
    if moe_med is None:
        lines.append(f"(dry run without `moe bench-train`: PyTorch's best is {best_v}, {best:.0f} tokens/s.)")
    else:
        gpt = moe_med["model_gflop_per_token"]
        lines.append(
            f"**moe.cpp trains at {moe_med['tokens_per_s'] / best:.2f}x the tokens/s of PyTorch's best variant "
            f"({best_v}).** Model FLOPs (forward + backward of every matrix product and of causal attention, "
            f"as `moe bench-train` counts them): {gpt:.4f} GFLOP per token, so moe.cpp reaches "
            f"{moe_med['model_gflops']:.1f} GFLOP/s against its own fp32 GEMM's peak of "
            f"{moe_med['gemm_peak_gflops']:.1f} GFLOP/s measured in the same command on {a.threads} threads "
            f"(medians over rounds): **MFU {100 * moe_med['mfu']:.0f}%** (the median of the rounds' shares, "
            + ", ".join(f"{100 * m['mfu']:.0f}%" for m in moe_runs) + "). PyTorch's best reaches "
            f"{gpt * best:.1f} GFLOP/s of model FLOPs ({100 * gpt * best / moe_med['gemm_peak_gflops']:.0f}% of "
            "that peak).")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe", default=os.path.join(ROOT, "build", "bin", "moe"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--torch-settings", default="default,passive,passive+blas+malloc,passive+blas+malloc+skx",
                    help="process settings to run PyTorch under, each a variant of its own: default "
                         "(the environment as it is) or words joined by +: passive (OMP_WAIT_POLICY="
                         "PASSIVE), active (=ACTIVE), blas (OPENBLAS_THREAD_TIMEOUT=4), malloc (glibc "
                         "malloc tunables, see train_bench_torch.py), skx (OPENBLAS_CORETYPE=SkylakeX); "
                         "the ratio is against the best of all")
    ap.add_argument("--dry-run", action="store_true", help="print the section, do not write RESULTS.md")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    a = ap.parse_args()
    settings = [p for p in a.torch_settings.split(",") if p]
    if not settings or any(p != "default" and any(w not in SETTINGS for w in p.split("+")) for p in settings):
        ap.error("--torch-settings: a comma-separated list of default or words joined by + ("
                 + ", ".join(SETTINGS) + ")")
    if a.rounds < 1 or a.steps < 1 or a.warmup < 0 or a.batch < 1 or a.seq < 1 or a.threads < 1:
        ap.error("--rounds, --steps, --batch, --seq and --threads must be >= 1, --warmup >= 0")
    # As bench/run.sh: older OpenBLAS builds miscompute on these CPUs unless told the core type.
    os.environ.setdefault("OPENBLAS_CORETYPE", "Haswell")
    with_moe = has_bench_train(a.moe)
    if not with_moe and not a.dry_run:
        raise SystemExit(f"train_compare: '{a.moe}' has no bench-train subcommand (moe bench-train -m M.gguf "
                         "--batch B --seq S ... --json); build a moe that has it, or use --dry-run to time "
                         "only the PyTorch side")
    skipped = {}
    if not cpu_has("avx512f"):
        for setting in [p for p in settings if "skx" in p.split("+")]:
            skipped[setting] = "this CPU has no AVX-512"
            settings.remove(setting)
    moe_runs, torch_runs, info = [], [], {}
    with tempfile.TemporaryDirectory(prefix="train_compare.") as tmp:
        model = os.path.join(tmp, "model.gguf")
        make_model(a.moe, a, model)
        for r in range(a.rounds):
            seed = str(100 + r)
            msg = f"round {r}:"
            if with_moe:
                m = benchutil.run_json([a.moe, "bench-train", "-m", model, *step_flags(a), "--seed", seed, "--json"],
                             "moe bench-train")
                missing = [k for k in MOE_KEYS if k not in m]
                if missing:
                    raise SystemExit(f"moe bench-train --json printed no {missing}: {json.dumps(m)}")
                moe_runs.append(m)
                msg += f" moe {m['tokens_per_s']:.0f} tok/s ({m['step_ms']:.0f} ms/step, mfu {m['mfu']:.2f}) |"
            t = {}
            for setting in list(settings):
                cmd = [TORCH_PY, os.path.join(ROOT, "bench", "train_bench_torch.py"), "-m", model,
                       *step_flags(a), "--seed", seed]
                for w in ([] if setting == "default" else setting.split("+")):
                    cmd += SETTINGS[w]
                cmd += [] if r == 0 else ["--no-check-same"]      # the variants' agreement: once
                res = run_torch(cmd)
                if res is None:
                    if r > 0:
                        raise SystemExit(f"train_bench_torch.py: its BLAS check failed in round {r} "
                                         f"but not in round 0: {' '.join(cmd)}")
                    skipped[setting] = "its float32 products disagreed with float64"
                    settings.remove(setting)
                    continue
                info.update(res)
                for v in ("loop", "sorted"):
                    t[v if setting == "default" else f"{v} ({setting})"] = res[v]
            torch_runs.append(t)
            msg += " PyTorch " + ", ".join(f"{v} {x['tokens_per_s']:.0f} tok/s" for v, x in t.items())
            print(msg, flush=True)
    if not torch_runs[0]:
        why = "; ".join(f"{v}: {w}" for v, w in skipped.items())
        raise SystemExit(f"train_compare: no PyTorch variant ran ({why})")
    torch_med = {v: {k: statistics.median(t[v][k] for t in torch_runs) for k in ("step_ms", "tokens_per_s")}
                 for v in torch_runs[0]}
    moe_med = ({k: statistics.median(m[k] for m in moe_runs) for k in MOE_KEYS} if moe_runs else None)
    text = section(a, moe_runs, moe_med, torch_med, info, skipped, datetime.date.today().isoformat())
    print(text)
    if a.dry_run:
        print("(dry run: nothing written)")
        return 0
    benchutil.write_section(a.out, text)
    print(f"written to the top of {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
