#!/usr/bin/env bash
# Start this machine's PostgreSQL 15 if it is stopped, and make sure the `replichat` role exists (password
# `replichat`, may create databases). Prints the server URL to use, e.g. for REPLICHAT_TEST_PG.
# Idempotent; needs root (or the postgres user) on a Debian machine with postgresql-15 installed.
set -euo pipefail

if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  echo "postgres.sh: PostgreSQL is not installed; installing postgresql" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
fi
version=$(pg_lsclusters -h | awk 'NR==1 {print $1}')
cluster=$(pg_lsclusters -h | awk 'NR==1 {print $2}')
if [ -z "$version" ]; then
  echo "postgres.sh: no PostgreSQL cluster found (pg_lsclusters is empty)" >&2
  exit 1
fi
if ! pg_lsclusters -h | awk 'NR==1 {print $4}' | grep -q online; then
  pg_ctlcluster "$version" "$cluster" start >&2
fi
port=$(pg_lsclusters -h | awk 'NR==1 {print $3}')
for _ in $(seq 1 60); do
  pg_isready -q -h 127.0.0.1 -p "$port" && break
  sleep 0.5
done
pg_isready -q -h 127.0.0.1 -p "$port" || { echo "postgres.sh: PostgreSQL did not become ready" >&2; exit 1; }

as_postgres() { if [ "$(id -un)" = postgres ]; then "$@"; else su postgres -c "$(printf '%q ' "$@")"; fi; }
if ! as_postgres psql -p "$port" -tAc "SELECT 1 FROM pg_roles WHERE rolname = 'replichat'" | grep -q 1; then
  as_postgres psql -p "$port" -q -c "CREATE ROLE replichat LOGIN CREATEDB PASSWORD 'replichat'" >&2
fi
echo "postgres://replichat:replichat@127.0.0.1:${port}"
