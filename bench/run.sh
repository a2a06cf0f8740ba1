#!/usr/bin/env bash
# make bench: moe.cpp vs llama.cpp on the same files, in one run; writes bench/RESULTS.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec /usr/bin/python3 "$ROOT/bench/compare.py" --moe "$ROOT/build/bin/moe" "$@"
