#!/usr/bin/env bash
# Rebuilds the dashboard bundle that tally embeds (crates/tally-serving/dashboard/) from its
# sources in dashboard/; commit the result. `cargo build` never needs npm.
#
#   scripts/dashboard.sh           # type-check, bundle, compress
#   scripts/dashboard.sh --check   # fail when the committed bundle is stale
#
# Needs Node.js >= 18 and npm (installs dashboard/node_modules from the lockfile when missing).
set -euo pipefail
cd "$(dirname "$0")/../dashboard"
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund
fi
node build.mjs "$@"
