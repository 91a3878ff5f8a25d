//! End-to-end test harness: the real `tally` binary over HTTP against a private `redis-server`.
//!
//! - [`TestRedis`] starts a `redis-server` on a unix socket in its own temporary directory (never
//!   the machine's Redis on 6379), killed on `Drop`.
//! - [`TestServer`] starts `tally serve` on `127.0.0.1:0` with its own data directory and (unless
//!   told otherwise) its own [`TestRedis`], reads the address from the first line of stdout, keeps
//!   the process output in a log file and prints it when the test fails, kills the process on
//!   `Drop`.
//! - [`TestNats`] starts a `nats-server -js` on a free loopback port with its store in its own
//!   temporary directory (never the machine's NATS on 4222), for cluster mode's log.
//! - [`read_master`] reads every row of `master/**/*.parquet` with the parquet crate.
//! - [`Model`] (module `model`) is the reference model of acknowledged events the query tests
//!   compare the server against, with the helpers that send events and assert the answers.
//!
//! The binary is `$TALLY_BIN` when set, else `<workspace>/target/debug/tally`, built once with
//! `cargo build -p tally --bin tally` when it is missing. `scripts/test.sh` builds it first.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub mod bench;
pub mod browser;
mod files;
mod model;
mod nats;
mod redis;
mod redis_cluster;
mod server;
pub use files::*;
pub use model::*;
pub use nats::*;
pub use redis::*;
pub use redis_cluster::*;
pub use server::*;

/// A test that cannot run here says so: it prints `SKIPPED <test>: <reason>` and returns —
/// except on CI (`CI` set, as `scripts/test.sh` runs there), where a test that cannot run is a
/// failure: the machine CI runs on must be able to run every test.
pub fn skip(test: &str, reason: &str) {
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false") {
        panic!("{test} cannot run on CI: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
}

/// How long the harness waits for a process to come up or for a condition to hold.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Polls `f` every few milliseconds until it returns `Some`, panicking with `what` after `deadline`.
pub fn poll_until<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn send_signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
