#!/usr/bin/env bash
# Fuzzes the event body parser (tally-core) with cargo-fuzz / libFuzzer for a bounded time.
#
#   scripts/fuzz.sh [SECONDS]     # default 60
#
# Installs cargo-fuzz when missing. cargo-fuzz needs nightly compiler flags; with the stable
# toolchain they are enabled with RUSTC_BOOTSTRAP=1 (for this build only).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi
cd fuzz
mkdir -p corpus/parse_body
printf '%s' '{"url":"http://example.com/a"}' >corpus/parse_body/object.json
printf '%s' '[{"url":"HTTP://Example.COM:80/a#x","ts":1794999999000,"visitor":"v"}]' >corpus/parse_body/array.json
printf '%s\n%s\n' '{"url":"https://a.b/"}' '{"url":"https://a.b/c","ts":"2026-11-18T00:00:00Z"}' >corpus/parse_body/lines.ndjson
RUSTC_BOOTSTRAP=1 cargo fuzz run parse_body corpus/parse_body -- -max_total_time="$secs" -max_len=4096
