#!/bin/bash
# usage: scrape.sh target ; runs a 1-run load and scrapes /metrics of every node at t=5s and t=11s
cd /work/main
target/release/bench load --target $1 --runs 1 --duration-s 10 --warmup-s 2 > /tmp/scrape-$1.out 2>&1 &
bp=$!
# wait until users are registered: poll replichat processes
for i in $(seq 1 100); do n=$(pgrep -x replichat | wc -l); [ "$n" -ge 1 ] && break; sleep 0.2; done
sleep 9
for a in $(ps -C replichat -o args= | grep -o "listen 127.0.0.1:[0-9]*" | cut -d: -f2); do curl -s 127.0.0.1:$a/metrics > /tmp/m-$1-$a-1.txt; done
sleep 5
for a in $(ps -C replichat -o args= | grep -o "listen 127.0.0.1:[0-9]*" | cut -d: -f2); do curl -s 127.0.0.1:$a/metrics > /tmp/m-$1-$a-2.txt; done
wait $bp
for a in $(ls /tmp/m-$1-*-1.txt | sed "s|/tmp/m-$1-||;s|-1.txt||"); do
  echo "node port $a:"
  for k in replichat_log_append_seconds_sum replichat_log_append_seconds_count replichat_log_append_entries_sum replichat_log_append_entries_count replichat_messages_stored_total; do
    v1=$(grep "^$k " /tmp/m-$1-$a-1.txt | awk '{print $2}'); v2=$(grep "^$k " /tmp/m-$1-$a-2.txt | awk '{print $2}')
    echo "  $k $v1 -> $v2 (delta $(python3 -c "print(round(${v2:-0}-${v1:-0},4))"))"
  done
done
tail -1 /tmp/scrape-$1.out
