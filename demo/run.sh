#!/usr/bin/env bash
# The optimus demo: 3 workers bridge what `optimus publish` sends into a stream,
# printing their monitoring lines, then a final count.
#
# Builds optimus first (cargo's progress shown), then uses REDIS_URL when it
# is set and answers; otherwise starts a throwaway redis-server on a free port
# (installing Debian's package if it is missing). Writes only to its own
# channel and stream, `optimus-demo:*`. Its logs stay in target/demo/run/.
#   DURATION=10 demo/run.sh      # publish for 10 s instead of 5
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
# shellcheck source=demo/server.sh
source demo/server.sh
export INPUT_CHANNEL=optimus-demo:published OUTPUT_STREAM=optimus-demo:processed
redis-cli -u "$REDIS_URL" DEL "$OUTPUT_STREAM" "$OUTPUT_STREAM:dead" >/dev/null

echo "== optimus consume with 3 workers (monitoring lines below; logs in $LOGS/consume.log)"
CONSUMERS_COUNT=3 MONITORING_INTERVAL=1 "$BIN" consume 2>"$LOGS/consume.log" &
CONSUME_PID=$!
DEMO_PIDS+=("$CONSUME_PID")
sleep 1
echo "== optimus publish --duration $DURATION"
"$BIN" publish --duration "$DURATION" --pause-min 0.05 --pause-max 0.2 --progress-interval 1 | tee "$LOGS/publish.out"
sleep 3 # let the workers settle the last batches
kill -TERM "$CONSUME_PID"
wait "$CONSUME_PID" || true

published=$(sed -n 's/^publish done .*published=\([0-9]*\).*/\1/p' "$LOGS/publish.out")
run=$(sed -n 's/^publish done run=\([0-9a-f]*\).*/\1/p' "$LOGS/publish.out")
echo "== result"
"$BIN" audit --published "$published" --run "$run"
