#!/usr/bin/env bash
# Benchmarks, written to BENCHMARKS.md. Sections (run all by default, or name them):
#
#   scripts/bench.sh                 # every section
#   scripts/bench.sh ingest          # durable ingest vs redis-benchmark INCR and a bare axum handler
#   scripts/bench.sh batch           # batch layer (full recompute) vs DuckDB on the same files
#   scripts/bench.sh uniques         # /v1/uniques over 30 days for a busy URL, 32 connections
#   scripts/bench.sh mixed           # queries while ingesting 100 000 events/s, 1M URLs, caches off
#   scripts/bench.sh analytics       # site, breakdown and Stats API queries on the mixed data
#   scripts/bench.sh scale           # 100 M events, 1 M URLs, a year: full and incremental batch
#                                    # runs and DuckDB (not in the default list: ~15 min, ~10 GB)
#
# Knobs (environment): BENCH_DURATION (wrk seconds per run, default 10), BENCH_THREADS (wrk
# threads, default 2), BENCH_DIR (scratch directory on the real disk, default target/bench),
# BENCH_OUT (report, default BENCHMARKS.md), BENCH_PERF=1 (mixed: `perf record -g` of tally while
# it ingests, to BENCH_DIR/mixed/perf.data, for `perf report -i`).
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

# shellcheck source=scripts/lib.sh
. "$root/scripts/lib.sh" # apt_install

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
    rm -rf "$dir"
    REDIS_PORT=$(free_port)
    REDIS_SOCK="$dir/redis.sock"
    # TCP too (redis-benchmark uses it); a later --port overrides the helper's --port 0.
    start_private_redis "$dir" --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no || exit 1
    PIDS+=("$REDIS_PID")
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

# ================================================================================================
# Section: queries: `/v1/views` and `/v1/top` against a bare axum handler, and
# ingest-to-visible latency. `scripts/bench.sh queries`.
#
# 1M events over 10 000 URLs (ts spread over 30 days): 90% ingested, then a batch run, then 10%
# (so queries merge the batch view and the speed layer). wrk at 32 connections on
# /v1/views?url=<random of the 10 000> and /v1/top?limit=10, beside the bare axum handler in the
# same run; then ingest-to-visible latency (POST one event, poll /v1/views until it counts).
# Knobs: BENCH_QUERY_EVENTS (default 1000000), BENCH_QUERY_URLS (default 10000).
# ================================================================================================

# Loads events into tally with a keep-alive client: PHASE is "batch" (first 90%) or "speed" (10%).
queries_load() { # BASE_URL PHASE
    python3 - "$1" "$2" "${BENCH_QUERY_EVENTS:-1000000}" "${BENCH_QUERY_URLS:-10000}" <<'PY'
import http.client, json, random, sys, time, urllib.parse
base, phase, total, nurls = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
u = urllib.parse.urlparse(base)
conn = http.client.HTTPConnection(u.hostname, u.port)
n = total * 9 // 10 if phase == "batch" else total - total * 9 // 10
rng = random.Random(1 if phase == "batch" else 2)
now = int(time.time() * 1000)
sent, per = 0, 10000
while sent < n:
    k = min(per, n - sent)
    lines = []
    for _ in range(k):
        i = rng.randrange(nurls)
        lines.append('{"url":"https://q%d.bench/page/%d","ts":%d,"visitor":"v%d"}'
                     % (i % 50, i, now - rng.randrange(30 * 86400000), rng.randrange(100000)))
    conn.request("POST", "/v1/events", body="\n".join(lines) + "\n",
                 headers={"Content-Type": "application/x-ndjson"})
    r = conn.getresponse(); body = r.read()
    if r.status != 202:
        sys.exit("ingest failed: %d %s" % (r.status, body[:200]))
    sent += k
print(sent)
PY
}

# Polls the status until every acknowledged event is visible to queries.
queries_wait_caught_up() { # BASE_URL
    local s _
    for _ in $(seq 1 600); do
        s=$(curl -sf "$1/v1/admin/status" || echo '{}')
        if python3 -c 'import json,sys; s=json.loads(sys.argv[1]); sys.exit(0 if s.get("acked_seq") is not None and s.get("acked_seq")==s.get("speed_applied_seq") else 1)' "$s"; then
            return
        fi
        sleep 0.1
    done
    echo "the speed layer did not catch up: $s" >&2
    exit 1
}

# POST one new event, poll /v1/views until it counts; N samples; prints "p50 p99 max" in ms.
queries_visible_latency() { # BASE_URL N
    python3 - "$1" "$2" <<'PY'
import http.client, json, sys, time, urllib.parse
base, n = sys.argv[1], int(sys.argv[2])
u = urllib.parse.urlparse(base)
post = http.client.HTTPConnection(u.hostname, u.port)
get = http.client.HTTPConnection(u.hostname, u.port)
tag = int(time.time())
lat = []
for k in range(n):
    url = "https://latency.bench/%d/%d" % (tag, k)
    q = "/v1/views?url=" + urllib.parse.quote(url, safe="")
    t0 = time.perf_counter()
    post.request("POST", "/v1/events", body=json.dumps({"url": url}),
                 headers={"Content-Type": "application/json"})
    r = post.getresponse(); r.read()
    if r.status != 202:
        sys.exit("POST: %d" % r.status)
    while True:
        get.request("GET", q)
        r = get.getresponse(); b = json.loads(r.read())
        if r.status == 200 and b.get("views") == 1:
            break
        if time.perf_counter() - t0 > 10:
            sys.exit("event not visible after 10 s: %s" % b)
    lat.append((time.perf_counter() - t0) * 1000)
lat.sort()
pick = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
print("%.2fms %.2fms %.2fms" % (pick(0.50), pick(0.99), lat[-1]))
PY
}

# start_redis, checked on the unix socket tally uses: its TCP ping can be answered by another
# redis-server that took the same free port a moment earlier. Retries on a new port.
queries_start_redis() {
    local attempt _
    for attempt in 1 2 3; do
        start_redis
        for _ in $(seq 1 50); do
            if [ "$(redis-cli -s "$REDIS_SOCK" ping 2>/dev/null)" = PONG ]; then return; fi
            sleep 0.1
        done
        log "redis-server on port $REDIS_PORT did not answer on $REDIS_SOCK (attempt $attempt)"
    done
    echo "could not start a private redis-server" >&2
    exit 1
}

