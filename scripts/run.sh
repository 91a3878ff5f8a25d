#!/usr/bin/env bash
# Build tally and run it with config/default.toml, with a Redis for the speed layer.
#
#   scripts/run.sh                          # private redis-server under ./data/redis
#   TALLY_REDIS_URL=redis://host:6379/0 scripts/run.sh   # use your own Redis
#
# When TALLY_REDIS_URL is set and answers PING, it is used as it is. Otherwise Debian's
# redis-server is installed if missing (as root, apt-get) and a private one is started on the
# unix socket ./data/redis/redis.sock (no TCP port; never the machine's Redis on 6379), with its
# data and pidfile in ./data/redis. It keeps running after tally exits; stop it with
#   redis-cli -s data/redis/redis.sock shutdown
# Any other TALLY_<SECTION>_<KEY> variable overrides config/default.toml as usual.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)
export DEBIAN_FRONTEND=noninteractive

echo "==> cargo build --release --bin tally" >&2
cargo build --release --bin tally

redis_ping() { # URL
    local url=$1
    if ! command -v redis-cli >/dev/null 2>&1; then
        # No redis-cli: a plain PING over bash's /dev/tcp, for redis://host:port URLs.
        local hostport=${url#redis://}
        hostport=${hostport##*@}
        hostport=${hostport%%/*}
        case "$url" in redis://*:*) ;; *) return 1 ;; esac
        local reply
        # shellcheck disable=SC2016
        reply=$(timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"; printf "PING\r\n" >&3; head -c 5 <&3' \
            _ "${hostport%:*}" "${hostport##*:}" 2>/dev/null) || return 1
        [ "$reply" = "+PONG" ]
        return
    fi
    case "$url" in
        unix://* | redis+unix://*)
            local path=${url#*://}
            path=${path%%\?*}
            [ "$(redis-cli -s "$path" ping 2>/dev/null)" = PONG ]
            ;;
        *) [ "$(redis-cli -u "$url" ping 2>/dev/null)" = PONG ] ;;
    esac
}

install_redis() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "redis-server is missing and this is not root: apt-get install -y redis-server" >&2
        exit 1
    fi
    echo "==> installing Debian's redis-server" >&2
    apt-get update -qq
    # policy-rc.d keeps Debian from starting the system redis-server on install.
    local policy=/usr/sbin/policy-rc.d created_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
    fi
    apt-get install -y -qq --no-install-recommends redis-server </dev/null
    if [ -n "$created_policy" ]; then rm -f "$policy"; fi
}

if [ -n "${TALLY_REDIS_URL:-}" ] && redis_ping "$TALLY_REDIS_URL"; then
    echo "==> using Redis at $TALLY_REDIS_URL" >&2
else
    if [ -n "${TALLY_REDIS_URL:-}" ]; then
        echo "==> TALLY_REDIS_URL=$TALLY_REDIS_URL does not answer: starting a private redis-server" >&2
    fi
    command -v redis-server >/dev/null 2>&1 || install_redis
    redis_dir="$root/data/redis"
    socket="$redis_dir/redis.sock"
    mkdir -p "$redis_dir"
    if redis_ping "unix://$socket"; then
        echo "==> private redis-server already running on $socket" >&2
    else
        echo "==> starting a private redis-server on $socket" >&2
        rm -f "$socket"
        redis-server --port 0 --unixsocket "$socket" --unixsocketperm 700 \
            --dir "$redis_dir" --pidfile "$redis_dir/redis.pid" --logfile "$redis_dir/redis.log" \
            --daemonize yes
        for _ in $(seq 1 100); do
            redis_ping "unix://$socket" && break
            sleep 0.1
        done
        redis_ping "unix://$socket" || {
            echo "redis-server did not come up; see $redis_dir/redis.log" >&2
            exit 1
        }
    fi
    export TALLY_REDIS_URL="unix://$socket"
fi

echo "==> tally serve --config config/default.toml (TALLY_REDIS_URL=$TALLY_REDIS_URL)" >&2
exec "$root/target/release/tally" serve --config "$root/config/default.toml"
