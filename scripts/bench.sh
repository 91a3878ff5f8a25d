#!/usr/bin/env bash
# Benchmarks, written to BENCHMARKS.md: this driver installs what they need and builds the release
# binaries, then runs the benchmark program, scripts/bench.py (its docstring lists the sections
# and knobs; each section keeps its measurements as JSON in target/bench/results/).
#
#   scripts/bench.sh                 # every section but scale
#   scripts/bench.sh ingest          # durable ingest vs redis-benchmark INCR and a bare axum handler
#   scripts/bench.sh queries         # /v1/views and /v1/top vs a bare handler; ingest-to-visible
#   scripts/bench.sh batch           # batch layer (full and incremental) vs DuckDB on the same files
#   scripts/bench.sh uniques         # /v1/uniques over 30 days for a busy URL, 32 connections
#   scripts/bench.sh mixed           # queries while ingesting 100 000 events/s, 1M URLs, caches off
#   scripts/bench.sh analytics       # site, breakdown and Stats API queries on the mixed data
#   scripts/bench.sh scale           # 100 M events, 1 M URLs, a year (~15 min, ~10 GB of files)
#   scripts/bench.sh cluster         # 3 nodes on a private nats-server -js vs one node and raw JetStream
#
# Knobs (environment): BENCH_DURATION, BENCH_THREADS, BENCH_DIR, BENCH_OUT, BENCH_PERF=1,
# BENCH_REPLACE=1 and per-section sizes: see scripts/bench.py.
set -euo pipefail

cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

missing=()
command -v python3 >/dev/null 2>&1 || missing+=(python3 python3-venv)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-benchmark >/dev/null 2>&1 || missing+=(redis-tools)
[ -x /usr/bin/time ] || missing+=(time)
if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi

mapfile -t known < <(python3 scripts/bench.py list)
sections=("$@")
[ "${#sections[@]}" -gt 0 ] || mapfile -t sections < <(printf '%s\n' "${known[@]}" | grep -vx -e scale -e cluster)
for s in "${sections[@]}"; do
    printf '%s\n' "${known[@]}" | grep -qx -- "$s" || {
        echo "unknown section $s (have: ${known[*]})" >&2
        exit 2
    }
done
wants() { printf '%s\n' "${sections[@]}" | grep -qx "$1"; }
if wants batch || wants scale; then
    venv=target/venv-bench
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import duckdb' 2>/dev/null; then
        echo "==> installing duckdb (pip) into $venv" >&2
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q duckdb
    fi
fi
if wants analytics; then install_dashboard_deps; fi
if wants cluster && ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
    apt_install nats-server
fi

echo "==> building release binaries" >&2
cargo build --release --bin tally
cargo build --release -p tally-e2e --example bare_axum --example mixed --example nats_publish
cargo build --release -p tally-batch --example batch_bench

exec python3 scripts/bench.py run "${sections[@]}"
