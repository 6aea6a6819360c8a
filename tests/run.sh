#!/usr/bin/env bash
# Runs optimus's checks on a fresh machine with the Rust toolchain: makes sure
# redis-server is installed (the tests start their own servers on free ports;
# they never touch one already running), then formatting, clippy and the
# test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=tests/ensure-redis.sh
source tests/ensure-redis.sh
ensure_redis_server
echo "== redis-server: $(redis-server --version)"

if cargo fmt --version >/dev/null 2>&1; then
    echo "== cargo fmt --check"
    cargo fmt --all -- --check
fi
if cargo clippy --version >/dev/null 2>&1; then
    echo "== cargo clippy"
    cargo clippy --locked --workspace --all-targets -- -D warnings
fi
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --locked --workspace --no-fail-fast
    cargo test --locked --workspace --doc # nextest does not run doctests
else
    cargo test --locked --workspace --no-fail-fast
fi
