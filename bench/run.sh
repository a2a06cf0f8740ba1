#!/usr/bin/env bash
# make bench: moe.cpp vs llama.cpp on the same files, the MoE layer vs PyTorch, and training vs
# PyTorch (the whole model, the same step), in one run;
# each writes its section of bench/RESULTS.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# These machines run with OPENBLAS_CORETYPE=Haswell (older OpenBLAS builds miscompute on this CPU);
# keep a value that is set, default to it otherwise, so PyTorch's and moe.cpp's BLAS calls run the
# same kernel as on the machines the results are for.
export OPENBLAS_CORETYPE="${OPENBLAS_CORETYPE:-Haswell}"
/usr/bin/python3 "$ROOT/bench/compare.py" --moe "$ROOT/build/bin/moe" "$@"
/usr/bin/python3 "$ROOT/bench/layer_compare.py" --moe "$ROOT/build/bin/moe" --rounds 3
/usr/bin/python3 "$ROOT/bench/train_compare.py" --moe "$ROOT/build/bin/moe" --rounds 3
