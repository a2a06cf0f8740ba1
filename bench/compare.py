#!/usr/bin/env python3
"""End-to-end speed of moe.cpp against llama.cpp (node-llama-cpp's prebuilt CPU build).

Both engines run the same GGUF files (the issue's medium model: 8 layers, dim 1024, expert ffn
2816, 8 experts top-2, vocab 32000; Q8_0 and Q4_0), on random tokens (never one repeated token),
moe.cpp on -t threads. Runs alternate moe / llama.cpp, one fresh process each, so drift of the
machine hits both alike; each tool reports speeds after an untimed warm-up, and the medians over
rounds are compared. llama.cpp gets its best configuration: it runs at 1 and at -t threads
every round (--llama-threads), each pinned and not (--llama-pin), with flash attention on and
off (--llama-flash), and its best median prefill and best median decode are the ones compared
(on the 2-vCPU VMs its decode is often faster on one thread: ggml starts its threads anew for
every graph). The ratios and the command go to bench/RESULTS.md.
--types takes weight types and llama.cpp mixes (written by moe quantize).
"""
import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402
from benchutil import cpu_name  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEDIUM = ["--arch", "llama", "--layers", "8", "--dim", "1024", "--ffn", "2816", "--experts", "8",
          "--experts-used", "2", "--heads", "16", "--kv-heads", "8", "--vocab", "32000"]
# Many small experts, like Qwen3-30B-A3B scaled to this machine: dim 2048, 64 experts top-8 of
# width 768, GQA 32/4 heads of 128, 4 layers.
QWEN3 = ["--arch", "qwen3moe", "--layers", "4", "--dim", "2048", "--ffn", "768", "--experts", "64",
         "--experts-used", "8", "--heads", "32", "--kv-heads", "4", "--head-dim", "128",
         "--vocab", "32000"]
# DeepSeek-V2-Lite-like, scaled: deepseek2 with MLA (16 heads, qk_nope 128, qk_rope 64, v 128,
# kv_lora 512, plain attn_q), 1 leading dense block then 3 MoE blocks of 64 experts top-6 of
# width 1536 (a multiple of 256, so Q4_K fits ffn_down) and 2 shared experts.
DEEPSEEK = ["--arch", "deepseek2", "--layers", "4", "--dim", "1024", "--ffn", "1536", "--experts", "64",
            "--experts-used", "6", "--heads", "16", "--qk-nope", "128", "--qk-rope", "64", "--v-head-dim", "128",
            "--kv-lora-rank", "512", "--leading-dense", "1", "--dense-ffn", "5632", "--shared-experts", "2",
            "--vocab", "32000"]
SHAPES = {"medium": (MEDIUM, "medium model (8 layers, dim 1024, expert ffn 2816, 8 experts top-2, "
                             "vocab 32000)"),
          "qwen3": (QWEN3, "Qwen3-30B-A3B-like model (qwen3moe, 4 layers, dim 2048, 64 experts top-8 "
                           "of width 768, 32/4 heads of 128, vocab 32000)"),
          "deepseek2": (DEEPSEEK, "DeepSeek-V2-Lite-like model (deepseek2, MLA with 16 heads, qk_nope 128, "
                                  "qk_rope 64, kv_lora 512; dim 1024, 1 dense + 3 MoE blocks of 64 experts "
                                  "top-6 of width 1536 and 2 shared experts, vocab 32000)")}




