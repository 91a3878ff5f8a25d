#!/usr/bin/env bash
# A tally cluster on one machine, for trying cluster mode (docs/OPERATIONS.md, "Cluster mode").
#
#   scripts/cluster.sh start [N]   # build, then start a private nats-server -js, a private
#                                  # redis-server and N tally nodes (default 3) on loopback
#   scripts/cluster.sh status      # what runs, and each node's view of the log
#   scripts/cluster.sh stop        # stop what `start` started
#
# Everything lives under ./cluster (override with TALLY_CLUSTER_DIR): the NATS store, the Redis
# socket, each node's data_dir and log. NATS listens on a free loopback port, never the
# machine's 4222; Redis on a unix socket only, never 6379. The nodes share the Redis (each keeps
# its speed state under its own key prefix) and the stream `tally_events`. Debian's
# nats-server and redis-server are installed when missing (as root).
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)
export DEBIAN_FRONTEND=noninteractive
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
dir=${TALLY_CLUSTER_DIR:-$root/cluster}

nats_bin() { command -v nats-server || echo /usr/sbin/nats-server; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local n=${1:-3}
    if [ -f "$dir/nats.pid" ] && kill -0 "$(cat "$dir/nats.pid")" 2>/dev/null; then
        echo "a cluster already runs under $dir; scripts/cluster.sh stop first" >&2
        exit 1
    fi
    [ -x "$(nats_bin)" ] || apt_install nats-server
    command -v redis-server >/dev/null 2>&1 || apt_install redis-server
    echo "==> cargo build --release --bin tally" >&2
    cargo build --release --bin tally
    mkdir -p "$dir"

    local port
    port=$(free_port)
    "$(nats_bin)" -a 127.0.0.1 -p "$port" -js -sd "$dir/nats" >"$dir/nats.log" 2>&1 &
    echo $! >"$dir/nats.pid"
    echo "nats://127.0.0.1:$port" >"$dir/nats.url"
    local _
    for _ in $(seq 1 100); do
        grep -q "Server is ready" "$dir/nats.log" 2>/dev/null && break
        sleep 0.1
    done
    grep -q "Server is ready" "$dir/nats.log" || {
        echo "nats-server did not start; see $dir/nats.log" >&2
        exit 1
    }
    echo "==> nats-server -js on nats://127.0.0.1:$port (pid $(cat "$dir/nats.pid"))" >&2

    start_private_redis "$dir/redis" --save "" --appendonly no --daemonize yes
    echo "==> redis-server on $dir/redis/redis.sock" >&2

    : >"$dir/nodes"
    local i
    for i in $(seq 1 "$n"); do
        TALLY_BIN="$root/target/release/tally" start_private_tally "node$i" "$dir/node$i" \
            "unix://$dir/redis/redis.sock" TALLY_QUEUE_URL="nats://127.0.0.1:$port" \
            TALLY_CLUSTER_NODE_ID="node$i"
        echo "$TALLY_PID $TALLY_URL" >>"$dir/nodes"
        echo "==> node$i: $TALLY_URL (pid $TALLY_PID, data in $dir/node$i/data)" >&2
    done
    echo "==> try: curl -X POST -H 'content-type: application/json' -d '[{\"url\":\"https://example.com/\"}]' $(head -n 1 "$dir/nodes" | cut -d' ' -f2)/v1/events" >&2
}

status() {
    [ -f "$dir/nodes" ] || { echo "no cluster under $dir" >&2; exit 1; }
    echo "nats: $(cat "$dir/nats.url") $(kill -0 "$(cat "$dir/nats.pid")" 2>/dev/null && echo up || echo down)"
    local pid url
    while read -r pid url; do
        if kill -0 "$pid" 2>/dev/null; then
            echo "$url: $(curl -fsS "$url/v1/admin/status" | python3 -c 'import json,sys; c=json.load(sys.stdin)["cluster"]; print(c["node_id"], json.dumps(c["log"]))')"
        else
            echo "$url: down"
        fi
    done <"$dir/nodes"
}

stop() {
    local pid _url
    if [ -f "$dir/nodes" ]; then
        while read -r pid _url; do kill "$pid" 2>/dev/null || true; done <"$dir/nodes"
        while read -r pid _url; do
            for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        done <"$dir/nodes"
        rm -f "$dir/nodes"
    fi
    if [ -S "$dir/redis/redis.sock" ]; then
        redis-cli -s "$dir/redis/redis.sock" shutdown nosave >/dev/null 2>&1 || true
    fi
    if [ -f "$dir/nats.pid" ]; then
        kill "$(cat "$dir/nats.pid")" 2>/dev/null || true
        rm -f "$dir/nats.pid"
    fi
    echo "==> stopped; data kept under $dir (rm -rf it to start afresh)" >&2
}

case "${1:-}" in
    start) start "${2:-3}" ;;
    status) status ;;
    stop) stop ;;
    *)
        sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
