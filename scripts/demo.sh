#!/usr/bin/env bash
# The demo: make a small Mixtral-style MoE model with a byte-level BPE vocabulary, inspect it,
# generate text from it, and time it. The weights are random, so the text is noise; the
# training issue turns this into train-then-generate on a real corpus.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOE="$ROOT/build/bin/moe"
OUT="$ROOT/build/demo"
mkdir -p "$OUT"
echo "== a byte-level BPE vocabulary (llama3 pre-tokenizer), trained on the test corpus"
python3 "$ROOT/tests/tokenizer/make_vocab.py" "$OUT/vocabs" >/dev/null
echo "== moe init: 4-layer Mixtral-style model, 8 experts top-2, GQA, q8_0"
"$MOE" init --arch llama --layers 4 --dim 512 --ffn 1024 --experts 8 --experts-used 2 \
  --heads 8 --kv-heads 4 --type q8_0 --seed 1 --tokenizer "$OUT/vocabs/bpe_llama3.gguf" \
  -o "$OUT/mixtral-demo.gguf"
echo "== moe inspect"
"$MOE" inspect "$OUT/mixtral-demo.gguf" | head -22
echo "== moe run: sampled text (temp 0.8, top-k 40, top-p 0.95)"
"$MOE" run -m "$OUT/mixtral-demo.gguf" -p "The experts of a mixture" -n 32 --seed 3 --ignore-eos
echo "== moe run --json: greedy token ids with top-3 log-probs (first 300 characters)"
"$MOE" run -m "$OUT/mixtral-demo.gguf" -p "The experts of a mixture" -n 4 --temp 0 --json --top-logprobs 3 | cut -c1-300
echo "== moe bench: 128 prompt + 32 generated random tokens"
"$MOE" bench -m "$OUT/mixtral-demo.gguf" -p 128 -n 32