section_queries() {
    log "building release binaries"
    cargo build --release --bin tally
    cargo build --release -p tally-e2e --example bare_axum
    local tally="$root/target/release/tally" bare="$root/target/release/examples/bare_axum"
    local events=${BENCH_QUERY_EVENTS:-1000000} urls=${BENCH_QUERY_URLS:-10000}

    queries_start_redis
    local redis_pid=${PIDS[-1]}
    local data="$BENCH_DIR/data-queries"
    rm -rf "$data" && mkdir -p "$data"
    log "starting tally serve (release) on $data"
    TALLY_HTTP_ADDR=127.0.0.1:0 TALLY_STORAGE_DATA_DIR="$data" TALLY_REDIS_URL="unix://$REDIS_SOCK" \
        start_http tally-queries "$tally" serve --config "$root/config/default.toml"
    local tally_pid=${PIDS[-1]} tally_url="http://$LISTEN_ADDR"

    log "loading 90% of $events events over $urls URLs, batch run, then 10%"
    local t0 t1 t2
    t0=$(date +%s.%N)
    queries_load "$tally_url" batch >/dev/null
    t1=$(date +%s.%N)
    local run
    run=$(curl -sf -X POST "$tally_url/v1/admin/batch?wait=true")
    t2=$(date +%s.%N)
    queries_load "$tally_url" speed >/dev/null
    queries_wait_caught_up "$tally_url"
    local load_s run_s
    load_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    run_s=$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.1f", b - a }')

    cat >"$BENCH_DIR/views.lua" <<EOF
math.randomseed(7)
request = function()
  local i = math.random(0, $urls - 1)
  return wrk.format("GET", string.format("/v1/views?url=https%%3A%%2F%%2Fq%d.bench%%2Fpage%%2F%d", i % 50, i))
end
EOF
    cat >"$BENCH_DIR/top.lua" <<'EOF'
request = function() return wrk.format("GET", "/v1/top?limit=10") end
EOF
    cat >"$BENCH_DIR/bare.lua" <<'EOF'
request = function() return wrk.format("POST", "/v1/events", {["Content-Type"] = "application/json"}, '{"url":"https://q1.bench/page/1"}') end
EOF

    run_wrk tally-views 32 "$BENCH_DIR/views.lua" "$tally_url"
    local views_rps=$RPS views_p50=$P50 views_p99=$P99 views_cmd=$WRK_CMD views_bad=$NON2XX
    run_wrk tally-top 32 "$BENCH_DIR/top.lua" "$tally_url"
    local top_rps=$RPS top_p50=$P50 top_p99=$P99 top_cmd=$WRK_CMD top_bad=$NON2XX

    log "ingest-to-visible latency"
    local vis
    vis=$(queries_visible_latency "$tally_url" 500)
    local sample status
    sample=$(curl -sf "$tally_url/v1/views?url=https%3A%2F%2Fq1.bench%2Fpage%2F1")
    status=$(curl -sf "$tally_url/v1/admin/status" || echo '{}')
    stop_pid "$tally_pid"

    log "starting the bare axum handler"
    start_http bare_axum-queries "$bare"
    local bare_pid=${PIDS[-1]}
    run_wrk bare-queries 32 "$BENCH_DIR/bare.lua" "http://$LISTEN_ADDR"
    local bare_rps=$RPS bare_p50=$P50 bare_p99=$P99 bare_cmd=$WRK_CMD
    stop_pid "$bare_pid"
    stop_pid "$redis_pid"

    local vis_p50 vis_p99 vis_max
    read -r vis_p50 vis_p99 vis_max <<<"$vis"
    md "## Queries: /v1/views and /v1/top vs a bare axum handler; ingest-to-visible latency" ""
    md "One run of \`scripts/bench.sh queries\`: $events events over $urls URLs (ts spread over 30 days)," \
        "90% ingested (${load_s} s) then a batch run (${run_s} s: \`$(echo "$run" | tr -d '\n' | cut -c1-160)…\`)," \
        "then 10% left in the speed layer, so every query merges the batch view with the speed layer." \
        "wrk ${DURATION} s per line, ${THREADS} wrk threads, 32 connections, on the same machine as the server." \
        "The bare axum handler (\`tests/examples/bare_axum.rs\`) only has POST routes, so its baseline is a" \
        "POST of one small body answered \`202\` without any work." ""
    md "| what | command | requests/s | p50 | p99 | non-2xx |" \
        "|---|---|---:|---:|---:|---:|" \
        "| \`GET /v1/views?url=<random of $urls>\` | \`$views_cmd\` | $views_rps | $views_p50 | $views_p99 | $views_bad |" \
        "| \`GET /v1/top?limit=10\` | \`$top_cmd\` | $top_rps | $top_p50 | $top_p99 | $top_bad |" \
        "| bare axum handler | \`$bare_cmd\` | $bare_rps | $bare_p50 | $bare_p99 | – |" ""
    md "| measure | value | goal |" "|---|---:|---|" \
        "| views requests/s ÷ bare axum requests/s | $(ratio "$views_rps" "$bare_rps") | ≥ 0.5 |" \
        "| views p99 at 32 connections | $views_p99 | ≤ 2 ms |" \
        "| top (limit 10) p99 at 32 connections | $top_p99 | ≤ 5 ms |" \
        "| ingest-to-visible p50 / p99 / max (500 events, POST then poll views, python keep-alive client) | $vis_p50 / $vis_p99 / $vis_max | p99 ≤ 10 ms |" ""
    md "A sample answer: \`$sample\`" "" "tally status after the run: \`$status\`" ""
}
SECTIONS+=(queries)

# ================================================================================================
# Section: batch (with the sketch goal): the batch layer vs DuckDB on the same
# master files, in the same run. `scripts/bench.sh batch`.
#
# Generates a master dataset (BENCH_BATCH_EVENTS, default 5 000 000 events over BENCH_BATCH_URLS,
# default 100 000 URLs, Zipf(1.0), BENCH_BATCH_DAYS, default 90 days, 5 files) with the
# tally-batch `batch_bench` example, then on those files:
#   - tally: `batch_bench` computes the batch view (per (url, 15-minute cell) counts and per-URL totals;
#     with sketches also one HLL sketch per (url, day)) and writes the view (Parquet, zstd,
#     fsynced, manifest); best of BENCH_BATCH_REPS compute runs + the write of the last one.
#   - DuckDB (pip, in target/venv-bench, `SET threads=2`): the same outputs from the same files
#     (`seq <= cutoff`, per (url, 15-minute cell) counts sorted by (url, cell), zstd Parquet, fsynced; with
#     sketches also `approx_count_distinct(visitor)` per (url, day)); best of BENCH_BATCH_REPS.
# ================================================================================================

# Builds the batch_bench example (BATCH_BENCH is its path), installs DuckDB, makes DIR.
batch_bench_prepare() { # DIR VENV
    log "building the batch_bench example (release)"
    cargo build --release -p tally-batch --example batch_bench
    BATCH_BENCH="$root/target/release/examples/batch_bench"
    ensure_duckdb "$2"
    mkdir -p "$1"
}

ensure_duckdb() { # VENV: duckdb from pip in its own venv, once
    local venv=$1
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import duckdb' 2>/dev/null; then
        log "installing duckdb (pip) into $venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q duckdb
    fi
}

