#!/usr/bin/env bash
# A tally cluster on one machine, for trying cluster mode (docs/OPERATIONS.md, "Cluster mode").
#
#   scripts/cluster.sh start [N]   # build, then start a private nats-server -js, a private
#                                  # 3-master Redis Cluster and N tally nodes (default 3) on
#                                  # loopback
#   scripts/cluster.sh status      # what runs, and each node's view of the log
#   scripts/cluster.sh stop        # stop what `start` started
#
# Everything lives under ./cluster (override with TALLY_CLUSTER_DIR): the NATS store, the Redis
# nodes' directories, each node's data_dir and log. NATS and the three Redis masters listen on
# free loopback ports, never the machine's 4222 or 6379. The nodes share the Redis Cluster (each
# keeps its speed state in one hash slot of its own, `tally:{nodeN}:…`) and the stream
# `tally_events`. Debian's nats-server and redis-server are installed when missing (as root).
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

# A port whose cluster bus port (port + 10000) is valid too.
redis_port() {
    local p
    while :; do
        p=$(free_port)
        [ "$p" -lt 55000 ] && { echo "$p"; return; }
    done
}

# Three masters, no replicas, no persistence; prints the redis+cluster:// URL.
start_redis_cluster() {
    local i p nodes=() ports=()
    for i in 1 2 3; do
        p=$(redis_port)
        mkdir -p "$dir/redis$i"
        redis-server --bind 127.0.0.1 --port "$p" --cluster-enabled yes \
            --cluster-config-file nodes.conf --save "" --appendonly no --dir "$dir/redis$i" \
            --daemonize yes --pidfile "$dir/redis$i/redis.pid" --logfile "$dir/redis$i/redis.log"
        echo "$p" >"$dir/redis$i/port"
        for _ in $(seq 1 100); do
            [ "$(redis-cli -p "$p" ping 2>/dev/null)" = PONG ] && break
            sleep 0.1
        done
        nodes+=("127.0.0.1:$p")
        ports+=("$p")
    done
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$dir/redis-create.log" 2>&1 || {
        echo "redis-cli --cluster create failed; see $dir/redis-create.log" >&2
        exit 1
    }
    for p in "${ports[@]}"; do
        for _ in $(seq 1 100); do
            redis-cli -p "$p" cluster info 2>/dev/null | grep -q cluster_state:ok && break
            sleep 0.1
        done
    done
    local IFS=,
    echo "redis+cluster://${nodes[*]}"
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

    local redis_url
    redis_url=$(start_redis_cluster)
    echo "$redis_url" >"$dir/redis.url"
    echo "==> Redis Cluster of three masters: $redis_url" >&2

    : >"$dir/nodes"
    local i
    for i in $(seq 1 "$n"); do
        TALLY_BIN="$root/target/release/tally" start_private_tally "node$i" "$dir/node$i" \
            "$redis_url" TALLY_QUEUE_URL="nats://127.0.0.1:$port" \
            TALLY_CLUSTER_NODE_ID="node$i"
        echo "$TALLY_PID $TALLY_URL" >>"$dir/nodes"
        echo "==> node$i: $TALLY_URL (pid $TALLY_PID, data in $dir/node$i/data)" >&2
    done
    echo "==> try: curl -X POST -H 'content-type: application/json' -d '[{\"url\":\"https://example.com/\"}]' $(head -n 1 "$dir/nodes" | cut -d' ' -f2)/v1/events" >&2
}

status() {
    [ -f "$dir/nodes" ] || { echo "no cluster under $dir" >&2; exit 1; }
    echo "nats: $(cat "$dir/nats.url") $(kill -0 "$(cat "$dir/nats.pid")" 2>/dev/null && echo up || echo down)"
    local i
    for i in 1 2 3; do
        [ -f "$dir/redis$i/port" ] || continue
        echo "redis$i: 127.0.0.1:$(cat "$dir/redis$i/port") $(redis-cli -p "$(cat "$dir/redis$i/port")" cluster info 2>/dev/null | grep cluster_state | tr -d '\r' || echo down)"
    done
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
    local i
    for i in 1 2 3; do
        if [ -f "$dir/redis$i/port" ]; then
            redis-cli -p "$(cat "$dir/redis$i/port")" shutdown nosave >/dev/null 2>&1 || true
            rm -f "$dir/redis$i/port"
        fi
    done
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
