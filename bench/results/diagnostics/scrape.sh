#!/bin/bash
# usage: [BIN=path/to/replichat] scrape.sh target
# Runs a 1-run `bench load` of `target` and scrapes /metrics of every replica at t=11 s and t=16 s (5 s apart,
# in the measured part of the run), then prints what each series grew by in those 5 s.
cd "$(dirname "$0")/../../.."
rm -f /tmp/m-$1-*.txt
target/release/bench load ${BIN:+--replichat $BIN} --target $1 --runs 1 --duration-s 10 --warmup-s 2 > /tmp/scrape-$1.out 2>&1 &
bp=$!
ports() { ps -eo args= | grep -E "^[^ ]*replichat[^ ]* serve " | grep -o "listen 127.0.0.1:[0-9]*" | cut -d: -f2; }
# wait until the replicas run
for i in $(seq 1 100); do [ -n "$(ports)" ] && break; sleep 0.2; done
sleep 9
for a in $(ports); do curl -s 127.0.0.1:$a/metrics > /tmp/m-$1-$a-1.txt; done
sleep 5
for a in $(ports); do curl -s 127.0.0.1:$a/metrics > /tmp/m-$1-$a-2.txt; done
wait $bp
for a in $(ls /tmp/m-$1-*-1.txt | sed "s|/tmp/m-$1-||;s|-1.txt||"); do
  echo "node port $a:"
  for k in replichat_log_append_seconds_sum replichat_log_append_seconds_count replichat_log_append_entries_sum replichat_log_append_entries_count replichat_log_append_wait_seconds_sum replichat_apply_seconds_sum replichat_apply_seconds_count replichat_apply_entries_sum replichat_messages_stored_total; do
    v1=$(grep "^$k " /tmp/m-$1-$a-1.txt | awk '{print $2}'); v2=$(grep "^$k " /tmp/m-$1-$a-2.txt | awk '{print $2}')
    echo "  $k $v1 -> $v2 (delta $(python3 -c "print(round(${v2:-0}-${v1:-0},4))"))"
  done
done
tail -1 /tmp/scrape-$1.out