batch_duckdb() { # MASTER_DIR OUT_DIR CUTOFF REPS -> JSON lines on stdout
    "$root/target/venv-bench/bin/python" - "$@" <<'PY'
import json, os, sys, time
import duckdb
master, out, cutoff, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.makedirs(out, exist_ok=True)
files = os.path.join(master, "*.parquet")
con = duckdb.connect()
con.execute("SET threads=2")
con.execute("SET TimeZone='UTC'")
src = f"read_parquet('{files}')"
hours = (f"SELECT url, epoch_ms(ts) // 900000 AS cell, count(*)::UBIGINT AS views FROM {src} "
         f"WHERE seq <= {cutoff} GROUP BY ALL ORDER BY url, cell")
days = (f"SELECT url, epoch_ms(ts) // 86400000 AS day, approx_count_distinct(visitor) AS uniques "
        f"FROM {src} WHERE seq <= {cutoff} GROUP BY ALL ORDER BY url, day")
def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
def copy(query, path):
    con.execute(f"COPY ({query}) TO '{path}' (FORMAT parquet, COMPRESSION zstd)")
    fsync(path)
for mode in ("counts", "counts+sketches"):
    for rep in range(reps):
        # End to end, as one would run it: read + decode + aggregate + sort + write, per output.
        t = time.perf_counter()
        copy(hours, os.path.join(out, "counts.parquet"))
        if mode != "counts":
            copy(days, os.path.join(out, "uniques.parquet"))
        total_ms = (time.perf_counter() - t) * 1000
        # The same split into stages: aggregate (incl. read + decode) into memory, then write.
        t = time.perf_counter()
        con.execute(f"CREATE OR REPLACE TEMP TABLE h AS {hours}")
        if mode != "counts":
            con.execute(f"CREATE OR REPLACE TEMP TABLE d AS {days}")
        agg_ms = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        copy("SELECT * FROM h", os.path.join(out, "counts2.parquet"))
        if mode != "counts":
            copy("SELECT * FROM d", os.path.join(out, "uniques2.parquet"))
        write_ms = (time.perf_counter() - t) * 1000
        cells, events = con.execute("SELECT count(*), sum(views) FROM h").fetchone()
        line = {"engine": "duckdb", "mode": mode, "rep": rep, "total_ms": round(total_ms, 1),
                "read_decode_aggregate_ms": round(agg_ms, 1), "write_ms": round(write_ms, 1),
                "cells": cells, "events": int(events)}
        if mode != "counts":
            line["day_cells"] = con.execute("SELECT count(*) FROM d").fetchone()[0]
        print(json.dumps(line), flush=True)
print(json.dumps({"engine": "duckdb", "version": duckdb.__version__}))
PY
}

# Best-of summary of the JSON lines: prints "tally_ms duckdb_ms" etc. for one mode.
batch_summary() { # TALLY_JSON DUCKDB_JSON MODE
    python3 - "$@" <<'PY'
import json, sys
tally = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
duck = [json.loads(l) for l in open(sys.argv[2]) if l.startswith("{")]
mode = sys.argv[3]
t = [x for x in tally if x.get("stage") == "compute" and x.get("mode") == mode]
d = [x for x in duck if x.get("mode") == mode]
best = min(t, key=lambda x: x["compute_ms"])
write = [x for x in t if "write_ms" in x][-1]
tally_total = best["compute_ms"] + write["write_ms"]
dbest = min(d, key=lambda x: x["total_ms"])
dagg = min(x["read_decode_aggregate_ms"] for x in d)
dwrite = min(x["write_ms"] for x in d)
reps_t = "/".join("%.0f" % x["compute_ms"] for x in t)
reps_d = "/".join("%.0f" % x["total_ms"] for x in d)
print("\t".join(str(v) for v in [
    "%.0f" % tally_total, "%.0f" % best["compute_ms"], "%.0f" % best["open_ms"],
    "%.0f" % best["scan_ms"], "%.0f" % best["read_decode_cpu_ms"], "%.0f" % best["aggregate_cpu_ms"],
    "%.0f" % best["merge_ms"], "%.0f" % write["write_ms"], reps_t,
    "%.0f" % dbest["total_ms"], "%.0f" % dagg, "%.0f" % dwrite, reps_d,
    "%.2f" % (dbest["total_ms"] / tally_total),
    best["cells"], best["events"], dbest["cells"], dbest["events"]]))
PY
}

section_batch() {
    local events=${BENCH_BATCH_EVENTS:-5000000} urls=${BENCH_BATCH_URLS:-100000}
    local days=${BENCH_BATCH_DAYS:-90} reps=${BENCH_BATCH_REPS:-3}
    local dir="$BENCH_DIR/batch" venv="$root/target/venv-bench"
    batch_bench_prepare "$dir" "$venv"
    local bb=$BATCH_BENCH
    local gen_cmd="cargo run --release -p tally-batch --example batch_bench -- --events $events --urls $urls --days $days --dir DIR --generate-only"
    log "$gen_cmd"
    "$bb" --events "$events" --urls "$urls" --days "$days" --dir "$dir" --generate-only | tee "$dir/generate.json" >&2
    local cutoff=$events

    local tally_cmd="cargo run --release -p tally-batch --example batch_bench -- --dir DIR --reps $reps"
    log "tally: $tally_cmd"
    "$bb" --dir "$dir" --reps "$reps" | tee "$dir/tally.json" >&2
    log "duckdb: same outputs, same files"
    batch_duckdb "$dir/master" "$dir/duckdb-out" "$cutoff" "$reps" | tee "$dir/duckdb.json" >&2
    local duck_version
    duck_version=$(sed -n 's/.*"version": "\([^"]*\)".*/\1/p' "$dir/duckdb.json")

    local c s
    c=$(batch_summary "$dir/tally.json" "$dir/duckdb.json" counts)
    s=$(batch_summary "$dir/tally.json" "$dir/duckdb.json" counts+sketches)
    local ct cc co cs crd cag cme cw creps dt dag dw dreps cr ccells cev dcells dev
    IFS=$'\t' read -r ct cc co cs crd cag cme cw creps dt dag dw dreps cr ccells cev dcells dev <<<"$c"
    local st sc so ss srd sag sme sw sreps sdt sdag sdw sdreps sr scells sev sdcells sdev
    IFS=$'\t' read -r st sc so ss srd sag sme sw sreps sdt sdag sdw sdreps sr scells sev sdcells sdev <<<"$s"
    local bytes
    bytes=$(sed -n 's/.*"bytes":\([0-9]*\).*/\1/p' "$dir/generate.json")

    md "## Batch layer vs DuckDB: full recompute on the same master files" ""
    md "One run of \`scripts/bench.sh batch\` ($(date -u +%Y-%m-%dT%H:%MZ), $(lscpu | sed -n 's/^Model name: *//p' | head -n 1), $(nproc) cores," \
        "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), load average before the section $(cut -d' ' -f1-3 /proc/loadavg))." \
        "Master dataset: \`$gen_cmd\` — $events events, $urls URLs (Zipf 1.0 over 50 hosts), $days days," \
        "5 Parquet files ($bytes bytes, url dictionary-encoded, zstd, sorted by (url, ts), 1M-row row groups)." \
        "Both engines read the same files in the same run, one after the other, and produce the same outputs:" \
        "per (url, 15-minute cell) view counts (\`seq <= cutoff\`), sorted by (url, cell), written as zstd Parquet and fsynced;" \
        "with sketches also per (url, day) unique visitors (tally: its HLL sketch per (url, day), precision 14;" \
        "DuckDB: \`approx_count_distinct(visitor)\`). tally: \`$tally_cmd\` (the kernel of \`tally batch run\`:" \
        "read + decode + aggregate on rayon, merge, then the view store write with manifest), best compute of $reps" \
        "plus the write. DuckDB $duck_version from pip in \`target/venv-bench\`, \`SET threads=2\`, one \`COPY (SELECT … GROUP BY … ORDER BY …) TO … (FORMAT parquet, COMPRESSION zstd)\`" \
        "per output, best of $reps. Per-stage times: tally's from the example's JSON (CPU ms summed over threads for" \
        "read+decode and aggregate, wall ms for the rest); DuckDB's split is aggregate-into-a-temp-table, then write." ""
    md "| what | tally total ms | DuckDB total ms | DuckDB ÷ tally | goal |" "|---|---:|---:|---:|---|" \
        "| per (url, 15-minute cell) counts | $ct | $dt | ${cr}× | ≥ 2× |" \
        "| counts + uniques per (url, day) | $st | $sdt | ${sr}× | ≥ 2× |" ""
    md "| stage (ms) | tally counts | tally counts + sketches |" "|---|---:|---:|" \
        "| open files + metadata (wall) | $co | $so |" \
        "| scan: read + decode + aggregate (wall) | $cs | $ss |" \
        "| … read + decode (CPU, all threads) | $crd | $srd |" \
        "| … aggregate (CPU, all threads) | $cag | $sag |" \
        "| merge per-file results (wall) | $cme | $sme |" \
        "| compute total (wall; reps $creps / $sreps) | $cc | $sc |" \
        "| write the view (wall) | $cw | $sw |" ""
    md "| stage (ms) | DuckDB counts | DuckDB counts + uniques |" "|---|---:|---:|" \
        "| read + decode + aggregate + sort into a temp table | $dag | $sdag |" \
        "| write Parquet (zstd) + fsync | $dw | $sdw |" \
        "| end to end, \`COPY (query) TO\` (reps $dreps / $sdreps) | $dt | $sdt |" ""
    md "Same answer: tally $ccells (url, cell) entries over $cev events; DuckDB $dcells cells over $dev events." ""

    # Incremental runs: the same events in 100 files, so that one new file is 1 % of
    # the data; every cached run's view is asserted equal to the scan's by the example.
    local idir="$BENCH_DIR/batch-incremental"
    mkdir -p "$idir"
    local inc_cmd="cargo run --release -p tally-batch --example batch_bench -- --events $events --urls $urls --days $days --files 100 --dir DIR --incremental"
    log "incremental: $inc_cmd"
    "$bb" --events "$events" --urls "$urls" --days "$days" --files 100 --dir "$idir" --incremental |
        tee "$idir/incremental.json" >&2
    local rows
    rows=$(python3 - "$idir/incremental.json" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("stage") != "incremental":
        continue
    print("| %s | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f MB | %.0f %% |" % (
        r["mode"], r["scan_all_ms"], r["first_cached_run_ms"], r["one_new_file_ms"],
        r["one_new_file_merge_ms"], r["nothing_new_ms"], r["partial_bytes"] / 1e6,
        100.0 * r["one_new_file_ms"] / r["scan_all_ms"]))
PY
)
    md "### Incremental runs: cached partials per master file" "" \
        "\`$inc_cmd\` — the same $events events in 100 master files (in time order, as the sealer writes" \
        "them: each holds about $((days / 100 + 1)) day of events over most of the URLs). Per pass of a run, with sketches: scanning every file" \
        "without a cache, the first cached run (which writes the partials), a run where one file of 100" \
        "(1 % of the events) is new, and a run where nothing is. Goal: a run with 1 % new" \
        "data ≤ 5 % of the full run." "" \
        "| pass | scan every file ms | first cached run ms | one new file ms | … of which merge ms | nothing new ms | partials on disk | one new ÷ scan |" \
        "|---|---:|---:|---:|---:|---:|---:|---:|" "$rows" ""
}
SECTIONS+=(batch)

