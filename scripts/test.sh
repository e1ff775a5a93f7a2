#!/usr/bin/env bash
# Run every test: formatting, lints, unit tests, the chat suite on SQLite and PostgreSQL, the cluster suite
# (real replica processes), and the browser end-to-end suite. Installs and starts what is missing (PostgreSQL,
# iptables, the wasm32 target, wasm-bindgen, Chromium, npm packages); safe to run on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

export REPLICHAT_TEST_PG="${REPLICHAT_TEST_PG:-$(scripts/postgres.sh)}"

# The partition test cuts replicas apart with iptables rules on loopback addresses (and removes them); the
# simulated-network tests (cluster suite and bench) use iptables-legacy inside network namespaces.
if ! command -v iptables >/dev/null 2>&1 || ! command -v iptables-legacy >/dev/null 2>&1; then
  echo "test.sh: installing iptables"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables) >/dev/null
fi
echo "test.sh: PostgreSQL at ${REPLICHAT_TEST_PG%%@*}@..."

# Throw-away databases left by an interrupted earlier run.
base="${REPLICHAT_TEST_PG%/}"
psql "$base/postgres" -tAc "SELECT datname FROM pg_database WHERE datname LIKE 'replichat_test_%'" 2>/dev/null |
  while read -r db; do [ -n "$db" ] && psql "$base/postgres" -qc "DROP DATABASE IF EXISTS \"$db\"" >/dev/null 2>&1 || true; done

cargo fmt --all -- --check
cargo clippy -p replichat -p replichat-shared -p replichat-bench -p replichat-netsim --all-targets --locked -- -D warnings
# The browser app only builds for wasm32.
rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
cargo clippy -p replichat-frontend --target wasm32-unknown-unknown --locked -- -D warnings
# Two cores: keep the test threads at two so PostgreSQL and the servers under test get CPU too; the cluster
# suite runs three replica processes per test, so one test at a time.
cargo test -p replichat -p replichat-shared --locked --lib --bins --test chat -- --test-threads "${TEST_THREADS:-2}"
cargo test -p replichat -p replichat-shared --locked --doc
# Every input of the fuzz corpora (fuzz/corpus, fuzz/seeds) through the same checks as the cargo-fuzz targets.
cargo test -p replichat --locked --test fuzz_corpus
# Includes the failover, partition and full-disk tests on simulated separate machines (netsim.rs: network
# namespaces made and removed by the tests; root needed), one at a time like every cluster test.
# Built first and flushed to disk before it runs: otherwise the first cluster tests fsync while the disk still
# writes back the freshly linked binaries (two fresh-clone CIs saw the three replicas of the suite's first
# failover test all stall in the same 0.6 s and 1.7 s, enough for an election).
cargo test -p replichat --locked --test cluster --no-run
sync
cargo test -p replichat --locked --test cluster -- --test-threads 1
# The bench's unit tests and the short chaos run (kill -9 under load, then the lost/duplicate checker), on
# the replichat binary the cluster suite built.
cargo build -p replichat --bin replichat --locked
cargo test -p replichat-bench --locked -- --test-threads 1

# The browser app end to end: Playwright drives Debian's Chromium against real three-replica clusters of
# release builds (builds the app and the binary, installs Chromium and the npm packages when missing).
scripts/e2e.sh

# Drop this run's databases.
psql "$base/postgres" -tAc "SELECT datname FROM pg_database WHERE datname LIKE 'replichat_test_%'" 2>/dev/null |
  while read -r db; do [ -n "$db" ] && psql "$base/postgres" -qc "DROP DATABASE IF EXISTS \"$db\"" >/dev/null 2>&1 || true; done
rm -rf "${TMPDIR:-/tmp}/replichat-tests"