def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moe", required=True)
    ap.add_argument("--types", default="q8_0,q4_0",
                    help="weight types (moe init --type) or llama.cpp mixes (Q4_K_M: moe quantize "
                         "of the q8_0 file, as llama-quantize --allow-requantize would write it)")
    ap.add_argument("--pinning", action="store_true",
                    help="also time moe.cpp with its pool unpinned (MOE_NO_PIN=1)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-t", type=int, default=2)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="medium")
    ap.add_argument("--llama-threads", default=None,
                    help="thread counts llama.cpp runs at in every round (default: 1 and -t); its best "
                         "median prefill and its best median decode are the ones compared")
    ap.add_argument("--llama-pin", choices=("both", "on", "off"), default="both",
                    help="llama.cpp with its threads pinned to CPUs (llama_bench.mjs --pin), unpinned, or both "
                         "as separate candidates (default)")
    ap.add_argument("--llama-flash", choices=("both", "on", "off"), default="both",
                    help="llama.cpp with flash attention on, off, or both as separate candidates (default)")
    ap.add_argument("--cache-type", choices=("f32", "f16"), default="f16",
                    help="KV cache of both engines (f16: llama.cpp's default)")
    ap.add_argument("--mla", choices=("auto", "absorbed", "expanded"), default="auto",
                    help="moe bench --mla: deepseek2's attention form for the prompt (auto: llama.cpp's absorbed "
                         "form on quantized attn_k_b/attn_v_b; expanded: fewer multiply-adds, other roundings)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    a = ap.parse_args()
    shape_args, shape_text = SHAPES[a.shape]
    try:
        llama_threads = sorted({int(x) for x in (a.llama_threads or f"1,{a.t}").split(",")})
    except ValueError:
        raise SystemExit(f"--llama-threads takes thread counts separated by commas, got {a.llama_threads!r}")
    if min(llama_threads) < 1:
        raise SystemExit(f"--llama-threads: thread counts must be >= 1, got {a.llama_threads!r}")
    pins = {"both": (False, True), "on": (True,), "off": (False,)}[a.llama_pin]
    flashes = {"both": (False, True), "on": (True,), "off": (False,)}[a.llama_flash]
    # llama.cpp's candidate configurations: every thread count, pinned and / or not, flash
    # attention on and / or off.
    configs = [(lt, pin, fa) for lt in llama_threads for pin in pins for fa in flashes]
    label = lambda c: f"{c[0]}t{' pinned' if c[1] else ''}{' fa' if c[2] else ''}"
    work = os.path.join(ROOT, "build", "bench")
    os.makedirs(work, exist_ok=True)
    rows = []
    # The machine's ceilings, measured in this run (before and after the comparisons; the higher
    # bandwidth of the two is the floor's, so a busy moment cannot flatter the shares).
    machine = [benchutil.run_json([a.moe, "bench-machine", "-t", str(a.t), "--json"], "moe bench-machine")]
    probes = []  # read GB/s around each moe.cpp run and after each round
    probe = lambda what: benchutil.run_json([a.moe, "bench-machine", "-t", str(a.t), "--mib", "512", "-r", "3",
                                             "--read-only", "--json"], what)["read_gbs"]
    for t in a.types.split(","):
        path = os.path.join(work, f"{a.shape}-{t}.gguf")
        if not os.path.exists(path):
            print(f"making {path}", flush=True)
            if t in ("q8_0", "q4_0"):
                subprocess.run([a.moe, "init", *shape_args, "--type", t, "--seed", "7", "-o", path], check=True)
            else:  # from the q8_0 file: a mix by llama.cpp's rules, a single type --pure
                src = os.path.join(work, f"{a.shape}-q8_0.gguf")
                if not os.path.exists(src):
                    subprocess.run([a.moe, "init", *shape_args, "--type", "q8_0", "--seed", "7", "-o", src],
                                   check=True)
                subprocess.run([a.moe, "quantize", src, path, "--type", t, "-q"]
                               + ([] if t.upper() == t else ["--pure"]), check=True)
        size = os.path.getsize(path)
        res = {"moe": {"pp": [], "tg": [], "rss": []}, "unpinned": {"pp": [], "tg": []}}
        for c in configs:
            res[label(c)] = {"pp": [], "tg": []}
        for r in range(a.rounds):
            # The read bandwidth just before and just after moe.cpp's run: on this shared VM it moves
            # by a third within minutes, so the decode's share is also taken against the bandwidth
            # of its own moment (the higher of the two), not only against the run's best probe.
            before = probe("moe bench-machine (probe before moe bench)")
            m = benchutil.run_json([a.moe, "bench", "-m", path, "-p", str(a.p), "-n", str(a.n), "-t", str(a.t),
                          "--seed", str(100 + r), "--cache-type", a.cache_type, "--mla", a.mla, "--json"], "moe bench")
            res["moe"]["pp"].append(m["prefill_tokens_per_s"])
            res["moe"]["tg"].append(m["decode_tokens_per_s"])
            res["moe"]["rss"].append(m["peak_rss_bytes"])
            res["moe"].setdefault("bytes", []).append(m["weight_bytes_per_token"] + m["kv_bytes_per_token"])
            res["moe"].setdefault("macs", []).append(m["weight_macs_per_token"])
            after = probe("moe bench-machine (probe after moe bench)")
            probes += [before, after]
            res["moe"].setdefault("share_here", []).append(
                m["decode_tokens_per_s"] * res["moe"]["bytes"][-1] / (max(before, after) * 1e9))
            if a.pinning:
                u = benchutil.run_json(["env", "MOE_NO_PIN=1", a.moe, "bench", "-m", path, "-p", str(a.p),
                                        "-n", str(a.n), "-t", str(a.t), "--seed", str(100 + r),
                                        "--cache-type", a.cache_type, "--mla", a.mla, "--json"],
                                       "moe bench (unpinned)")
                res["unpinned"]["pp"].append(u["prefill_tokens_per_s"])
                res["unpinned"]["tg"].append(u["decode_tokens_per_s"])
            said = []
            for c in configs:
                l = benchutil.run_json(["node", os.path.join(ROOT, "bench", "llama_bench.mjs"), "-m", path,
                                        "-p", str(a.p), "-n", str(a.n), "-t", str(c[0]), "--seed", str(100 + r),
                                        "--decode", "random", "--repeat", "1", "--cache-type", a.cache_type,
                                        "--flash-attn", "on" if c[2] else "off"]
                                       + (["--pin"] if c[1] else []),
                                       "llama_bench.mjs")
                res[label(c)]["pp"].append(l["prefill_tokens_per_s"])
                res[label(c)]["tg"].append(l["decode_tokens_per_s"])
                said.append(f"{label(c)} pp {l['prefill_tokens_per_s']:.1f} tg {l['decode_tokens_per_s']:.1f}")
            # The read bandwidth again after every round (a short probe): the shared VM's bandwidth
            # moves by a third within one run, and the floor takes the highest value seen.
            probes.append(probe("moe bench-machine (probe after the round)"))
            print(f"{t} round {r}: moe pp {m['prefill_tokens_per_s']:.1f} tg {m['decode_tokens_per_s']:.1f} "
                  f"(read {before:.1f} / {after:.1f} GB/s around it, {100 * res['moe']['share_here'][-1]:.0f}% of the floor there) | "
                  f"llama.cpp {', '.join(said)} | read {probes[-1]:.1f} GB/s", flush=True)
        med = {k: {kk: statistics.median(v) if v else 0.0 for kk, v in d.items()} for k, d in res.items()}
        # llama.cpp in its best configuration: the candidate with the best median, per metric.
        med["llama"] = {}
        for metric in ("pp", "tg"):
            best = max(configs, key=lambda c: med[label(c)][metric])
            med["llama"][metric] = med[label(best)][metric]
            med["llama"][metric + "_threads"] = label(best)
        rows.append((t, size, med))
    machine.append(benchutil.run_json([a.moe, "bench-machine", "-t", str(a.t), "--json"], "moe bench-machine"))
    bw = max([x["read_gbs"] for x in machine] + probes) * 1e9
    # Prefill's ceiling: a token's weight multiply-adds at the machine's rate for the kernels that
    # run them (int8 dot products for the quantized types, fp32 FMAs for the float ones).
    int8_macs = max(x["int8_gops"] for x in machine) / 2 * 1e9
    fp32_macs = max(x["fp32_gflops"] for x in machine) / 2 * 1e9
    date = datetime.date.today().isoformat()
    cmd = (f"bench/compare.py --shape {a.shape} --types {a.types} -p {a.p} -n {a.n} -t {a.t} --rounds {a.rounds}"
           + (" --pinning" if a.pinning else "") + (f" --llama-threads {a.llama_threads}" if a.llama_threads else "")
           + (f" --llama-pin {a.llama_pin}" if a.llama_pin != "both" else "")
           + (f" --llama-flash {a.llama_flash}" if a.llama_flash != "both" else "")
           + (f" --cache-type {a.cache_type}" if a.cache_type != "f16" else "")
           + (f" --mla {a.mla}" if a.mla != "auto" else ""))
    lines = [f"## End-to-end: moe.cpp vs llama.cpp ({date})", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}. "
             f"Command: `{cmd}`. The {shape_text}; "
             f"q8_0 and q4_0 written by `moe init`, the others by `moe quantize` from the q8_0 "
             f"file (upper-case names are llama.cpp mixes, lower-case ones `--pure`), random tokens, moe.cpp on {a.t} threads"
             + (f" with `--mla {a.mla}`" if a.mla != "auto" else "") + f", medians of {a.rounds} alternating rounds. "
             f"llama.cpp = node-llama-cpp 3.21.1 prebuilt CPU build with an {a.cache_type.upper()} KV cache (moe.cpp's cache is {a.cache_type.upper()} too), "
             f"run every round at {' and '.join(str(x) for x in llama_threads)} thread(s)"
             + {"both": ", each with its threads pinned to CPUs and not", "on": ", its threads pinned to CPUs",
                "off": ", its threads not pinned"}[a.llama_pin]
             + {"both": ", with flash attention on and off", "on": ", with flash attention on",
                "off": ", with flash attention off"}[a.llama_flash]
             + "; its best median prefill and its best median decode are compared (the configuration that gave each in brackets; fa = flash attention on).", "",
             "Ceilings (`moe bench-machine`, the same run, before / after): memory read " +
             " / ".join(f"{x['read_gbs_1t']:.1f}" for x in machine) + " GB/s with 1 pinned thread, " +
             " / ".join(f"{x['read_gbs']:.1f}" for x in machine) + f" GB/s with {a.t}; fp32 FMA " +
             " / ".join(f"{x['fp32_gflops']:.0f}" for x in machine) + " GFLOP/s, int8 multiply-add " +
             " / ".join(f"{x['int8_gops']:.0f}" for x in machine) + f" GOP/s ({machine[0]['target']}, {a.t} threads)"
             + (f"; memory read with {a.t} threads in the run's probes (around each moe.cpp run and after each round) {min(probes):.1f} to {max(probes):.1f} GB/s" if probes else "")
             + ". Decode floor = the bytes one token reads (the weights of the dense part, the k routed experts and "
             f"the head, and the KV cache at the mean context) / {bw / 1e9:.1f} GB/s (the highest read bandwidth "
             "measured in the run); a share is the decode speed "
             "over that floor. The share at its moment: each round's moe.cpp decode over the floor at the higher of "
             "two read probes taken just before and just after that run (`moe bench-machine --read-only`), median "
             "over rounds. Prefill ceiling = the multiply-add rate of the run's best probe (int8 for the "
             "quantized types, fp32 for f32/f16/bf16) / a token's weight multiply-adds (`weight_macs_per_token`; "
             "attention over the cache not counted, so the ceiling is above what is reachable).", "",
             "| type | file MiB | moe prefill tok/s | llama.cpp prefill tok/s | ratio | moe decode tok/s | llama.cpp decode tok/s | ratio | MB read / token | decode floor tok/s | moe share | moe share at its moment | llama.cpp share | moe peak RSS MiB | M MAC / token | prefill ceiling tok/s | moe prefill share |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t, size, m in rows:
        floor = bw / m['moe']['bytes']
        ceiling = (fp32_macs if t.lower() in ("f32", "f16", "bf16") else int8_macs) / m['moe']['macs']
        lines.append(f"| {t} | {size / 2**20:.0f} | {m['moe']['pp']:.1f} | {m['llama']['pp']:.1f} ({m['llama']['pp_threads']}) | "
                     f"{m['moe']['pp'] / m['llama']['pp']:.2f}x | {m['moe']['tg']:.1f} | {m['llama']['tg']:.1f} ({m['llama']['tg_threads']}) | "
                     f"{m['moe']['tg'] / m['llama']['tg']:.2f}x | {m['moe']['bytes'] / 1e6:.1f} | {floor:.1f} | "
                     f"{100 * m['moe']['tg'] / floor:.0f}% | {100 * m['moe']['share_here']:.0f}% | "
                     f"{100 * m['llama']['tg'] / floor:.0f}% | "
                     f"{m['moe']['rss'] / 2**20:.0f} | {m['moe']['macs'] / 1e6:.1f} | {ceiling:.0f} | "
                     f"{100 * m['moe']['pp'] / ceiling:.0f}% |")
    if a.pinning:
        lines += ["", "Thread pinning (same runs): moe.cpp's persistent pool with workers pinned to distinct "
                  "CPUs (default) vs the same pool left to the scheduler (`MOE_NO_PIN=1`).", "",
                  "| type | pinned prefill | unpinned prefill | pinned decode | unpinned decode |",
                  "|---|---|---|---|---|"]
        for t, size, m in rows:
            lines.append(f"| {t} | {m['moe']['pp']:.1f} | {m['unpinned']['pp']:.1f} | {m['moe']['tg']:.1f} | "
                         f"{m['unpinned']['tg']:.1f} |")
    section = "\n".join(lines) + "\n"
    print(section)
    benchutil.write_section(a.out, section)


if __name__ == "__main__":
    sys.exit(main())
