#!/usr/bin/env bash
# Benchmarks, written to BENCHMARKS.md. Sections (run all by default, or name them):
#
#   scripts/bench.sh                 # every section
#   scripts/bench.sh ingest          # durable ingest vs redis-benchmark INCR and a bare axum handler
#
# Knobs (environment): BENCH_DURATION (wrk seconds per run, default 10), BENCH_THREADS (wrk
# threads, default 2), BENCH_DIR (scratch directory on the real disk, default target/bench),
# BENCH_OUT (report, default BENCHMARKS.md).
#
# Everything runs on private processes started here: a redis-server on its own port and unix
# socket, `tally serve` (release) on a fresh data directory, the bare axum example. Never the
# machine's Redis on 6379. Later sections (batch layer vs DuckDB, queries) are added as functions
# `section_<name>` and listed in SECTIONS.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)
export DEBIAN_FRONTEND=noninteractive
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

DURATION=${BENCH_DURATION:-10}
THREADS=${BENCH_THREADS:-2}
BENCH_DIR=${BENCH_DIR:-$root/target/bench}
OUT=${BENCH_OUT:-$root/BENCHMARKS.md}
SECTIONS=(ingest)

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
REPORT="$BENCH_DIR/report.md" # sections append markdown here; copied to $OUT at the end
: >"$REPORT"
PIDS=()

log() { printf '==> %s\n' "$*" >&2; }
md() { printf '%s\n' "$@" >>"$REPORT"; }

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

# ------------------------------------------------------------------------------------------------
# Tools and processes
# ------------------------------------------------------------------------------------------------

apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "need $* but not root: apt-get install -y $*" >&2
        exit 1
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

need_tools() {
    local missing=()
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    command -v redis-benchmark >/dev/null 2>&1 || missing+=(redis-tools)
    if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi
}

port_is_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
    local p
    for p in $(seq 6390 6499); do
        if port_is_free "$p"; then
            echo "$p"
            return
        fi
    done
    echo "no free port in 6390-6499" >&2
    exit 1
}

# Starts a private redis-server on a free TCP port and a unix socket; sets REDIS_PORT, REDIS_SOCK.
start_redis() {
    local dir="$BENCH_DIR/redis"
    rm -rf "$dir" && mkdir -p "$dir"
    REDIS_PORT=$(free_port)
    REDIS_SOCK="$dir/redis.sock"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --unixsocket "$REDIS_SOCK" --unixsocketperm 700 \
        --save "" --appendonly no --dir "$dir" --logfile "$dir/redis.log" &
    PIDS+=($!)
    local _
    for _ in $(seq 1 100); do
        [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && return
        sleep 0.1
    done
    echo "private redis-server did not start; see $dir/redis.log" >&2
    exit 1
}

# Runs "$@" in the background, its stdout to $1.out; waits for "listening on http://ADDR" and
# sets LISTEN_ADDR. Usage: start_http NAME CMD...
start_http() {
    local name=$1
    shift
    local out="$BENCH_DIR/$name.out"
    "$@" >"$out" 2>"$BENCH_DIR/$name.err" &
    local pid=$!
    PIDS+=("$pid")
    local _
    for _ in $(seq 1 600); do
        LISTEN_ADDR=$(sed -n 's|^listening on http://||p' "$out" | head -n 1)
        if [ -n "$LISTEN_ADDR" ]; then return; fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$name exited before listening:" >&2
            cat "$BENCH_DIR/$name.err" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "$name did not print its address in 60 s" >&2
    exit 1
}

stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# ------------------------------------------------------------------------------------------------
# wrk
# ------------------------------------------------------------------------------------------------

# Writes a wrk Lua script that POSTs /v1/events with EVENTS events per request (NDJSON when > 1,
# else one JSON object), rotating over 64 prebuilt bodies over 1000 URLs.
write_wrk_script() { # FILE EVENTS
    cat >"$1" <<EOF
local events_per_request = $2
local bodies = {}
local nbodies = 64
math.randomseed(42)
for b = 1, nbodies do
  local lines = {}
  for i = 1, events_per_request do
    lines[i] = string.format(
      '{"url":"https://bench.example/page/%d","visitor":"v%d","id":"b%d-%d"}',
      math.random(1, 1000), math.random(1, 100000), b, i)
  end
  if events_per_request == 1 then
    bodies[b] = lines[1]
  else
    bodies[b] = table.concat(lines, "\n") .. "\n"
  end
end
local ctype = events_per_request == 1 and "application/json" or "application/x-ndjson"
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "/v1/events", {["Content-Type"] = ctype}, bodies[(n % nbodies) + 1])
end
EOF
}

