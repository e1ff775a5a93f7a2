#!/usr/bin/env bash
# Build the browser app into static/pkg: the Leptos crate for wasm32, then wasm-bindgen's JS glue, then
# wasm-opt -Oz. Installs what is missing: the wasm32 target, the wasm-bindgen CLI of exactly the version in
# Cargo.lock, and binaryen's wasm-opt (npm, tools/binaryen).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  rustup target add wasm32-unknown-unknown
fi

version=$(awk '$1 == "name" && $3 == "\"wasm-bindgen\"" { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)
[ -n "$version" ] || { echo "build-frontend.sh: no wasm-bindgen in Cargo.lock" >&2; exit 1; }
if ! command -v wasm-bindgen >/dev/null 2>&1 || [ "$(wasm-bindgen --version | awk '{print $2}')" != "$version" ]; then
  echo "build-frontend.sh: installing wasm-bindgen-cli $version"
  # --locked pins the CLI's own dependencies; if one of them is not on the registry, resolve afresh.
  cargo install wasm-bindgen-cli --version "=$version" --locked || cargo install wasm-bindgen-cli --version "=$version"
fi

cargo build --locked -p replichat-frontend --target wasm32-unknown-unknown --profile wasm-release
wasm-bindgen --target web --no-typescript --out-dir static/pkg \
  target/wasm32-unknown-unknown/wasm-release/replichat_frontend.wasm
# Binaryen's optimiser, for size: it removes what rustc and wasm-bindgen leave (names, dead code) and shrinks
# the rest (about 1.73 MB -> 0.65 MB; 389 KB -> 246 KB gzipped on this build). From npm (tools/binaryen, pinned
# by its lockfile): Debian's binaryen 108 turns wasm-bindgen's externref table into one the browser refuses.
if [ ! -x tools/binaryen/node_modules/.bin/wasm-opt ]; then
  echo "build-frontend.sh: installing binaryen's wasm-opt (npm)"
  npm ci --prefix tools/binaryen --no-audit --no-fund >/dev/null
fi
tools/binaryen/node_modules/.bin/wasm-opt -Oz --enable-bulk-memory --enable-sign-ext \
  --enable-nontrapping-float-to-int --enable-mutable-globals --enable-reference-types --enable-multivalue \
  static/pkg/replichat_frontend_bg.wasm -o static/pkg/replichat_frontend_bg.wasm
size=$(wc -c < static/pkg/replichat_frontend_bg.wasm)
gzipped=$(gzip -9 -c static/pkg/replichat_frontend_bg.wasm | wc -c)
echo "build-frontend.sh: static/pkg/replichat_frontend_bg.wasm is $size bytes, $gzipped gzipped"