# ================================================================================================
# Section: scale. `scripts/bench.sh scale` (not part of a plain `scripts/bench.sh`).
# BENCH_SCALE_EVENTS (default 100 000 000) events over BENCH_SCALE_URLS (1 000 000) URLs and
# BENCH_SCALE_DAYS (365) days, generated straight into BENCH_SCALE_FILES (100) time-ordered
# Parquet files by the batch_bench example (not through HTTP; kept under BENCH_DIR, out of git).
# Then, per pass of a batch run (per URL, per source key; visitors at precision 14): a scan of
# every file, a first cached run, a run where one file (1 %) is new, a run where nothing is; and
# DuckDB's per (url, cell) counts with uniques per (url, day) on the same files. Peak RSS of
# each process from /usr/bin/time -v. Then a whole view (both passes) written and loaded in a
# fresh process: the serving memory per (key, cell).
# ================================================================================================

section_scale() {
    local events=${BENCH_SCALE_EVENTS:-100000000} urls=${BENCH_SCALE_URLS:-1000000}
    local days=${BENCH_SCALE_DAYS:-365} files=${BENCH_SCALE_FILES:-100}
    local dir="$BENCH_DIR/scale" venv="$root/target/venv-bench"
    batch_bench_prepare "$dir" "$venv"
    local bb=$BATCH_BENCH
    local args=(--events "$events" --urls "$urls" --days "$days" --files "$files" --dir "$dir")
    local cmd="cargo run --release -p tally-batch --example batch_bench -- --events $events --urls $urls --days $days --files $files --dir DIR"
    log "generating: $cmd --generate-only"
    /usr/bin/time -v "$bb" "${args[@]}" --generate-only 2>"$dir/generate.time" | tee "$dir/generate.json" >&2
    log "tally: $cmd --incremental"
    /usr/bin/time -v "$bb" "${args[@]}" --incremental 2>"$dir/incremental.time" | tee "$dir/incremental.json" >&2
    log "tally: $cmd --serving (a whole view as the runner makes it, written, then loaded in a fresh process)"
    /usr/bin/time -v "$bb" "${args[@]}" --serving 2>"$dir/serving.time" | tee "$dir/serving.json" >&2
    log "duckdb: the same files"
    root="$root" /usr/bin/time -v bash -c "$(declare -f batch_duckdb); batch_duckdb '$dir/master' '$dir/duckdb-out' '$events' 1" \
        2>"$dir/duckdb.time" | tee "$dir/duckdb.json" >&2
    local rss_tally rss_duck bytes gen_ms
    rss_tally=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$dir/incremental.time")
    rss_duck=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$dir/duckdb.time")
    bytes=$(sed -n 's/.*"bytes":\([0-9]*\).*/\1/p' "$dir/generate.json")
    gen_ms=$(sed -n 's/.*"ms":\([0-9.]*\).*/\1/p' "$dir/generate.json")
    local rows duck
    rows=$(python3 - "$dir/incremental.json" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("stage") != "incremental":
        continue
    print("| %s | %.1f | %.1f | %.1f | %.1f | %.0f MB | %.1f %% |" % (
        r["mode"], r["scan_all_ms"] / 1e3, r["first_cached_run_ms"] / 1e3,
        r["one_new_file_ms"] / 1e3, r["nothing_new_ms"] / 1e3, r["partial_bytes"] / 1e6,
        100.0 * r["one_new_file_ms"] / r["scan_all_ms"]))
PY
)
    duck=$(python3 - "$dir/duckdb.json" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
out = {r["mode"]: r["total_ms"] for r in rows if "mode" in r}
print(" / ".join("%s %.1f s" % (m, ms / 1e3) for m, ms in out.items()))
PY
)
    md "## Scale: 100 M events, full and incremental batch runs" ""
    md "One run of \`scripts/bench.sh scale\` ($(date -u +%Y-%m-%dT%H:%MZ), $(lscpu | sed -n 's/^Model name: *//p' | head -n 1), $(nproc) cores," \
        "$(free -g | awk '/^Mem:/ {print $2}') GiB, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))." \
        "Master dataset: \`$cmd --generate-only\` — $events events, $urls URLs (Zipf 1.0 over 50 hosts), $days days," \
        "$files time-ordered Parquet files, $bytes bytes, generated in $(printf '%.0f' "$gen_ms") ms. Per pass of a batch run, with" \
        "visitors: \`$cmd --incremental\` (times in seconds; every cached run's view asserted equal to the scan's)." ""
    md "| pass | scan every file s | first cached run s | one new file ($((100 / files)) % of the events) s | nothing new s | partials on disk | one new ÷ scan |" \
        "|---|---:|---:|---:|---:|---:|---:|" "$rows" ""
    local serving
    serving=$(python3 - "$dir/serving.json" "$dir/serving.time" <<'PY'
import json, re, sys
rows = {}
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        rows[r["stage"]] = r
w, l = rows["serving-write"], rows["serving-load"]
peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(sys.argv[2]).read()).group(1)) * 1024
cells = w["url_cells"] + w["source_cells"]
rss = l["rss_after_load"] - l["rss_before_load"]
print("Serving: both passes computed and written as the runner does (%.1f s compute, %.1f s write, %.2f GB on disk, peak RSS %.1f GB with both views alive);"
      " then loaded in a fresh process as `tally serve` loads it: %.1f s, RSS %.2f GB for %d (key, 15-minute cell) entries (%d per URL, %d per source key) and %d per-cell visitor hashes —"
      " %.0f bytes per (key, cell) all told. Of those, the counts take 20 bytes per entry (cell number 8, prefix sum 8, visitor-list offset 4) and the visitor hashes 4 bytes each; the rest is day and week sketches, site unions and the key indexes."
      % (w["compute_ms"] / 1e3, w["write_ms"] / 1e3, w["view_bytes"] / 1e9, peak / 1e9, l["load_ms"] / 1e3, rss / 1e9, cells, w["url_cells"], w["source_cells"], w["cell_visitor_hashes"], rss / cells))
