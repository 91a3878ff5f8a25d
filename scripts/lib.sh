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

# start_listening NAME DIR CMD…: runs CMD in the background, its stdout to DIR/NAME.out and its
# stderr to DIR/NAME.log, and returns once it printed "listening on http://ADDR" (as
# `tally serve` and the bare axum example do). Sets LISTEN_PID and LISTEN_URL (http://ADDR).
# Returns 1 with the end of its log when it exits first or says nothing for 120 s.
start_listening() {
    local name=$1 dir=$2
    shift 2
    mkdir -p "$dir"
    local out="$dir/$name.out" log="$dir/$name.log"
    LISTEN_PID="" LISTEN_URL=""
    "$@" >"$out" 2>"$log" &
    LISTEN_PID=$!
    local _ addr
    for _ in $(seq 1 1200); do
        addr=$(sed -n 's|^listening on http://\([^ ]*\).*|\1|p' "$out" 2>/dev/null | head -n 1)
        if [ -n "$addr" ]; then
            LISTEN_URL="http://$addr"
            return 0
        fi
        if ! kill -0 "$LISTEN_PID" 2>/dev/null; then
            echo "$name exited before listening; the end of $log:" >&2
            tail -n 30 "$log" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "$name did not say where it listens in 120 s; see $log" >&2
    kill "$LISTEN_PID" 2>/dev/null || true
    return 1
}

# start_private_tally NAME DIR REDIS_URL [VAR=VALUE…]: starts `tally serve` with
# config/default.toml in the background: data in DIR/data, HTTP on a free port of 127.0.0.1,
# the speed layer on REDIS_URL (a private Redis: start_private_redis), the batch schedule never
# firing on its own (runs are asked for), and VAR=VALUE… (TALLY_* overrides) last, so they win.
# The binary is TALLY_BIN (default target/release/tally of this checkout). Sets TALLY_PID and TALLY_URL; output
# as start_listening. The one way test.sh and the benchmarks start tally; run.sh runs the same
# binary and config in the foreground.
start_private_tally() {
    local name=$1 dir=$2 redis=$3 root
    shift 3
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    start_listening "$name" "$dir" env TALLY_HTTP_ADDR=127.0.0.1:0 \
        TALLY_STORAGE_DATA_DIR="$dir/data" TALLY_REDIS_URL="$redis" \
        TALLY_BATCH_SCHEDULE="0 0 0 1 1 *" "$@" \
        "${TALLY_BIN:-$root/target/release/tally}" serve --config "$root/config/default.toml" || return 1
    TALLY_PID=$LISTEN_PID TALLY_URL=$LISTEN_URL
}

# install_dashboard_deps: what the dashboard's browser tests and its first-view benchmark need:
# Node.js and npm, Debian's Chromium (playwright-core drives it; it never downloads a browser of
# its own), and dashboard/node_modules from the lockfile (again when the lockfile is newer).
install_dashboard_deps() {
    local missing=() root
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    command -v node >/dev/null 2>&1 || missing+=(nodejs)
    command -v npm >/dev/null 2>&1 || missing+=(npm)
    [ -x /usr/bin/chromium ] || missing+=(chromium)
    if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}" || return 1; fi
    if [ ! -d "$root/dashboard/node_modules" ] ||
        [ "$root/dashboard/package-lock.json" -nt "$root/dashboard/node_modules/.package-lock.json" ]; then
        (cd "$root/dashboard" && npm ci --no-audit --no-fund)
    fi
}
