#!/usr/bin/env bash
# make bench: moe.cpp vs llama.cpp on the same files (q8_0/q4_0, then the other weight types and
# mixes), quantization quality, the MoE layer vs PyTorch, and training vs PyTorch (the whole
# model, the same step), in one run;
# each writes its section of bench/RESULTS.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# These machines run with OPENBLAS_CORETYPE=Haswell (older OpenBLAS builds miscompute on this CPU);
# keep a value that is set, default to it otherwise, so PyTorch's and moe.cpp's BLAS calls run the
# same kernel as on the machines the results are for.
export OPENBLAS_CORETYPE="${OPENBLAS_CORETYPE:-Haswell}"
# The speed issue's models at 128 and 512 prompt tokens, each with the machine's ceilings and the
# decode floor's shares (bench/speed_goals.sh), then speed against prompt length and threads.
"$ROOT/bench/speed_goals.sh" "$@"
/usr/bin/python3 "$ROOT/bench/sweep.py" --moe "$ROOT/build/bin/moe" --shape medium --type Q4_K_M
# moe serve: 1/4/16/64 concurrent streams and an autocannon load run.
/usr/bin/python3 "$ROOT/bench/serve_bench.py" --moe "$ROOT/build/bin/moe"
# moe serve on a conversation: each turn's first token with the cached prompt prefix and without.
/usr/bin/python3 "$ROOT/bench/turns_bench.py" --moe "$ROOT/build/bin/moe"
# Every other weight type and the common mixes, against llama.cpp (decode and prefill); the
# codebook types' files take minutes each to quantize.
/usr/bin/python3 "$ROOT/bench/compare.py" --moe "$ROOT/build/bin/moe" --rounds 3 \
  --types Q5_K_M,Q3_K_M,Q2_K,IQ4_XS,q4_1,q5_0,q5_1,iq4_nl,MXFP4_MOE
/usr/bin/python3 "$ROOT/bench/compare.py" --moe "$ROOT/build/bin/moe" --rounds 3 \
  --types iq1_s,iq1_m,iq2_xxs,iq2_xs,iq2_s,iq3_xxs,iq3_s
# Quantization quality: every mix against F32 on a trained model (KL divergence, top-1 agreement).
/usr/bin/python3 "$ROOT/bench/quant_quality.py" --moe "$ROOT/build/bin/moe"
/usr/bin/python3 "$ROOT/bench/layer_compare.py" --moe "$ROOT/build/bin/moe" --rounds 3
/usr/bin/python3 "$ROOT/bench/train_compare.py" --moe "$ROOT/build/bin/moe" --rounds 3