PY
)
    md "Peak RSS: tally's example (all of the above, one process) $((rss_tally / 1024)) MiB; DuckDB (\`SET threads=2\`, counts and counts + uniques, one rep each) $((rss_duck / 1024)) MiB." \
        "DuckDB end to end: $duck (per (url, 15-minute cell) counts; with \`approx_count_distinct(visitor)\` per (url, day)). tally's full scan of the per-URL pass is the comparable number." "" "$serving" ""
}

# ================================================================================================
# Section: uniques: `GET /v1/uniques` over a 30-day range for one busy URL at 32
# connections. `scripts/bench.sh uniques`. Reuses the queries section's loader with one URL:
# BENCH_UNIQUES_EVENTS (default 300 000) events on https://q0.bench/page/0, visitors drawn from
# 100 000, ts spread over 30 days; 90% then a batch run, then 10% in the speed layer, so every
# answer merges the batch view's day sketches with the speed layer's visitor sets (30 days each).
# ================================================================================================

section_uniques() {
    log "building release binaries"
    cargo build --release --bin tally
    local tally="$root/target/release/tally" events=${BENCH_UNIQUES_EVENTS:-300000}
    queries_start_redis
    local redis_pid=${PIDS[-1]}
    local data="$BENCH_DIR/data-uniques"
    rm -rf "$data" && mkdir -p "$data"
    TALLY_HTTP_ADDR=127.0.0.1:0 TALLY_STORAGE_DATA_DIR="$data" TALLY_REDIS_URL="unix://$REDIS_SOCK" \
        start_http tally-uniques "$tally" serve --config "$root/config/default.toml"
    local tally_pid=${PIDS[-1]} tally_url="http://$LISTEN_ADDR"
    log "loading $events events on one URL (90%, batch run, 10%)"
    BENCH_QUERY_EVENTS=$events BENCH_QUERY_URLS=1 queries_load "$tally_url" batch >/dev/null
    local run
    run=$(curl -sf -X POST "$tally_url/v1/admin/batch?wait=true")
    BENCH_QUERY_EVENTS=$events BENCH_QUERY_URLS=1 queries_load "$tally_url" speed >/dev/null
    queries_wait_caught_up "$tally_url"
    local from to q
    from=$(date -u -d '30 days ago' +%Y-%m-%dT%H:%M:%SZ)
    to=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    q="/v1/uniques?url=https%3A%2F%2Fq0.bench%2Fpage%2F0&from=$from&to=$to"
    cat >"$BENCH_DIR/uniques.lua" <<LUA
request = function() return wrk.format("GET", "$q") end
LUA
    local sample
    sample=$(curl -sf "$tally_url$q")
    run_wrk tally-uniques 32 "$BENCH_DIR/uniques.lua" "$tally_url"
    local status
    status=$(curl -sf "$tally_url/v1/admin/status" || echo '{}')
    stop_pid "$tally_pid"
    stop_pid "$redis_pid"
    md "## Uniques: /v1/uniques over 30 days for a busy URL" ""
    md "One run of \`scripts/bench.sh uniques\` ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))," \
        "$events events on one URL (visitors drawn from 100 000, ts over 30 days): 90% then a batch run" \
        "(\`$(echo "$run" | tr -d '\n' | cut -c1-100)…\`), then 10% left in the speed layer, so each answer merges" \
        "31 batch day sketches with the speed layer's visitor sets. wrk ${DURATION} s, ${THREADS} threads, 32 connections," \
        "on the same machine as the server; \`$q\`." ""
    md "| what | command | requests/s | p50 | p99 | non-2xx | goal |" "|---|---|---:|---:|---:|---:|---|" \
        "| \`GET /v1/uniques\`, 30 days, busy URL | \`$WRK_CMD\` | $RPS | $P50 | $P99 | $NON2XX | p99 ≤ 5 ms |" ""
    md "A sample answer: \`$sample\`" "" "tally status after the run: \`$status\`" ""
}
SECTIONS+=(uniques)

# ================================================================================================
# Section: mixed: queries while ingesting, on a long tail of URLs, caches disabled.
# `scripts/bench.sh mixed`.
#
# tally (release, `query.result_cache = false`) is loaded by `tests/examples/mixed.rs` with
# BENCH_MIXED_EVENTS (default 10 000 000) events over BENCH_MIXED_URLS (default 1 000 000) URLs
# (Zipf popularity, Zipf over 1 000 hosts, 30 days), then two batch runs (the second lets the
# speed layer drop the loaded epoch). Then, while `mixed ingest` sends BENCH_MIXED_RATE (default
# 100 000) events/s as NDJSON bodies of 1 000 and measures ingest-to-visible latency, wrk runs
# (32 connections) on the bare axum handler and on /v1/views, /v1/top?limit=10,
# /v1/top?limit=10&host=H and /v1/uniques (30 days), each with random URLs/hosts from the load.
# ================================================================================================

