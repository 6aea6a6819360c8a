#!/usr/bin/env bash
# The optimus demo: 3 workers bridge what `optimus publish` sends into a stream,
# printing their monitoring lines, then a final count.
#
# Uses REDIS_URL when it is set and answers; otherwise starts a throwaway
# redis-server on a free port (installing Debian's package if it is missing).
# Writes only to its own channel and stream, `optimus-demo:*`.
#   DURATION=10 demo/run.sh      # publish for 10 s instead of 5
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=tests/ensure-redis.sh
source tests/ensure-redis.sh
DURATION=${DURATION:-5}
CHANNEL=optimus-demo:published
STREAM=optimus-demo:processed

echo "== building optimus (release)"
cargo build --release --locked --quiet
BIN=target/release/optimus

SERVER_PID=""
WORK=$(mktemp -d)
cleanup() {
    [ -n "${CONSUME_PID:-}" ] && kill "$CONSUME_PID" 2>/dev/null || true
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

if [ -n "${REDIS_URL:-}" ] && command -v redis-cli >/dev/null 2>&1 \
    && [ "$(redis-cli -u "$REDIS_URL" PING 2>/dev/null)" = "PONG" ]; then
    echo "== using REDIS_URL"
else
    ensure_redis_server
    PORT=$(free_port)
    redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$WORK" --logfile "$WORK/redis.log" &
    SERVER_PID=$!
    export REDIS_URL="redis://127.0.0.1:$PORT"
    for _ in $(seq 100); do
        [ "$(redis-cli -u "$REDIS_URL" PING 2>/dev/null)" = "PONG" ] && break
        sleep 0.05
    done
    echo "== started a throwaway redis-server on 127.0.0.1:$PORT"
fi
redis-cli -u "$REDIS_URL" DEL "$STREAM" >/dev/null

export INPUT_CHANNEL=$CHANNEL OUTPUT_STREAM=$STREAM
echo "== optimus consume with 3 workers (monitoring lines below; logs in $WORK/consume.log)"
CONSUMERS_COUNT=3 MONITORING_INTERVAL=1 "$BIN" consume 2>"$WORK/consume.log" &
CONSUME_PID=$!
sleep 1
echo "== optimus publish --duration $DURATION"
"$BIN" publish --duration "$DURATION" --pause-min 0.05 --pause-max 0.2 --progress-interval 1 | tee "$WORK/publish.out"
sleep 3 # let the workers settle the last batches (the lock TTL is 2 s)
kill -TERM "$CONSUME_PID"
wait "$CONSUME_PID" || true
CONSUME_PID=""

published=$(sed -n 's/^publish done published=\([0-9]*\).*/\1/p' "$WORK/publish.out")
in_stream=$(redis-cli -u "$REDIS_URL" XLEN "$STREAM")
echo "== result: published=$published in_stream=$in_stream"
if [ "$published" = "$in_stream" ]; then
    echo "== the stream holds one entry for every published message"
else
    echo "== MISMATCH: see $WORK/consume.log" >&2
    trap - EXIT
    exit 1
fi
