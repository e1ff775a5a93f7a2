#!/usr/bin/env bash
# Build the browser app into static/pkg: the Leptos crate for wasm32, then wasm-bindgen's JS glue.
# Installs what is missing: the wasm32 target, and the wasm-bindgen CLI of exactly the version in Cargo.lock.
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
size=$(wc -c < static/pkg/replichat_frontend_bg.wasm)
gzipped=$(gzip -9 -c static/pkg/replichat_frontend_bg.wasm | wc -c)
echo "build-frontend.sh: static/pkg/replichat_frontend_bg.wasm is $size bytes, $gzipped gzipped"
