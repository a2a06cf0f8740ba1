#!/usr/bin/env bash
# The demo: make a small Mixtral-style MoE model, inspect it, generate from it, and time it.
# (The training issue turns this into train-then-generate on a real corpus.)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOE="$ROOT/build/bin/moe"
OUT="$ROOT/build/demo"
mkdir -p "$OUT"
echo "== moe init: 4-layer Mixtral-style model, 8 experts top-2, q8_0"
"$MOE" init --arch llama --layers 4 --dim 512 --ffn 1024 --experts 8 --experts-used 2 \
  --heads 8 --kv-heads 4 --vocab 8000 --type q8_0 --seed 1 -o "$OUT/mixtral-demo.gguf"
echo "== moe inspect (header)"
"$MOE" inspect "$OUT/mixtral-demo.gguf" | head -20
echo "== moe run: greedy, 24 tokens from a token-id prompt (random weights: the ids are noise)"
"$MOE" run -m "$OUT/mixtral-demo.gguf" --prompt-ids 1,15,400,7,2048 -n 24 --temp 0 --ignore-eos
echo "== moe bench: 128 prompt + 32 generated random tokens"
"$MOE" bench -m "$OUT/mixtral-demo.gguf" -p 128 -n 32