mixed_lua() { # FILE KIND(views|top|host|uniques|site|breakdown|stats) DIR
    local from
    from=$(date -u -d '30 days ago' +%Y-%m-%dT%H:00:00Z)
    cat >"$1" <<LUA
local kind = "$2"
local function enc(s)
  return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end
local items = {}
local by_host = kind == "host" or kind == "site" or kind == "breakdown" or kind == "stats"
local list = by_host and "$3/hosts.txt" or "$3/urls.txt"
for line in io.lines(list) do items[#items + 1] = by_host and line or enc(line) end
math.randomseed(os.time() + math.random(1, 1000))
request = function()
  local x = items[math.random(1, #items)]
  if kind == "site" then return wrk.format("GET", "/v1/site?host=" .. x .. "&from=$from&granularity=day") end
  if kind == "breakdown" then return wrk.format("GET", "/v1/breakdown?host=" .. x .. "&by=source&limit=10&from=$from") end
  if kind == "stats" then
    return wrk.format("POST", "/api/v2/query", { ["Content-Type"] = "application/json" },
      '{"site_id":"' .. x .. '","metrics":["pageviews","visitors"],"date_range":"30d","dimensions":["event:page"],"pagination":{"limit":10}}')
  end
  if kind == "top" then return wrk.format("GET", "/v1/top?limit=10") end
  if kind == "host" then return wrk.format("GET", "/v1/top?limit=10&host=" .. x) end
  if kind == "uniques" then return wrk.format("GET", "/v1/uniques?url=" .. x .. "&from=$from") end
  return wrk.format("GET", "/v1/views?url=" .. x)
end
LUA
}

# A wrk p99 as a multiple of a reference p99 (both as wrk prints them).
p99x() { # REFERENCE_P99 P99
    awk -v a="$(wrk_ms "$2")" -v b="$(wrk_ms "$1")" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'
}

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# A wrk latency ("812.00us", "3.21ms", "1.02s") in ms.
wrk_ms() { awk -v x="$1" 'BEGIN { if (x ~ /us$/) printf "%.3f", x / 1000; else if (x ~ /ms$/) printf "%.3f", x + 0; else if (x ~ /s$/) printf "%.3f", x * 1000; else print x }'; }

# Builds, starts Redis and tally on BENCH_DIR/mixed, loads it, runs two batch runs, restarts
# tally on the loaded data and starts the bare axum handler; sets MIXED_* for the caller.
mixed_prepare() {
    log "building release binaries"
    cargo build --release --bin tally
    cargo build --release -p tally-e2e --example bare_axum --example mixed
    local tally="$root/target/release/tally" bare="$root/target/release/examples/bare_axum"
    local gen="$root/target/release/examples/mixed"
    local events=${BENCH_MIXED_EVENTS:-10000000} urls=${BENCH_MIXED_URLS:-1000000}
    local rate=${BENCH_MIXED_RATE:-100000} dir="$BENCH_DIR/mixed"
    rm -rf "$dir" && mkdir -p "$dir"

    queries_start_redis
    local redis_pid=${PIDS[-1]}
    log "starting tally serve (release, result caches off) on $dir/data"
    TALLY_HTTP_ADDR=127.0.0.1:0 TALLY_STORAGE_DATA_DIR="$dir/data" TALLY_REDIS_URL="unix://$REDIS_SOCK" \
        TALLY_QUERY_RESULT_CACHE=false TALLY_SPEED_GC_GRACE=1s \
        start_http tally-mixed "$tally" serve --config "$root/config/default.toml"
    local tally_pid=${PIDS[-1]} tally_url="http://$LISTEN_ADDR"

    log "loading $events events over $urls URLs"
    "$gen" load "$tally_url" "$dir" --events "$events" --urls "$urls" | tee "$dir/load.json" >&2
    queries_wait_caught_up "$tally_url"
    local run1 run2 _
    run1=$(curl -sf -X POST "$tally_url/v1/admin/batch?wait=true")
    run2=$(curl -sf -X POST "$tally_url/v1/admin/batch?wait=true")
    # The loaded epoch is collected a second after the second view serves.
    for _ in $(seq 1 300); do
        if [ "$(curl -sf "$tally_url/v1/admin/status" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["speed_epochs"]))')" = 1 ]; then break; fi
        sleep 0.1
    done
    # Serving memory without what the load left in the allocator: restart, load the view and the
    # speed state from Redis, measure when ready.
    stop_pid "$tally_pid"
    TALLY_HTTP_ADDR=127.0.0.1:0 TALLY_STORAGE_DATA_DIR="$dir/data" TALLY_REDIS_URL="unix://$REDIS_SOCK" \
        TALLY_QUERY_RESULT_CACHE=false TALLY_SPEED_GC_GRACE=1s \
        start_http tally-mixed2 "$tally" serve --config "$root/config/default.toml"
    tally_pid=${PIDS[-1]}
    tally_url="http://$LISTEN_ADDR"
    for _ in $(seq 1 600); do
        if curl -sf "$tally_url/readyz" >/dev/null; then break; fi
        sleep 0.1
    done
    local idle_rss redis_idle
    # UNLINK frees in the background: wait until Redis has freed the collected epoch.
    for _ in $(seq 1 600); do
        if redis-cli -s "$REDIS_SOCK" info memory | grep -q '^lazyfree_pending_objects:0'; then break; fi
        sleep 0.1
    done
    idle_rss=$(rss_kb "$tally_pid")
    redis_idle=$(redis-cli -s "$REDIS_SOCK" info memory | awk -F: '/^used_memory:/ {print $2+0}')
    # Kept for reading by hand: which epochs Redis still holds, and how many keys.
    { redis-cli -s "$REDIS_SOCK" info keyspace; redis-cli -s "$REDIS_SOCK" smembers tally:epochs; } >"$dir/redis-idle.txt" 2>&1 || true

    start_http bare_axum-mixed "$bare"
    local k
    for k in views top host uniques site breakdown stats; do mixed_lua "$dir/$k.lua" "$k" "$dir"; done
    MIXED_DIR=$dir MIXED_GEN=$gen MIXED_EVENTS=$events MIXED_URLS=$urls MIXED_RATE=$rate
    MIXED_REDIS_PID=$redis_pid MIXED_TALLY_PID=$tally_pid MIXED_TALLY_URL=$tally_url
    MIXED_BARE_PID=${PIDS[-1]} MIXED_BARE_URL="http://$LISTEN_ADDR" MIXED_IDLE_RSS=$idle_rss
    MIXED_REDIS_IDLE=$redis_idle MIXED_RUN1=$run1 MIXED_RUN2=$run2
}

# Starts the steady ingest of MIXED_RATE events/s for RUNS wrk runs (and some slack) in the
# background; INGEST_PID is its process.
mixed_ingest() { # RUNS
    local ingest_s=$((DURATION * $1 + 10))
    log "ingesting $MIXED_RATE events/s for $ingest_s s while wrk runs"
    "$MIXED_GEN" ingest "$MIXED_TALLY_URL" "$MIXED_DIR" --rate "$MIXED_RATE" --seconds "$ingest_s" \
        --urls "$MIXED_URLS" >"$MIXED_DIR/ingest.json" &
    INGEST_PID=$!
    PIDS+=("$INGEST_PID")
    sleep 3 # let the ingest reach its rate before measuring
}

section_mixed() {
    mixed_prepare
    local dir=$MIXED_DIR events=$MIXED_EVENTS urls=$MIXED_URLS rate=$MIXED_RATE
    local redis_pid=$MIXED_REDIS_PID tally_pid=$MIXED_TALLY_PID tally_url=$MIXED_TALLY_URL
    local bare_pid=$MIXED_BARE_PID bare_url=$MIXED_BARE_URL idle_rss=$MIXED_IDLE_RSS
    local redis_idle=$MIXED_REDIS_IDLE run1=$MIXED_RUN1 run2=$MIXED_RUN2
    mixed_ingest 5
    local ingest_pid=$INGEST_PID
    if [ "${BENCH_PERF:-0}" = 1 ]; then
        perf record -F 499 -g -p "$tally_pid" -o "$dir/perf.data" -- sleep $((DURATION * 5)) >/dev/null 2>&1 &
        PIDS+=("$!")
    fi
    run_wrk mixed-bare 32 "$dir/views.lua" "$bare_url"
    local bare_rps=$RPS bare_p50=$P50 bare_p99=$P99 bare_cmd=$WRK_CMD
    run_wrk mixed-views 32 "$dir/views.lua" "$tally_url"
    local views_rps=$RPS views_p50=$P50 views_p99=$P99 views_bad=$NON2XX
    run_wrk mixed-top 32 "$dir/top.lua" "$tally_url"
    local top_rps=$RPS top_p50=$P50 top_p99=$P99 top_bad=$NON2XX
    run_wrk mixed-host 32 "$dir/host.lua" "$tally_url"
    local host_rps=$RPS host_p50=$P50 host_p99=$P99 host_bad=$NON2XX
    run_wrk mixed-uniques 32 "$dir/uniques.lua" "$tally_url"
    local uniq_rps=$RPS uniq_p50=$P50 uniq_p99=$P99 uniq_bad=$NON2XX
    local busy_rss redis_busy status
    busy_rss=$(rss_kb "$tally_pid")
    redis_busy=$(redis-cli -s "$REDIS_SOCK" info memory | awk -F: '/^used_memory:/ {print $2+0}')
    status=$(curl -sf "$tally_url/v1/admin/status" || echo '{}')
    # Kept for reading by hand (e.g. tally_speed_mirror_write_seconds: how long queries can wait).
    curl -sf "$tally_url/metrics" >"$dir/metrics.txt" || true
    { redis-cli -s "$REDIS_SOCK" info keyspace; redis-cli -s "$REDIS_SOCK" smembers tally:epochs; } >"$dir/redis-busy.txt" 2>&1 || true
    wait "$ingest_pid" || true
    stop_pid "$bare_pid"
    stop_pid "$tally_pid"
    stop_pid "$redis_pid"

    local summary
    summary=$(python3 - "$dir" "$status" "$run2" "$idle_rss" "$busy_rss" "$redis_idle" "$redis_busy" <<'PY'
import json, os, sys
d, status, run = sys.argv[1], json.loads(sys.argv[2] or "{}"), json.loads(sys.argv[3] or "{}")
idle_rss, busy_rss, redis_idle, redis_busy = (int(x) for x in sys.argv[4:8])
ing = json.load(open(os.path.join(d, "ingest.json")))
manifest = json.load(open(os.path.join(d, "data/views/batch", run["version"], "manifest.json")))
live = sum(e.get("urls", 0) for e in status.get("speed_epochs", []))
cells = manifest["cells"]
v, l = ing.get("visible_ms") or {}, ing.get("lag_events") or {}
print("\t".join(str(x) for x in [
    "%.0f" % ing["rate"], ing["failed_requests"],
    "%.1f" % v.get("p50", 0), "%.1f" % v.get("p99", 0), "%.1f" % v.get("max", 0),
    "%.0f" % l.get("p50", 0), "%.0f" % l.get("p99", 0), cells, manifest["urls"],
    "%.0f" % (idle_rss * 1024 / max(cells, 1)), live,
    "%.0f" % (redis_busy / max(live, 1)), idle_rss // 1024, busy_rss // 1024,
    redis_idle // (1 << 20), redis_busy // (1 << 20)]))
PY
)
    local ing_rate ing_failed vis_p50 vis_p99 vis_max lag_p50 lag_p99 cells view_urls bytes_cell live bytes_live rss_idle rss_busy r_idle r_busy
    IFS=$'\t' read -r ing_rate ing_failed vis_p50 vis_p99 vis_max lag_p50 lag_p99 cells view_urls bytes_cell live bytes_live rss_idle rss_busy r_idle r_busy <<<"$summary"
    md "## Mixed: queries while ingesting, a million URLs, caches off" ""
    md "One run of \`scripts/bench.sh mixed\` ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))." \
        "tally (release, \`TALLY_QUERY_RESULT_CACHE=false\`: every answer computed) loaded by \`tests/examples/mixed.rs load\`" \
        "with $events events over $urls URLs (popularity Zipf 1.0, URLs spread over 1 000 hosts by Zipf, ts over 30 days)," \
        "then two batch runs (the view: $view_urls URLs, $cells (url, 15-minute cell) entries; \`$(echo "$run1" | tr -d '\n' | cut -c1-120)…\`)." \
        "Then \`mixed ingest\` sent NDJSON bodies of 1 000 events at a target of $rate events/s (achieved $ing_rate/s, $ing_failed failed requests)" \
        "while wrk (${DURATION} s, ${THREADS} threads, 32 connections, random URLs and hosts of the load) ran one line after the other," \
        "first against the bare axum handler (\`tests/examples/bare_axum.rs\`, \`GET /v1/views\` answering a fixed body) under the same ingest." \
        "Everything shares the machine's cores: wrk, the ingest generator, redis-server and tally." ""
    md "| what (under ${rate} events/s of ingest) | requests/s | p50 | p99 | non-2xx | p99 ÷ bare p99 | goal |" "|---|---:|---:|---:|---:|---:|---|" \
        "| bare axum handler, \`$bare_cmd\` | $bare_rps | $bare_p50 | $bare_p99 | – | 1 | – |" \
        "| \`/v1/views?url=<random>\` | $views_rps | $views_p50 | $views_p99 | $views_bad | $(p99x "$bare_p99" "$views_p99") | ≤ 2; requests/s ≥ 0.5× bare (here $(ratio "$views_rps" "$bare_rps")×) |" \
        "| \`/v1/top?limit=10\` | $top_rps | $top_p50 | $top_p99 | $top_bad | $(p99x "$bare_p99" "$top_p99") | ≤ 3 |" \
        "| \`/v1/top?limit=10&host=<random>\` | $host_rps | $host_p50 | $host_p99 | $host_bad | $(p99x "$bare_p99" "$host_p99") | ≤ 3 |" \
        "| \`/v1/uniques?url=<random>&from=<30 days ago>\` | $uniq_rps | $uniq_p50 | $uniq_p99 | $uniq_bad | $(p99x "$bare_p99" "$uniq_p99") | ≤ 3 |" ""
    md "| measure | value | goal |" "|---|---:|---|" \
        "| ingest-to-visible (POST one event on a new URL, poll /v1/views) p50 / p99 / max | $vis_p50 / $vis_p99 / $vis_max ms | p99 ≤ 100 ms |" \
        "| applier lag in events (sampled every 20 ms) p50 / p99 | $lag_p50 / $lag_p99 | – |" \
        "| tally RSS, restarted on the loaded data (view loaded, idle) / at the end of the mixed load | $rss_idle / $rss_busy MiB | – |" \
        "| serving memory per (url, 15-minute cell) entry of the batch view (restarted idle RSS ÷ cells; includes per-URL index, day sketches, the process) | $bytes_cell bytes | stated |" \
        "| Redis \`used_memory\` idle / under the mixed load | $r_idle / $r_busy MiB | – |" \
        "| Redis bytes per live URL (\`used_memory\` ÷ the $live URLs of the live epochs) | $bytes_live | ≤ 800 (half of ~1 600) |" ""
    md "tally status at the end: \`$status\`" ""
}
SECTIONS+=(mixed)

# ================================================================================================
# Section: analytics: the site-analytics endpoints on the mixed section's data (1M
# URLs over 1 000 hosts, 10M events, referrers from a Zipf list of sites), while the same steady
# ingest runs, caches off: /v1/site over 30 days by day, /v1/breakdown?by=source (30 days) and
# POST /api/v2/query (pageviews + visitors by event:page, 30d), each on random hosts, with the
# bare axum handler under the same ingest as the reference. `scripts/bench.sh analytics`.
# ================================================================================================
section_analytics() {
    mixed_prepare
    local dir=$MIXED_DIR
    mixed_ingest 4
    run_wrk analytics-bare 32 "$dir/views.lua" "$MIXED_BARE_URL"
    local bare_rps=$RPS bare_p50=$P50 bare_p99=$P99 bare_cmd=$WRK_CMD
    run_wrk analytics-site 32 "$dir/site.lua" "$MIXED_TALLY_URL"
    local site_rps=$RPS site_p50=$P50 site_p99=$P99 site_bad=$NON2XX
    run_wrk analytics-breakdown 32 "$dir/breakdown.lua" "$MIXED_TALLY_URL"
    local bd_rps=$RPS bd_p50=$P50 bd_p99=$P99 bd_bad=$NON2XX
    run_wrk analytics-stats 32 "$dir/stats.lua" "$MIXED_TALLY_URL"
    local st_rps=$RPS st_p50=$P50 st_p99=$P99 st_bad=$NON2XX
    # The dashboard's first view of the busiest site (30 days), in Chromium, while the ingest
    # finishes (needs node, chromium and dashboard/node_modules: scripts/test.sh installs them).
    local dash='{}' top_host
    top_host=$(head -n 1 "$dir/hosts.txt")
    if command -v node >/dev/null && [ -x /usr/bin/chromium ] && [ -d "$root/dashboard/node_modules" ]; then
        dash=$(cd "$root/dashboard" && TALLY_URL="$MIXED_TALLY_URL" SITE="$top_host" node test/first_view.mjs) || dash='{}'
    fi
    local status
    status=$(curl -sf "$MIXED_TALLY_URL/v1/admin/status" || echo '{}')
    wait "$INGEST_PID" || true
    stop_pid "$MIXED_BARE_PID"
    stop_pid "$MIXED_TALLY_PID"
    stop_pid "$MIXED_REDIS_PID"
    local ing_rate lag_p99
    read -r ing_rate lag_p99 < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("%.0f" % d["rate"], "%.0f" % (d.get("lag_events") or {}).get("p99", 0))' "$dir/ingest.json")
    md "## Analytics: site, breakdown and Stats API queries while ingesting" ""
    md "One run of \`scripts/bench.sh analytics\` ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))," \
        "on the data of the mixed section ($MIXED_EVENTS events, $MIXED_URLS URLs over 1 000 hosts, 30 days, two batch runs, tally restarted on it," \
        "\`TALLY_QUERY_RESULT_CACHE=false\`), while \`mixed ingest\` sent $MIXED_RATE events/s (achieved $ing_rate/s; applier lag p99 $lag_p99 events)." \
        "wrk: ${DURATION} s, ${THREADS} threads, 32 connections, a random host of the load per request; one run after the other." ""
    md "| what (under ingest) | requests/s | p50 | p99 | non-2xx | p99 ÷ bare p99 | goal |" "|---|---:|---:|---:|---:|---:|---|" \
        "| bare axum handler, \`$bare_cmd\` | $bare_rps | $bare_p50 | $bare_p99 | – | 1 | – |" \
        "| \`/v1/site?host=<random>&from=<30 days ago>&granularity=day\` | $site_rps | $site_p50 | $site_p99 | $site_bad | $(p99x "$bare_p99" "$site_p99") | p99 ≤ 10 ms |" \
        "| \`/v1/breakdown?host=<random>&by=source&limit=10&from=<30 days ago>\` | $bd_rps | $bd_p50 | $bd_p99 | $bd_bad | $(p99x "$bare_p99" "$bd_p99") | p99 ≤ 10 ms |" \
        "| \`POST /api/v2/query\` pageviews + visitors by \`event:page\`, \`30d\`, limit 10 | $st_rps | $st_p50 | $st_p99 | $st_bad | $(p99x "$bare_p99" "$st_p99") | p99 ≤ 10 ms |" ""
    local dash_med dash_max dash_full dash_bytes
    read -r dash_med dash_max dash_full dash_bytes < <(python3 -c 'import json,sys; d=json.loads(sys.argv[1] or "{}"); print(*(d.get(k, "n/a") for k in ("interactive_ms_median", "interactive_ms_max", "complete_ms_median", "first_view_bytes")))' "$dash")
    md "Dashboard, first view of the busiest site ($top_host, last 30 days) in headless Chromium with an empty cache, 5 runs" \
        "(\`dashboard/test/first_view.mjs\`): navigation start to the totals, chart and realtime on screen median $dash_med ms, worst $dash_max ms" \
        "(goal ≤ 1 000 ms); to the six breakdown panels filled too, median $dash_full ms; page transferred $dash_bytes bytes (goal ≤ 100 KB)." ""
    md "tally status at the end: \`$status\`" ""
}
SECTIONS+=(analytics)

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
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
body="$BENCH_DIR/sections.md"
: >"$body"
for s in "${want[@]}"; do
    : >"$REPORT"
    "section_$s"
    cat "$REPORT" >>"$body"
done

ram=$(free -h | awk '/^Mem:/ {print $2}')
new="$BENCH_DIR/new-report.md"
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
    echo "- load average (1, 5, 15 min) before / after: $load_before / $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    cat "$body"
} >"$new"
# Sections of $OUT that this run did not produce (and hand-written ones) are kept in place; a
# section this run produced replaces the one with the same heading, or is appended.
# BENCH_REPLACE=1 writes this run's report alone.
if [ -f "$OUT" ] && [ "${BENCH_REPLACE:-0}" != 1 ]; then
    python3 - "$OUT" "$new" >"$OUT.tmp" <<'PY'
import sys
def split(path):
    head, blocks, cur = [], [], None
    for line in open(path, encoding="utf-8"):
        if line.startswith("## "):
            cur = [line]
            blocks.append(cur)
        elif cur is None:
            head.append(line)
        else:
            cur.append(line)
    return head, blocks
_, old = split(sys.argv[1])
head, new = split(sys.argv[2])
fresh = {b[0]: b for b in new}
out = []
for b in old:
    out.append(fresh.pop(b[0], b))
out.extend(b for b in new if b[0] in fresh)
head.append("Sections this run did not produce are kept from earlier runs (see the run each names).\n\n")
sys.stdout.write("".join(head) + "".join("".join(b) for b in out))
PY
    mv "$OUT.tmp" "$OUT"
else
    mv "$new" "$OUT"
fi
log "wrote $OUT"
