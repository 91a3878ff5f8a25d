#!/usr/bin/env bash
# Everything CI checks, in order: install what the tests need, formatting, lints, build, tests.
#
#   scripts/test.sh            # from anywhere; runs unattended (CI=true, no stdin)
#
# Needs: a Rust toolchain (cargo, rustfmt, clippy). Installs Debian's redis-server when missing
# (as root, with apt-get; the system service is not started: the tests start private servers).
# Uses cargo-nextest when it is installed, else cargo test.
set -euo pipefail

cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export DEBIAN_FRONTEND=noninteractive

started=$(date +%s)
rm -f target/test-output.log
step() { printf '\n==> %s (%ss)\n' "$*" "$(($(date +%s) - started))"; }

# The closing line: "summary: N passed, N failed, N skipped", counted from the runners' output.
counts() {
    local log=target/test-output.log
    [ -s "$log" ] || return 0
    awk '
        / tests? run: / {               # nextest: "Summary [ 1.2s] 57 tests run: 55 passed, 2 failed, 1 skipped"
            for (i = 1; i <= NF; i++) {
                w = $(i + 1); sub(/[,;]$/, "", w)
                if (w == "passed") p += $i; else if (w == "failed") f += $i; else if (w == "skipped") s += $i
            }
        }
        /^test result: / {              # cargo test: "test result: ok. 3 passed; 0 failed; 1 ignored; ..."
            for (i = 1; i <= NF; i++) {
                w = $(i + 1); sub(/[,;]$/, "", w)
                if (w == "passed") p += $i; else if (w == "failed") f += $i; else if (w == "ignored") s += $i
            }
        }
        END { if (p + f + s > 0) printf "summary: %d passed, %d failed, %d skipped\n", p, f, s }
    ' "$log"
}

summary() {
    local rc=$?
    local took=$(($(date +%s) - started))
    echo
    if [ "$rc" -eq 0 ]; then
        echo "test.sh: OK: fmt, clippy, build and all tests passed in ${took}s"
    else
        echo "test.sh: FAILED (exit $rc) during: ${current:-setup}, after ${took}s" >&2
    fi
    counts
}
trap summary EXIT

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

current="installing test dependencies"
step "$current"
if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server
fi
redis-server --version

current="cargo fmt --check"
step "$current"
cargo fmt --all -- --check

current="cargo clippy"
step "$current"
cargo clippy --workspace --all-targets -- -D warnings

current="cargo build --bins"
step "$current"
# The end-to-end tests run target/debug/tally: build it first so it is never stale.
cargo build --workspace --bins

current="tests"
step "$current"
# Test output is also kept in target/test-output.log, from which the closing line is counted.
mkdir -p target
testlog=target/test-output.log
: >"$testlog"
run_logged() { "$@" 2>&1 | tee -a "$testlog"; }
if cargo nextest --version >/dev/null 2>&1; then
    run_logged cargo nextest run --workspace --no-fail-fast
    current="doc tests"
    step "$current"
    run_logged cargo test --doc --workspace
else
    run_logged cargo test --workspace --no-fail-fast
fi
current="done"
