#!/usr/bin/env bash
# Watch the delivery guarantee under faults: 4 consume processes bridge a
# steady 5,000 messages/s while one of them is SIGKILLed and restarted every
# second or so. Their monitoring lines keep counting; at the end `optimus
# audit` compares the stream with what was published: lost and duplicates.
#
# Same build and server choice as demo/run.sh (REDIS_URL, or a throwaway
# server). Each process's log stays in target/demo/chaos/consume-<slot>.log.
#   DURATION=30 RATE=10000 demo/chaos.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-15}
RATE=${RATE:-5000}
PROCESSES=4
# shellcheck source=demo/server.sh
source demo/server.sh
export INPUT_CHANNEL=optimus-chaos:published OUTPUT_STREAM=optimus-chaos:processed
redis-cli -u "$REDIS_URL" DEL "$OUTPUT_STREAM" "$OUTPUT_STREAM:dead" >/dev/null

declare -a PIDS
start_consumer() { # $1: slot; its monitoring lines are prefixed [p<slot>]
    MONITORING_INTERVAL=1 "$BIN" consume > >(sed -u "s/^/[p$1] /") 2>>"$LOGS/consume-$1.log" &
    PIDS[$1]=$!
    DEMO_PIDS+=("$!")
}

echo "== $PROCESSES consume processes, 2 workers each (logs in $LOGS/)"
for i in $(seq 0 $((PROCESSES - 1))); do start_consumer "$i"; done
sleep 1.5
echo "== publishing $RATE messages/s for $DURATION s, killing one process about every second"
COUNT=$((RATE * DURATION))
"$BIN" publish --rate "$RATE" --count "$COUNT" --batch-size 200 --progress-interval 2 >"$LOGS/publish.out" &
PUBLISH_PID=$!
DEMO_PIDS+=("$PUBLISH_PID")
kills=0
slot=0
while kill -0 "$PUBLISH_PID" 2>/dev/null; do
    sleep "0.$(( (RANDOM % 4) + 6 ))" # 0.6 to 0.9 s, plus the restart
    kill -0 "$PUBLISH_PID" 2>/dev/null || break
    kill -KILL "${PIDS[$slot]}" 2>/dev/null || true
    kills=$((kills + 1))
    echo "== SIGKILL #$kills: p$slot, restarting it"
    start_consumer "$slot"
    slot=$(( (slot + 1) % PROCESSES ))
done
wait "$PUBLISH_PID" || true
tail -1 "$LOGS/publish.out"
echo "== letting the survivors settle, then stopping them"
sleep 4
for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
wait "${PIDS[@]}" 2>/dev/null || true
published=$(sed -n 's/^publish done .*published=\([0-9]*\).*/\1/p' "$LOGS/publish.out")
run=$(sed -n 's/^publish done run=\([0-9a-f]*\).*/\1/p' "$LOGS/publish.out")
echo "== result after $kills kills"
"$BIN" audit --published "$published" --run "$run"