# Runs wrk and sets RPS, P50, P99, NON2XX, WRK_CMD. Usage: run_wrk NAME CONNECTIONS SCRIPT URL
run_wrk() {
    local name=$1 conns=$2 script=$3 url=$4
    local threads=$THREADS
    if [ "$threads" -gt "$conns" ]; then threads=$conns; fi
    WRK_CMD="wrk -t$threads -c$conns -d${DURATION}s --latency -s $(basename "$script") $url"
    log "$name: $WRK_CMD"
    wrk "-t$threads" "-c$conns" "-d${DURATION}s" --latency -s "$script" "$url" | tee "$BENCH_DIR/$name.wrk" >&2
    RPS=$(awk '/^Requests\/sec:/ {print $2}' "$BENCH_DIR/$name.wrk")
    P50=$(awk '$1 == "50%" {print $2}' "$BENCH_DIR/$name.wrk")
    P99=$(awk '$1 == "99%" {print $2}' "$BENCH_DIR/$name.wrk")
    NON2XX=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$BENCH_DIR/$name.wrk")
    NON2XX=${NON2XX:-0}
    if [ "$NON2XX" != 0 ]; then
        echo "WARNING: $name: $NON2XX responses were not 2xx" >&2
    fi
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
mult() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", a * b }'; }

# ------------------------------------------------------------------------------------------------
# Section: ingest
# ------------------------------------------------------------------------------------------------

section_ingest() {
    log "building release binaries"
    cargo build --release --bin tally
    cargo build --release -p tally-e2e --example bare_axum
    local tally="$root/target/release/tally" bare="$root/target/release/examples/bare_axum"

    start_redis
    local redis_pid=${PIDS[-1]}
    local data="$BENCH_DIR/data"
    rm -rf "$data" && mkdir -p "$data"

    write_wrk_script "$BENCH_DIR/batch1000.lua" 1000
    write_wrk_script "$BENCH_DIR/single.lua" 1

    # redis-benchmark first, on a quiet machine like the others.
    local redis_cmd="redis-benchmark -p $REDIS_PORT -t incr -P 100 -n 2000000 -q"
    log "$redis_cmd"
    redis-benchmark -p "$REDIS_PORT" -t incr -P 100 -n 2000000 -q 2>&1 | tr '\r' '\n' | tee "$BENCH_DIR/redis.out" >&2
    local redis_ops
    redis_ops=$(awk '/^INCR:/ {print $2}' "$BENCH_DIR/redis.out" | tail -n 1)
    redis-cli -p "$REDIS_PORT" flushall >/dev/null

    # tally: durable ingest (the configured durability mode, default fsync per group commit).
    log "starting tally serve (release) on $data"
    TALLY_HTTP_ADDR=127.0.0.1:0 TALLY_STORAGE_DATA_DIR="$data" TALLY_REDIS_URL="unix://$REDIS_SOCK" \
        start_http tally "$tally" serve --config "$root/config/default.toml"
    local tally_pid=${PIDS[-1]} tally_url="http://$LISTEN_ADDR"

    run_wrk tally-batch1000 8 "$BENCH_DIR/batch1000.lua" "$tally_url"
    local batch_rps=$RPS batch_p50=$P50 batch_p99=$P99 batch_cmd=$WRK_CMD batch_bad=$NON2XX
    local batch_eps
    batch_eps=$(mult "$batch_rps" 1000)

    run_wrk tally-single 64 "$BENCH_DIR/single.lua" "$tally_url"
    local single_rps=$RPS single_p50=$P50 single_p99=$P99 single_cmd=$WRK_CMD single_bad=$NON2XX

    local status
    status=$(curl -sf "$tally_url/v1/admin/status" || echo '{}')
    stop_pid "$tally_pid"

    log "starting the bare axum handler"
    start_http bare_axum "$bare"
    local bare_pid=${PIDS[-1]}
    run_wrk bare-single 64 "$BENCH_DIR/single.lua" "http://$LISTEN_ADDR"
    local bare_rps=$RPS bare_p50=$P50 bare_p99=$P99 bare_cmd=$WRK_CMD
    stop_pid "$bare_pid"
    stop_pid "$redis_pid"

    md "## Ingest: durable events/s vs Redis INCR and a bare axum handler" ""
    md "One run of \`scripts/bench.sh ingest\`: wrk ${DURATION} s per line, ${THREADS} wrk threads on the" \
        "same machine as the server (the load generator shares the cores). tally runs in release with" \
        "\`config/default.toml\` on a fresh data directory on the local disk, so every \`202\` waited for" \
        "the WAL fsync (group commit); its speed layer writes to a private redis-server over a unix socket." ""
    md "| what | command | requests/s | events/s | p50 | p99 | non-2xx |" \
        "|---|---|---:|---:|---:|---:|---:|" \
        "| tally, NDJSON bodies of 1000 events, 8 connections | \`$batch_cmd\` | $batch_rps | $batch_eps | $batch_p50 | $batch_p99 | $batch_bad |" \
        "| tally, one event per request, 64 connections | \`$single_cmd\` | $single_rps | $single_rps | $single_p50 | $single_p99 | $single_bad |" \
        "| bare axum handler (\`tests/examples/bare_axum.rs\`), same load | \`$bare_cmd\` | $bare_rps | – | $bare_p50 | $bare_p99 | – |" \
        "| redis-server INCR, pipelined by 100 | \`$redis_cmd\` | $redis_ops ops/s | – | – | – | – |" ""
    md "| ratio | value | goal |" "|---|---:|---|" \
        "| tally batched events/s ÷ Redis INCR ops/s | $(ratio "$batch_eps" "$redis_ops") | ≥ 0.5 (moonshot 1.0) |" \
        "| tally single-event requests/s ÷ bare axum requests/s | $(ratio "$single_rps" "$bare_rps") | ≥ 0.5 |" ""
    md "tally status after the run: \`$status\`" ""
}

# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

want=("$@")
if [ "${#want[@]}" -eq 0 ]; then want=("${SECTIONS[@]}"); fi
for s in "${want[@]}"; do
    declare -F "section_$s" >/dev/null || {
        echo "unknown section $s (have: ${SECTIONS[*]})" >&2
        exit 2
    }
done

need_tools
body="$BENCH_DIR/sections.md"
: >"$body"
for s in "${want[@]}"; do
    : >"$REPORT"
    "section_$s"
    cat "$REPORT" >>"$body"
done

ram=$(free -h | awk '/^Mem:/ {print $2}')
{
    echo "# Benchmarks"
    echo
    echo "Written by \`scripts/bench.sh ${want[*]}\`; rerun it to refresh. Numbers from one run on one machine:"
    echo "compare ratios measured in the same run, not absolute numbers across machines."
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- machine: $(lscpu | sed -n 's/^Model name: *//p' | head -n 1), $(nproc) cores, $ram RAM"
    echo "- kernel: $(uname -sr); $(rustc --version); $(wrk -v 2>&1 | head -n 1 | awk '{print $1, $2}'); $(redis-server --version | awk '{print $1, $2, $3}')"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    cat "$body"
} >"$OUT"
log "wrote $OUT"
