#!/usr/bin/env bash
# Every number in BENCHMARKS.md: builds release binaries, then runs each measurement against real processes
# on this machine and writes the results to bench/results/ and the plots to docs/bench/. About 25 minutes on
# 2 cores. Run it on an otherwise idle machine; each figure is the median of several runs.
#
#   scripts/bench.sh            everything
#   scripts/bench.sh load       one part: disk | load | curve | idle | catchup | chaos | abuse | netsim | plot
set -euo pipefail
cd "$(dirname "$0")/.."

export REPLICHAT_BENCH_PG="${REPLICHAT_BENCH_PG:-$(scripts/postgres.sh)}"
cargo build --release --locked -p replichat -p replichat-bench
# 10,000 sockets on each side of the idle measurement.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

bench=target/release/bench
out=bench/results
what="${1:-all}"
part() { [ "$what" = all ] || [ "$what" = "$1" ]; }

if part disk; then
  # The disk under the replicas: 4 KiB write + fdatasync, one at a time for 60 s (a floor under every
  # acknowledgement's latency; run first, so that it describes the same hour as the load).
  $bench disk --duration-s 60 --out "$out/disk.json"
fi
if part load; then
  # 200 users, as fast as acknowledgements allow: throughput, for (a) relay (b) single (c) sqlite3 (d) pg3.
  $bench load --runs 3 --users 200 --out "$out/load-max.json"
  # The same users at a fixed 1,000 msg/s in all: latency.
  $bench load --runs 3 --users 200 --rate 1000 --out "$out/load-1000.json"
fi
if part curve; then
  # p99 send -> delivered against offered load (the same 200 users at fixed rates, up to past every target's
  # saturation): where each target's knee is. Plotted as docs/bench/latency-curve.svg.
  for rate in 500 1000 2000 4000 8000 16000; do
    $bench load --runs "${CURVE_RUNS:-3}" --users 200 --rate "$rate" --out "$out/curve-$rate.json"
  done
fi
if part idle; then
  $bench idle --runs 3 --connections 10000 --accounts 100 --out "$out/idle.json"
fi
if part catchup; then
  $bench catchup --runs 3 --messages 100000 --out "$out/catchup.json"
fi
if part chaos; then
  # Defaults of replichat (heartbeat 100 ms, election timeout 1000 ms); every 4th cycle kills a backup.
  $bench chaos --cycles 100 --users 20 --rate 200 --out "$out/chaos.json"
fi
if part abuse; then
  # A connection flood, slowloris and 100 clients that resume a 6,000-event history and never read, against
  # one replica, with a normal client and /healthz probed meanwhile (fails if a probe fails).
  $bench abuse --runs 3 --out "$out/abuse.json"
fi
if part netsim; then
  # Three SQLite replicas on simulated separate machines (netsim/src/lib.rs: a network namespace and
  # address each, TLS, a packet delay between replicas made with NFQUEUE since this kernel has no netem), at a
  # 1 ms and a 20 ms round trip: throughput, latency at a fixed rate, and failover under kill -9.
  command -v iptables-legacy >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables >/dev/null)
  # "loopback": the same three replicas on 127.0.0.1 without TLS, run just before, as the reference.
  for rtt in loopback 1 20; do
    net=(); [ "$rtt" = loopback ] || net=(--netsim-rtt-ms "$rtt")
    $bench load --target sqlite3 --runs 3 --users 200 "${net[@]}" --out "$out/netsim-$rtt-max.json"
    $bench load --target sqlite3 --runs 3 --users 200 --rate 500 "${net[@]}" --out "$out/netsim-$rtt-500.json"
    $bench chaos --cycles 30 --users 20 --rate 200 "${net[@]}" --out "$out/netsim-$rtt-chaos.json"
  done
fi
if part plot || [ "$what" = all ]; then
  curve=()
  for f in "$out"/curve-{500,1000,2000,4000,8000,16000}.json; do [ -f "$f" ] && curve+=("$f"); done
  $bench plot --latency "$out/load-1000.json" --chaos "$out/chaos.json" --out docs/bench \
    ${curve[@]+--curve "${curve[@]}"}
fi
