//! Browser tests: the Node.js scripts under `dashboard/test/` drive Debian's Chromium with
//! `playwright-core` against a [`TestServer`]. `scripts/test.sh` installs Node.js, Chromium and
//! `dashboard/node_modules`; without them a test reports itself skipped (and fails on CI).

use std::path::PathBuf;
use std::process::Command;

use crate::{skip, workspace_root, TestServer};

/// `dashboard/`: the npm package holding the dashboard, its build and the browser tests.
pub fn dashboard_dir() -> PathBuf {
    workspace_root().join("dashboard")
}

/// Whether Node.js and the dashboard's packages are there (else `test` is reported skipped).
pub fn node_ready(test: &str) -> bool {
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        skip(test, "node is not installed (scripts/test.sh installs it)");
        return false;
    }
    if !dashboard_dir()
        .join("node_modules")
        .join("playwright-core")
        .is_dir()
    {
        skip(
            test,
            "dashboard/node_modules is missing (scripts/test.sh runs npm ci there)",
        );
        return false;
    }
    true
}

/// Debian's Chromium, if installed.
fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Node.js, the packages and Chromium, or `None` after reporting `test` skipped.
pub fn browser_ready(test: &str) -> Option<PathBuf> {
    if !node_ready(test) {
        return None;
    }
    let found = chromium();
    if found.is_none() {
        skip(
            test,
            "chromium is not installed (scripts/test.sh installs it)",
        );
    }
    found
}

/// Runs `node <script>` in `dashboard/` against `server` (`TALLY_URL`, `CHROMIUM`, and `env`),
/// printing its output and failing with it, and the server's log, when it fails.
pub fn run_browser_script(
    script: &str,
    server: &TestServer,
    chromium: &PathBuf,
    env: &[(&str, String)],
) {
    let out = Command::new("node")
        .arg(script)
        .current_dir(dashboard_dir())
        .env("TALLY_URL", server.base_url())
        .env("CHROMIUM", chromium)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap_or_else(|e| panic!("cannot run node {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}{stderr}\n--- tally log ---\n{}",
        server.log()
    );
}
