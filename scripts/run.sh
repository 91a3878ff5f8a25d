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
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

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

if [ -n "${TALLY_REDIS_URL:-}" ] && redis_ping "$TALLY_REDIS_URL"; then
    echo "==> using Redis at $TALLY_REDIS_URL" >&2
else
    if [ -n "${TALLY_REDIS_URL:-}" ]; then
        echo "==> TALLY_REDIS_URL=$TALLY_REDIS_URL does not answer: starting a private redis-server" >&2
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        echo "==> installing Debian's redis-server" >&2
        apt_install redis-server || exit 1
    fi
    redis_dir="$root/data/redis"
    socket="$redis_dir/redis.sock"
    mkdir -p "$redis_dir"
    if redis_ping "unix://$socket"; then
        echo "==> private redis-server already running on $socket" >&2
    else
        echo "==> starting a private redis-server on $socket" >&2
        start_private_redis "$redis_dir" --daemonize yes || exit 1
    fi
    export TALLY_REDIS_URL="unix://$socket"
fi

echo "==> tally serve --config config/default.toml (TALLY_REDIS_URL=$TALLY_REDIS_URL)" >&2
exec "$root/target/release/tally" serve --config "$root/config/default.toml"
