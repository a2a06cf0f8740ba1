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
/usr/bin/python3 "$ROOT/bench/compare.py" --moe "$ROOT/build/bin/moe" "$@"
# Every weight type this issue added, and the common mixes, against llama.cpp (decode and prefill).
/usr/bin/python3 "$ROOT/bench/compare.py" --moe "$ROOT/build/bin/moe" --rounds 3 \
  --types Q4_K_M,Q5_K_M,Q3_K_M,Q2_K,IQ4_XS,q4_1,q5_0,q5_1,iq4_nl,MXFP4_MOE
# Quantization quality: every mix against F32 on a trained model (KL divergence, top-1 agreement).
/usr/bin/python3 "$ROOT/bench/quant_quality.py" --moe "$ROOT/build/bin/moe"
/usr/bin/python3 "$ROOT/bench/layer_compare.py" --moe "$ROOT/build/bin/moe" --rounds 3
/usr/bin/python3 "$ROOT/bench/train_compare.py" --moe "$ROOT/build/bin/moe" --rounds 3
