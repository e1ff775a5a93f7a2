#!/bin/bash
# usage: [BIN=path/to/replichat] threads.sh target
# Runs a 1-run `bench load` of `target` and prints, for every replica process, the CPU each of its threads used
# over 5 s of the measured part of the run (2 s after a replica's log first holds 20,000 entries), in % of one
# core. The log appends and the applies of sends run on the writer thread (`sqlite-writer`, since stop 25; before,
# on the busiest of sqlx's `sqlx-sqlite-worker` threads, one per SQLite connection): set beside the writer's held
# time in /metrics (scrape.sh) it shows how much of that time the writer's thread spent on the CPU.
cd "$(dirname "$0")/../../.."
target/release/bench load ${BIN:+--replichat $BIN} --target $1 --runs 1 --duration-s 12 --warmup-s 2 > /tmp/threads-$1.out 2>&1 &
bp=$!
pids() { ps -eo pid=,args= | grep -E "^ *[0-9]+ [^ ]*replichat[^ ]* serve " | awk '{print $1}'; }
ports() { ps -eo args= | grep -E "^[^ ]*replichat[^ ]* serve " | grep -o "listen 127.0.0.1:[0-9]*" | cut -d: -f2; }
for i in $(seq 1 100); do [ -n "$(ports)" ] && break; sleep 0.2; done
appended() { for a in $(ports); do curl -s 127.0.0.1:$a/metrics | awk '/^replichat_log_append_entries_sum /{print int($2)}'; done | sort -n | tail -1; }
for i in $(seq 1 300); do [ "$(appended)" -gt 20000 ] 2>/dev/null && break; sleep 0.5; done
sleep 2
ticks() { for p in $(pids); do for t in /proc/$p/task/*; do echo "$p/$(basename $t) $(tr ' ' _ < $t/comm) $(awk '{print $14 + $15}' $t/stat)"; done; done | sort; }
ticks > /tmp/threads-$1-1.txt; sleep 5; ticks > /tmp/threads-$1-2.txt
hz=$(getconf CLK_TCK)
join /tmp/threads-$1-1.txt /tmp/threads-$1-2.txt | awk -v hz=$hz '{ d = $5 - $3; if (d > 0) printf "%s %s %.0f %%\n", $1, $2, 100 * d / hz / 5 }' | sort -t/ -k1,1 -s
wait $bp
tail -1 /tmp/threads-$1.out
