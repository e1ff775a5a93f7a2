#!/usr/bin/env bash
# Start a three-replica replichat cluster on this machine, serving the browser app, until Ctrl-C.
#
#   scripts/demo.sh              # SQLite, one file per replica under ./data
#   scripts/demo.sh --postgres   # one PostgreSQL database per replica (starts the machine's PostgreSQL)
#
# Replica i listens on 127.0.0.1:$((BASE_PORT + i)) (BASE_PORT defaults to 8080). Builds the browser app
# (scripts/build-frontend.sh) and a release binary first. Waits until a primary is elected, prints every
# replica's URL and role, and stops all three on Ctrl-C. Logs go to data/node<i>.log.
set -euo pipefail
cd "$(dirname "$0")/.."

engine=sqlite
for arg in "$@"; do
  case "$arg" in
    --postgres) engine=postgres ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
base_port="${BASE_PORT:-8080}"
replicas=3
# The cluster secret, the SQLite databases (password hashes, every message) and the logs are for this user
# only: everything created from here on is 0600 (directories 0700), and files from earlier runs are tightened.
umask 077
mkdir -p data
chmod 700 data
secret_file=data/cluster-secret
[ -s "$secret_file" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$secret_file"
for f in "$secret_file" data/node*.db data/node*.db-wal data/node*.db-shm data/node*.log; do
  if [ -e "$f" ]; then chmod 600 "$f"; fi
done
export REPLICHAT_CLUSTER_SECRET="$(cat "$secret_file")"

scripts/build-frontend.sh
cargo build --release --locked -p replichat
bin=target/release/replichat

peers=""
for i in $(seq 0 $((replicas - 1))); do
  peers="${peers:+$peers,}$i=http://127.0.0.1:$((base_port + i))"
done

db_url() {
  if [ "$engine" = postgres ]; then
    echo "$pg_base/replichat_demo_$1"
  else
    echo "sqlite://data/node$1.db"
  fi
}
if [ "$engine" = postgres ]; then
  pg_base="$(scripts/postgres.sh)"
  for i in $(seq 0 $((replicas - 1))); do
    psql "$pg_base/postgres" -tAc "SELECT 1 FROM pg_database WHERE datname = 'replichat_demo_$i'" | grep -q 1 ||
      psql "$pg_base/postgres" -qc "CREATE DATABASE replichat_demo_$i"
  done
fi

pids=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "demo.sh: stopping the replicas"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait || true
}
trap stop INT TERM EXIT

for i in $(seq 0 $((replicas - 1))); do
  "$bin" serve --id "$i" --listen "127.0.0.1:$((base_port + i))" --peers "$peers" --db "$(db_url "$i")" \
    --static-dir "$PWD/static" >"data/node$i.log" 2>&1 &
  pids+=("$!")
done

status() { curl -fsS --max-time 1 "http://127.0.0.1:$((base_port + $1))/api/cluster" 2>/dev/null || true; }
echo "demo.sh: waiting for an election"
leader=""
for _ in $(seq 1 150); do
  leader=$(status 0 | sed -n 's/.*"leader":\([0-9][0-9]*\).*/\1/p')
  if [ -n "$leader" ] && status "$leader" | grep -q '"role":"primary"'; then break; fi
  leader=""
  sleep 0.2
done
[ -n "$leader" ] || { echo "demo.sh: no primary elected; see data/node*.log" >&2; exit 1; }

echo
echo "replichat cluster ($engine), primary: replica $leader"
for i in $(seq 0 $((replicas - 1))); do
  role=$(status "$i" | sed -n 's/^{"id":[0-9]*,"role":"\([a-z]*\)".*/\1/p')
  printf '  replica %s  http://127.0.0.1:%s  %s\n' "$i" "$((base_port + i))" "${role:-down}"
done
echo
echo "  chat in your browser:  http://127.0.0.1:$base_port/   (any replica serves it; it finds the primary)"
echo "  admin page:           http://127.0.0.1:$base_port/admin"
echo "  WebSocket API:        ws://127.0.0.1:$((base_port + leader))/ws   cluster JSON: http://127.0.0.1:$base_port/api/cluster"
echo "  Ctrl-C stops all three."
wait
