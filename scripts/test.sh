#!/usr/bin/env bash
# Run every test: formatting, lints, unit tests and the integration suites on SQLite and PostgreSQL.
# Installs and starts what is missing (PostgreSQL); safe to run on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

export REPLICHAT_TEST_PG="${REPLICHAT_TEST_PG:-$(scripts/postgres.sh)}"
echo "test.sh: PostgreSQL at ${REPLICHAT_TEST_PG%%@*}@..."

# Throw-away databases left by an interrupted earlier run.
base="${REPLICHAT_TEST_PG%/}"
psql "$base/postgres" -tAc "SELECT datname FROM pg_database WHERE datname LIKE 'replichat_test_%'" 2>/dev/null |
  while read -r db; do [ -n "$db" ] && psql "$base/postgres" -qc "DROP DATABASE IF EXISTS \"$db\"" >/dev/null 2>&1 || true; done

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Two cores: keep the test threads at two so PostgreSQL and the servers under test get CPU too.
cargo test --workspace --locked -- --test-threads "${TEST_THREADS:-2}"

# Drop this run's databases.
psql "$base/postgres" -tAc "SELECT datname FROM pg_database WHERE datname LIKE 'replichat_test_%'" 2>/dev/null |
  while read -r db; do [ -n "$db" ] && psql "$base/postgres" -qc "DROP DATABASE IF EXISTS \"$db\"" >/dev/null 2>&1 || true; done
rm -rf "${TMPDIR:-/tmp}/replichat-tests"
