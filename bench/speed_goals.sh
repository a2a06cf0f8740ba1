#!/usr/bin/env bash
# The speed issue's cases in one run: the medium model (q8_0, q4_0, Q4_K_M), the Qwen3-30B-A3B-like
# one (q8_0, Q4_K_M) and the DeepSeek-V2-Lite-like one (q8_0, Q4_K_M), each at 128 and 512 prompt
# tokens against llama.cpp, with the machine's ceilings and the decode floor's shares. Arguments
# go to every bench/compare.py (the issue asks for --rounds 5 or more). Each writes its section of
# bench/RESULTS.md. About an hour on the 2-vCPU VM at --rounds 5.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export OPENBLAS_CORETYPE="${OPENBLAS_CORETYPE:-Haswell}"
compare() { /usr/bin/python3 "$ROOT/bench/compare.py" --moe "$ROOT/build/bin/moe" "$@"; }
for p in 128 512; do
  compare --types q8_0,q4_0,Q4_K_M -p "$p" "$@"
  compare --shape qwen3 --types q8_0,Q4_K_M -p "$p" "$@"
  compare --shape deepseek2 --types q8_0,Q4_K_M -p "$p" "$@"
done
