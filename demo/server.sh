# Sourced by the demo scripts: builds optimus first (before any redis-server
# starts), then uses REDIS_URL when it is set and answers, otherwise starts a
# throwaway redis-server on a free port (installing Debian's package when it
# is missing). Sets REDIS_URL, BIN, WORK (a temp dir, removed at exit), LOGS
# (target/demo/<script>/, kept after exit and emptied at the next run),
# SERVER_PID, and a cleanup trap that kills what the demo started and says
# where the logs are.

# shellcheck source=tests/ensure-redis.sh
source tests/ensure-redis.sh

SERVER_PID=""
WORK=$(mktemp -d)
LOGS="$PWD/target/demo/$(basename "$0" .sh)"
rm -rf "$LOGS"
mkdir -p "$LOGS"
DEMO_PIDS=()
cleanup() {
    for pid in "${DEMO_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    rm -rf "$WORK"
    echo "== logs kept in $LOGS/"
}
trap cleanup EXIT

USE_REDIS_URL=""
if [ -n "${REDIS_URL:-}" ] && command -v redis-cli >/dev/null 2>&1 \
    && [ "$(redis-cli -u "$REDIS_URL" PING 2>/dev/null)" = "PONG" ]; then
    USE_REDIS_URL=1
else
    ensure_redis_server
fi

echo "== building optimus (release; the first build takes a few minutes)"
cargo build --release --locked
BIN=target/release/optimus

if [ -n "$USE_REDIS_URL" ]; then
    echo "== using REDIS_URL"
else
    PORT=$(free_port)
    redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$WORK" --logfile "$LOGS/redis.log" &
    SERVER_PID=$!
    export REDIS_URL="redis://127.0.0.1:$PORT"
    for _ in $(seq 100); do
        [ "$(redis-cli -u "$REDIS_URL" PING 2>/dev/null)" = "PONG" ] && break
        sleep 0.05
    done
    echo "== started a throwaway redis-server on 127.0.0.1:$PORT"
fi
