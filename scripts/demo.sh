#!/usr/bin/env bash
# Start replichat on the embedded default (SQLite) and keep it running until Ctrl-C.
# Builds a release binary first. Data lives under ./data (delete it to start over).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p replichat
mkdir -p data
echo "demo.sh: starting replica 0 on http://127.0.0.1:8080 (WebSocket: ws://127.0.0.1:8080/ws); Ctrl-C stops it"
exec target/release/replichat serve --id 0 --listen 127.0.0.1:8080 --db sqlite://data/node0.db
