# Sourced by tests/run.sh and demo/run.sh: makes sure redis-server and
# redis-cli are on this machine, installing Debian's redis-server package when
# they are missing and this user can; otherwise says exactly what to install.

ensure_redis_server() {
    if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
        return 0
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo="sudo"
        else
            echo "optimus: redis-server is not installed, and installing it needs root." >&2
            echo "optimus: install it with: sudo apt-get update && sudo apt-get install -y redis-server" >&2
            echo "optimus: (other systems: any Redis 7 package that provides redis-server and redis-cli)" >&2
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "optimus: redis-server is not installed and this is not a Debian-like system:" >&2
        echo "optimus: install Redis 7 (redis-server and redis-cli) with your package manager." >&2
        return 1
    fi
    echo "optimus: redis-server not found; installing Debian's redis-server package" >&2
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >&2
    command -v redis-server >/dev/null 2>&1
}

# Prints a TCP port on 127.0.0.1 that nothing listens on.
free_port() {
    local port
    for _ in $(seq 50); do
        port=$(( (RANDOM % 30000) + 20000 ))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    echo "optimus: no free port found" >&2
    return 1
}
