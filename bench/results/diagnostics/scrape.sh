#!/bin/bash
# usage: [BIN=path/to/replichat] scrape.sh target
# Runs a 1-run `bench load` of `target` and scrapes /metrics of every replica twice, 5 s apart, in the measured
# part of the run (2 s after a replica's log first holds 20,000 entries: registering the users takes longer when
# applies are slow), then prints what each series grew by in those 5 s, and per replica what an append and an
# apply cost and how busy the writer was.
cd "$(dirname "$0")/../../.."
rm -f /tmp/m-$1-*.txt
target/release/bench load ${BIN:+--replichat $BIN} --target $1 --runs 1 --duration-s 10 --warmup-s 2 > /tmp/scrape-$1.out 2>&1 &
bp=$!
ports() { ps -eo args= | grep -E "^[^ ]*replichat[^ ]* serve " | grep -o "listen 127.0.0.1:[0-9]*" | cut -d: -f2; }
# wait until the replicas run
for i in $(seq 1 100); do [ -n "$(ports)" ] && break; sleep 0.2; done
appended() { for a in $(ports); do curl -s 127.0.0.1:$a/metrics | awk '/^replichat_log_append_entries_sum /{print int($2)}'; done | sort -n | tail -1; }
for i in $(seq 1 300); do [ "$(appended)" -gt 20000 ] 2>/dev/null && break; sleep 0.5; done
sleep 2
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
for a in $(ls /tmp/m-$1-*-1.txt | sed "s|/tmp/m-$1-||;s|-1.txt||"); do
  python3 - /tmp/m-$1-$a-1.txt /tmp/m-$1-$a-2.txt $a <<'PY'
import sys
def read(path):
    return {l.split()[0]: float(l.split()[1]) for l in open(path) if l.startswith('replichat_') and len(l.split()) == 2}
one, two, port = read(sys.argv[1]), read(sys.argv[2]), sys.argv[3]
d = {k: two.get(k, 0) - one.get(k, 0) for k in two}
appends, entries = d['replichat_log_append_seconds_count'], d['replichat_log_append_entries_sum']
applies, applied = d['replichat_apply_seconds_count'], d['replichat_apply_entries_sum']
append_s, apply_s = d['replichat_log_append_seconds_sum'], d['replichat_apply_seconds_sum']
print(f"port {port}: {appends:.0f} appends of {entries / max(appends, 1):.0f} entries, "
      f"{1e3 * append_s / max(appends, 1):.2f} ms each ({1e6 * append_s / max(entries, 1):.0f} us per entry), "
      f"waiting {1e3 * d['replichat_log_append_wait_seconds_sum'] / max(appends, 1):.2f} ms for the writer; "
      f"{applies:.0f} applies of {applied / max(applies, 1):.0f}, {1e3 * apply_s / max(applies, 1):.2f} ms each "
      f"({1e6 * apply_s / max(applied, 1):.0f} us per entry); writer busy {100 * (append_s + apply_s) / 5:.0f} % "
      f"(appends alone {100 * append_s / 5:.0f} %: on one replica, since stop 26, an apply of sends runs inside "
      f"the append's transaction and its time is counted in both)")
PY
done
