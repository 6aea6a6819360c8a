#!/usr/bin/env bash
# Does the bridge's throughput grow with the shards? Starts a throwaway
# 3-master Redis Cluster on loopback, then bridges COUNT messages twice with
# sharded Pub/Sub (the fenced core, the default there), three publishers
# each time:
#   one:   one pool, one channel and one stream on one shard (every message
#          on that shard)
#   three: three pools (one consume process each), each channel and stream
#          on a shard of its own, a third of the messages each
# and prints the rate of each and their ratio. Each pool runs WORKERS
# workers. On a machine where the nodes and the bridges share few cores,
# expect a ratio nearer 1: the shards then compete for the same CPUs.
# Builds optimus first (cargo's progress shown); the nodes' and the bridges'
# logs stay in target/demo/cluster-scaling/.
#   COUNT=300000 WORKERS=2 demo/cluster-scaling.sh
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${COUNT:-150000}
WORKERS=${WORKERS:-2}
# shellcheck source=tests/ensure-redis.sh
source tests/ensure-redis.sh
ensure_redis_server

WORK=$(mktemp -d)
LOGS="$PWD/target/demo/cluster-scaling"
rm -rf "$LOGS"
mkdir -p "$LOGS"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
    echo "== logs kept in $LOGS/"
}
trap cleanup EXIT

echo "== building optimus (release; the first build takes a few minutes)"
cargo build --release --locked
BIN=target/release/optimus

# Nodes on free ports in 20000-29999, whose cluster-bus ports (+10000) are
# free too and can never be another node's port.
PORTS=()
while [ ${#PORTS[@]} -lt 3 ]; do
    port=$(( (RANDOM % 10000) + 20000 ))
    [ -d "$WORK/$port" ] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null \
        && ! (exec 3<>"/dev/tcp/127.0.0.1/$((port + 10000))") 2>/dev/null; then
        mkdir "$WORK/$port"
        redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
            --cluster-config-file nodes.conf --save "" --appendonly no \
            --dir "$WORK/$port" --logfile "$LOGS/redis-$port.log" &
        PIDS+=($!)
        PORTS+=("$port")
    fi
done
for i in 0 1 2; do
    until [ "$(redis-cli -p "${PORTS[$i]}" PING 2>/dev/null)" = PONG ]; do
        if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
            echo "redis-server on port ${PORTS[$i]} did not start:" >&2
            tail -5 "$LOGS/redis-${PORTS[$i]}.log" >&2
            exit 1
        fi
        sleep 0.05
    done
done
redis-cli --cluster create "${PORTS[@]/#/127.0.0.1:}" --cluster-yes >/dev/null
until redis-cli -p "${PORTS[0]}" CLUSTER INFO | grep -q cluster_state:ok; do sleep 0.1; done
SEEDS=$(printf 'redis://127.0.0.1:%s,' "${PORTS[@]}")
SEEDS=${SEEDS%,}
echo "== cluster of 3 masters on ports ${PORTS[*]}"

# The master (0, 1 or 2) serving a name's slot.
shard_of() {
    local port slot
    for port in "${PORTS[@]}"; do
        slot=$(redis-cli -p "$port" CLUSTER KEYSLOT "$1")
        redis-cli -p "$port" CLUSTER NODES | awk -v s="$slot" -v p="$port" '
            $3 ~ /myself/ { for (i = 9; i <= NF; i++) { split($i, r, "-"); if (r[2] == "") r[2] = r[1];
                if (s >= r[1] && s <= r[2]) { print p; exit } } }'
    done | head -1
}
# A name "<prefix><n>" on each of the three masters.
spread() {
    local n=0 name shard
    declare -A seen=()
    while [ ${#seen[@]} -lt 3 ]; do
        name="$1$n"
        shard=$(shard_of "$name")
        if [ -z "${seen[$shard]:-}" ]; then
            seen[$shard]=1
            echo "$name"
        fi
        n=$((n + 1))
    done
}
mapfile -t CHANNELS < <(spread scale:in:)
mapfile -t STREAMS < <(spread scale:out:)

# Bridges COUNT messages with $1 pools (1: everything on the first channel
# and stream; 3: one pool per shard), logging to $LOGS/consume-$2-<i>.log
# and monitor-$2-<i>; sets RATE, from the first publish to the last entry
# written.
run() {
    local pools=$1 name=$2 total start end publishers=() consumes=() last=-1 still=0 i
    for port in "${PORTS[@]}"; do redis-cli -p "$port" FLUSHALL >/dev/null; done
    for ((i = 0; i < pools; i++)); do
        REDIS_URL=$SEEDS PUBSUB_MODE=sharded INPUT_CHANNEL=${CHANNELS[$i]} OUTPUT_STREAM=${STREAMS[$i]} \
            CONSUMERS_COUNT=$WORKERS MONITORING_INTERVAL=0.5 "$BIN" consume \
            >"$LOGS/monitor-$name-$i" 2>"$LOGS/consume-$name-$i.log" &
        consumes+=($!)
        PIDS+=($!)
    done
    for ((i = 0; i < pools; i++)); do
        until grep -q "consumers=$((WORKERS * pools)) " "$LOGS/monitor-$name-$i" 2>/dev/null; do sleep 0.1; done
    done
    start=$(date +%s.%N)
    for i in 0 1 2; do
        REDIS_URL=$SEEDS PUBSUB_MODE=sharded "$BIN" publish --channel "${CHANNELS[$((i % pools))]}" \
            --count $((COUNT / 3)) --pause-min 0 --pause-max 0 --no-fast-path --progress-interval 3600 >/dev/null &
        publishers+=($!)
    done
    wait "${publishers[@]}"
    while :; do
        total=0
        for stream in "${STREAMS[@]}"; do
            total=$((total + $(redis-cli -c -p "${PORTS[0]}" XLEN "$stream")))
        done
        [ "$total" -ge $((COUNT / 3 * 3)) ] && break
        if [ "$total" = "$last" ]; then still=$((still + 1)); else still=0; last=$total; fi
        if [ "$still" -gt 600 ]; then
            echo "stuck at $total of $((COUNT / 3 * 3)) entries; last monitoring lines:" >&2
            tail -n1 "$LOGS"/monitor-"$name"-* >&2
            exit 1
        fi
        sleep 0.05
    done
    end=$(date +%s.%N)
    kill -TERM "${consumes[@]}"
    wait "${consumes[@]}" || true
    RATE=$(awk -v n="$total" -v a="$start" -v b="$end" 'BEGIN { printf "%d", n / (b - a) }')
}

echo "== $COUNT messages, $WORKERS workers per pool, channels ${CHANNELS[*]} on three shards"
run 1 one
one_rate=$RATE
echo "one pool, one shard:            $one_rate messages/s"
run 3 three
echo "three pools on three shards:    $RATE messages/s"
echo "ratio three/one: $(awk -v a="$RATE" -v b="$one_rate" 'BEGIN { printf "%.2f", a / b }') ($(nproc) cores here)"
