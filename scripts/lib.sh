# shellcheck shell=bash
# Helpers shared by the scripts in this folder; source it (from the repository root):
#
#   . scripts/lib.sh
#
# Defines functions only: no side effects when sourced.

# apt_install PACKAGE…: installs Debian packages with apt-get (as root; otherwise says what to
# install and returns 1), without starting their system services.
apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "need $* but not root: install it (apt-get install -y $*) and rerun" >&2
        return 1
    fi
    apt-get update -qq
    # policy-rc.d keeps Debian from starting the system redis-server on install.
    local policy=/usr/sbin/policy-rc.d created_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
    fi
    apt-get install -y -qq --no-install-recommends "$@" </dev/null
    if [ -n "$created_policy" ]; then rm -f "$policy"; fi
}

# start_private_redis DIR [redis-server options…]: starts a redis-server whose unix socket is
# DIR/redis.sock (mode 700), with its files and log in DIR and no TCP port unless the options
# give one (never the machine's Redis on 6379), and returns once it answers PING on the socket.
# Without `--daemonize yes` in the options it runs as a child of the caller, and REDIS_PID is its
# pid; with it, REDIS_PID is read from DIR/redis.pid. The one way run.sh, test.sh and bench.sh
# start Redis (the Rust tests' TestRedis passes the same options).
start_private_redis() {
    local dir=$1
    shift
    REDIS_PID=""
    mkdir -p "$dir"
    rm -f "$dir/redis.sock"
    local args=(--port 0 --unixsocket "$dir/redis.sock" --unixsocketperm 700 --dir "$dir"
        --logfile "$dir/redis.log" --pidfile "$dir/redis.pid")
    case " $* " in
        *" --daemonize yes "*)
            redis-server "${args[@]}" "$@"
            ;;
        *)
            redis-server "${args[@]}" "$@" &
            REDIS_PID=$!
            ;;
    esac
    local _
    for _ in $(seq 1 100); do
        if [ "$(redis-cli -s "$dir/redis.sock" ping 2>/dev/null)" = PONG ]; then
            [ -n "${REDIS_PID:-}" ] || REDIS_PID=$(cat "$dir/redis.pid" 2>/dev/null || true)
            return 0
        fi
        sleep 0.1
    done
    echo "redis-server did not come up on $dir/redis.sock; see $dir/redis.log" >&2
    return 1
}
