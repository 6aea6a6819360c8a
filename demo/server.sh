# Sourced by the demo scripts: use REDIS_URL when it is set and answers,
# otherwise start a throwaway redis-server on a free port (installing Debian's
# package when it is missing). Sets REDIS_URL, WORK (a temp dir), SERVER_PID,
# and a cleanup trap that kills what the demo started.

# shellcheck source=tests/ensure-redis.sh
source tests/ensure-redis.sh

SERVER_PID=""
WORK=$(mktemp -d)
DEMO_PIDS=()
cleanup() {
    for pid in "${DEMO_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
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

echo "== building optimus (release)"
cargo build --release --locked --quiet
BIN=target/release/optimus
