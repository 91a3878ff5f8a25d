//! End-to-end test harness: the real `tally` binary over HTTP against a private `redis-server`.
//!
//! - [`TestRedis`] starts a `redis-server` on a unix socket in its own temporary directory (never
//!   the machine's Redis on 6379), killed on `Drop`.
//! - [`TestServer`] starts `tally serve` on `127.0.0.1:0` with its own data directory and (unless
//!   told otherwise) its own [`TestRedis`], reads the address from the first line of stdout, keeps
//!   the process output in a log file and prints it when the test fails, kills the process on
//!   `Drop`.
//! - [`read_master`] reads every row of `master/**/*.parquet` with the parquet crate.
//! - [`Model`] (module `model`) is the reference model of acknowledged events the query tests
//!   compare the server against, with the helpers that send events and assert the answers.
//!
//! The binary is `$TALLY_BIN` when set, else `<workspace>/target/debug/tally`, built once with
//! `cargo build -p tally --bin tally` when it is missing. `scripts/test.sh` builds it first.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type, SchemaRef, UInt64Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;

pub mod bench;
pub mod browser;
mod model;
pub use model::*;

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

// ---------------------------------------------------------------------------------------------
// TestRedis
// ---------------------------------------------------------------------------------------------

/// A private `redis-server` listening on a unix socket in its own temporary directory, without
/// persistence unless started with [`TestRedis::start_persistent`]. Killed on `Drop`.
pub struct TestRedis {
    dir: tempfile::TempDir,
    socket: PathBuf,
    child: Option<Child>,
    /// Append-only file with `fsync` on every write: a restart keeps the data.
    persistent: bool,
}

impl TestRedis {
    /// Starts a fresh, empty `redis-server` and waits until it answers `PING`.
    pub fn start() -> TestRedis {
        TestRedis::start_with(false)
    }

    /// Like [`TestRedis::start`], but every write is kept in an append-only file, so that
    /// [`TestRedis::restart`] brings the same data back (a Redis that was down, not emptied).
    pub fn start_persistent() -> TestRedis {
        TestRedis::start_with(true)
    }

    fn start_with(persistent: bool) -> TestRedis {
        let dir = tempfile::Builder::new()
            .prefix("tally-redis-")
            .tempdir()
            .expect("create a temporary directory for redis");
        let socket = dir.path().join("redis.sock");
        let mut redis = TestRedis {
            dir,
            socket,
            child: None,
            persistent,
        };
        redis.spawn();
        redis
    }

    /// Starts the server again after [`TestRedis::kill`], with whatever it persisted.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let _ = fs::remove_file(&self.socket);
        let log = File::create(self.dir.path().join("redis.log")).expect("create redis.log");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&self.socket)
            .args(["--unixsocketperm", "700", "--save", ""])
            .args(if self.persistent {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "everysec"]
            })
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}); install it: apt-get install -y redis-server"
                )
            });
        self.child = Some(child);
        let socket = self.socket.clone();
        poll_until("redis-server to answer PING", DEADLINE, || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("redis-server exited with {status}: {}", self.log());
            }
            ping(&socket).then_some(())
        });
    }

    /// A URL the redis crate accepts: `unix:///…/redis.sock`.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The unix socket path (for `redis-cli -s` / `redis-benchmark -s`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether the server answers `PING`.
    pub fn is_up(&self) -> bool {
        ping(&self.socket)
    }

    /// `kill -9` the server and wait for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server (if running) and starts an empty one on the same socket.
    pub fn restart_empty(&mut self) {
        self.kill();
        for entry in fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with("appendonly")
            {
                let _ = fs::remove_dir_all(entry.path());
                let _ = fs::remove_file(entry.path());
            }
        }
        self.spawn();
    }

    /// Runs `redis-cli -s <socket> args…` and returns its standard output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn ping(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

// ---------------------------------------------------------------------------------------------
// TestServer
// ---------------------------------------------------------------------------------------------

/// How to start a [`TestServer`].
#[derive(Debug, Default, Clone)]
pub struct ServerOpts {
    /// Extra environment variables (`TALLY_<SECTION>_<KEY>` overrides), applied last.
    pub env: Vec<(String, String)>,
    /// Redis to use; `None` starts a private [`TestRedis`] owned by the server.
    pub redis_url: Option<String>,
    /// `--config FILE`, if any.
    pub config: Option<PathBuf>,
}

impl ServerOpts {
    /// Adds an environment variable.
    pub fn env(mut self, key: &str, value: impl ToString) -> ServerOpts {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Uses this Redis instead of a private one.
    pub fn redis_url(mut self, url: impl ToString) -> ServerOpts {
        self.redis_url = Some(url.to_string());
        self
    }
}

/// Where the `tally` binary is: `$TALLY_BIN`, else `<target>/debug/tally`, built once if missing.
pub fn tally_bin() -> PathBuf {
    static BUILD: Once = Once::new();
    if let Some(bin) = std::env::var_os("TALLY_BIN") {
        return PathBuf::from(bin);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let bin = target.join("debug").join("tally");
    BUILD.call_once(|| {
        if bin.exists() {
            return;
        }
        eprintln!(
            "{} is missing: running cargo build -p tally --bin tally",
            bin.display()
        );
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "tally", "--bin", "tally"])
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build -p tally --bin tally failed");
    });
    assert!(bin.exists(), "{} does not exist", bin.display());
    bin
}

type SharedLog = Arc<Mutex<File>>;

/// A running `tally serve` with its own data directory. Killed on `Drop`; when the test is
/// failing, the server's output is printed.
pub struct TestServer {
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    log_path: PathBuf,
    opts: ServerOpts,
    redis: Option<TestRedis>,
    redis_url: String,
    child: Option<Child>,
    addr: String,
    client: reqwest::blocking::Client,
    admin_token: Option<String>,
    starts: u32,
}

impl TestServer {
    /// Starts `tally serve` and waits for `listening on http://…` on its standard output.
    pub fn start(opts: ServerOpts) -> TestServer {
        let dir = tempfile::Builder::new()
            .prefix("tally-e2e-")
            .tempdir()
            .expect("create a temporary directory");
        let data_dir = dir.path().join("data");
        fs::create_dir_all(&data_dir).expect("create data dir");
        let (redis, redis_url) = match &opts.redis_url {
            Some(url) => (None, url.clone()),
            None => {
                let r = TestRedis::start();
                let url = r.url();
                (Some(r), url)
            }
        };
        let admin_token = opts
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "TALLY_AUTH_ADMIN_TOKEN")
            .map(|(_, v)| v.clone());
        let mut server = TestServer {
            log_path: dir.path().join("server.log"),
            dir,
            data_dir,
            opts,
            redis,
            redis_url,
            child: None,
            addr: String::new(),
            client: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .expect("build http client"),
            admin_token,
            starts: 0,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "tally is already running");
        self.starts += 1;
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open server.log");
        let log: SharedLog = Arc::new(Mutex::new(log_file));
        writeln!(
            log.lock().unwrap(),
            "===== tally serve, start #{} =====",
            self.starts
        )
        .unwrap();

        let mut cmd = Command::new(tally_bin());
        cmd.arg("serve");
        if let Some(config) = &self.opts.config {
            cmd.arg("--config").arg(config);
        }
        cmd.env("TALLY_HTTP_ADDR", "127.0.0.1:0")
            .env("TALLY_STORAGE_DATA_DIR", &self.data_dir)
            .env("TALLY_REDIS_URL", &self.redis_url)
            // Tests read `master/**/*.parquet` directly, as DuckDB would, and compaction changes
            // that glob under a direct reader (API.md: a file can vanish or show up twice for
            // milliseconds). Off unless a test turns it on (the compaction test does).
            .env("TALLY_STORAGE_COMPACT_INTERVAL", "0s")
            .env("RUST_BACKTRACE", "1");
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn tally serve");

        let (tx, rx) = mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("stdout is piped");
        let out_log = log.clone();
        thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on http://") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.trim().to_string());
                    }
                }
                let _ = writeln!(out_log.lock().unwrap(), "[stdout] {line}");
            }
        });
        let stderr = child.stderr.take().expect("stderr is piped");
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log.lock().unwrap(), "{line}");
            }
        });

        let start = Instant::now();
        let addr = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(addr) => break addr,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().ok();
                    thread::sleep(Duration::from_millis(50)); // let the stderr thread finish
                    panic!(
                        "tally serve exited ({status:?}) before printing its address:\n{}",
                        self.log()
                    );
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                thread::sleep(Duration::from_millis(50));
                panic!(
                    "tally serve exited with {status} before listening:\n{}",
                    self.log()
                );
            }
            if start.elapsed() > DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "tally serve did not print its address within {DEADLINE:?}:\n{}",
                    self.log()
                );
            }
        };
        self.addr = addr;
        self.child = Some(child);
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The server's `storage.data_dir`.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The private Redis, when the server owns one.
    pub fn redis(&mut self) -> Option<&mut TestRedis> {
        self.redis.as_mut()
    }

    /// The blocking HTTP client the helpers use.
    pub fn client(&self) -> &reqwest::blocking::Client {
        &self.client
    }

    /// `GET /metrics`: the value of the unlabelled sample `name` (0 when absent, as
    /// Prometheus reads a counter never incremented).
    pub fn metric(&self, name: &str) -> f64 {
        let resp = self
            .client
            .get(format!("{}/metrics", self.base_url()))
            .send()
            .expect("GET /metrics");
        let text = resp.text().expect("metrics text");
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// Everything the server printed so far (all starts).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url(), path)
    }

    fn with_auth(
        &self,
        req: reqwest::blocking::RequestBuilder,
    ) -> reqwest::blocking::RequestBuilder {
        match &self.admin_token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    /// `POST /v1/events` with this body and `Content-Type`: `(status, body as JSON)`.
    pub fn post_events(&self, body: impl Into<Vec<u8>>, content_type: &str) -> (u16, Value) {
        let resp = self
            .client
            .post(self.url("/v1/events"))
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body.into())
            .send()
            .unwrap_or_else(|e| panic!("POST /v1/events failed: {e}"));
        into_status_json(resp)
    }

    /// `POST /v1/events` returning the transport error instead of panicking (for crash tests).
    pub fn try_post_events(
        &self,
        body: impl Into<Vec<u8>>,
        content_type: &str,
    ) -> Result<(u16, Value), reqwest::Error> {
        let resp = self
            .client
            .post(self.url("/v1/events"))
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body.into())
            .send()?;
        Ok(into_status_json(resp))
    }

    /// `GET path` (with the admin token when one is configured): `(status, body as JSON)`.
    pub fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .with_auth(self.client.get(self.url(path)))
            .send()
            .unwrap_or_else(|e| panic!("GET {path} failed: {e}"));
        into_status_json(resp)
    }

    /// `POST path` with an empty body (with the admin token when one is configured).
    pub fn post(&self, path: &str) -> (u16, Value) {
        let resp = self
            .with_auth(self.client.post(self.url(path)))
            .send()
            .unwrap_or_else(|e| panic!("POST {path} failed: {e}"));
        into_status_json(resp)
    }

    /// `GET /v1/admin/status`, asserting `200`.
    pub fn status(&self) -> Value {
        let (code, body) = self.get("/v1/admin/status");
        assert_eq!(code, 200, "GET /v1/admin/status: {body}");
        body
    }

    /// `acked_seq` from the status (0 when absent or null).
    pub fn acked_seq(&self) -> u64 {
        self.status()["acked_seq"].as_u64().unwrap_or(0)
    }

    /// Polls the status until `speed_applied_seq == acked_seq`. Returns at once when the server
    /// does not report `speed_applied_seq` (no speed layer yet).
    pub fn wait_caught_up(&self) {
        poll_until("speed_applied_seq == acked_seq", DEADLINE, || {
            let s = self.status();
            match (&s["speed_applied_seq"], &s["acked_seq"]) {
                (Value::Null, _) => Some(()),
                (applied, acked) if applied == acked => Some(()),
                _ => None,
            }
        })
    }

    /// `POST /v1/admin/flush`, asserting `200`; returns `sealed_through_seq`.
    pub fn flush(&self) -> u64 {
        let (code, body) = self.post("/v1/admin/flush");
        assert_eq!(code, 200, "POST /v1/admin/flush: {body}");
        body["sealed_through_seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("flush response without sealed_through_seq: {body}"))
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// `kill -9` the server and wait for it to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `SIGTERM` and waits (up to the deadline) for a graceful exit; returns whether the
    /// process exited successfully. Kills it if it does not exit in time.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        send_signal(child.id(), "TERM");
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if start.elapsed() > DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same data directory and Redis (stopping it gracefully
    /// first if it is still running). The port changes.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            let ok = self.stop();
            assert!(ok, "tally did not shut down cleanly:\n{}", self.log());
        }
        self.spawn();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
        if thread::panicking() {
            eprintln!(
                "----- tally output ({}) -----\n{}\n----- end of tally output -----",
                self.log_path.display(),
                self.log()
            );
            if std::env::var_os("TALLY_TEST_KEEP").is_some() {
                let kept = std::mem::replace(
                    &mut self.dir,
                    tempfile::tempdir().expect("create a temporary directory"),
                );
                eprintln!("kept test directory {}", kept.keep().display());
            }
        }
    }
}

fn into_status_json(resp: reqwest::blocking::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().unwrap_or_default();
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, json)
}

// ---------------------------------------------------------------------------------------------
// The master dataset
// ---------------------------------------------------------------------------------------------

/// One row of the master dataset; times are epoch milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub seq: u64,
    pub ts: i64,
    pub url: String,
    pub visitor: Option<String>,
    pub referrer: Option<String>,
    pub id: Option<String>,
    pub received_at: i64,
}

/// The files matching `master/**/*.parquet` under `data_dir`, sorted.
pub fn master_files(data_dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&data_dir.join("master"), &mut out);
    out.sort();
    out
}

/// The Arrow schema of each master file, as a Parquet reader sees it.
pub fn master_schemas(data_dir: &Path) -> Vec<(PathBuf, SchemaRef)> {
    master_files(data_dir)
        .into_iter()
        .map(|path| {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            let builder = ParquetRecordBatchReaderBuilder::try_new(file)
                .unwrap_or_else(|e| panic!("read parquet footer of {}: {e}", path.display()));
            let schema = builder.schema().clone();
            (path, schema)
        })
        .collect()
}

/// Every row of `master/**/*.parquet` under `data_dir`, in file order.
pub fn read_master(data_dir: &Path) -> Vec<Row> {
    let mut rows = Vec::new();
    for path in master_files(data_dir) {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.build())
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        for batch in reader {
            let batch = batch.unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            append_rows(&path, &batch, &mut rows);
        }
    }
    rows
}

fn column(path: &Path, batch: &RecordBatch, name: &str, to: &DataType) -> Arc<dyn Array> {
    let col = batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("{} has no column {name:?}", path.display()));
    cast(col, to).unwrap_or_else(|e| panic!("{}: column {name:?} as {to}: {e}", path.display()))
}

fn append_rows(path: &Path, batch: &RecordBatch, rows: &mut Vec<Row>) {
    let seq = column(path, batch, "seq", &DataType::UInt64);
    let ts = column(path, batch, "ts", &DataType::Int64);
    let url = column(path, batch, "url", &DataType::Utf8);
    let visitor = column(path, batch, "visitor", &DataType::Utf8);
    let referrer = column(path, batch, "referrer", &DataType::Utf8);
    let id = column(path, batch, "id", &DataType::Utf8);
    let received_at = column(path, batch, "received_at", &DataType::Int64);
    let (seq, ts, received_at) = (
        seq.as_primitive::<UInt64Type>(),
        ts.as_primitive::<Int64Type>(),
        received_at.as_primitive::<Int64Type>(),
    );
    let (url, visitor, referrer, id) = (
        url.as_string::<i32>(),
        visitor.as_string::<i32>(),
        referrer.as_string::<i32>(),
        id.as_string::<i32>(),
    );
    let opt =
        |a: &arrow::array::StringArray, i: usize| a.is_valid(i).then(|| a.value(i).to_string());
    for i in 0..batch.num_rows() {
        assert!(
            seq.is_valid(i) && ts.is_valid(i) && url.is_valid(i) && received_at.is_valid(i),
            "{}: row {i} has a null in a required column",
            path.display()
        );
        rows.push(Row {
            seq: seq.value(i),
            ts: ts.value(i),
            url: url.value(i).to_string(),
            visitor: opt(visitor, i),
            referrer: opt(referrer, i),
            id: opt(id, i),
            received_at: received_at.value(i),
        });
    }
}

/// Rows counted per URL.
pub fn count_by_url(rows: &[Row]) -> HashMap<String, u64> {
    let mut counts = HashMap::new();
    for row in rows {
        *counts.entry(row.url.clone()).or_insert(0) += 1;
    }
    counts
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// The largest file of a view directory.
pub fn largest_file(dir: &Path) -> PathBuf {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .max_by_key(|e| e.metadata().unwrap().len())
        .expect("a view has files")
        .path()
}

/// Flips 16 bytes in the middle of a file (size unchanged).
pub fn flip_bytes(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    assert!(
        bytes.len() > 32,
        "{} is too small to corrupt",
        path.display()
    );
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid - 8..mid + 8] {
        *b ^= 0xA5;
    }
    fs::write(path, bytes).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_redis_starts_restarts_and_dies() {
        let mut redis = TestRedis::start();
        assert!(redis.url().starts_with("unix:///"));
        assert_eq!(redis.cli(&["SET", "k", "v"]).trim(), "OK");
        redis.restart_empty();
        assert!(redis.is_up());
        assert_eq!(redis.cli(&["EXISTS", "k"]).trim(), "0");
        redis.kill();
        assert!(!redis.is_up());
        let socket = redis.socket().to_path_buf();
        redis.restart_empty();
        drop(redis);
        assert!(!ping(&socket));
    }

    #[test]
    fn master_of_an_empty_dir_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_master(dir.path()).is_empty());
    }

    #[test]
    fn read_master_reads_the_contract_schema() {
        use arrow::array::{StringArray, TimestampMillisecondArray, UInt64Array};
        use arrow::datatypes::{Field, Schema, TimeUnit};
        let ts_type = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
        let schema = Arc::new(Schema::new(vec![
            Field::new("seq", DataType::UInt64, false),
            Field::new("ts", ts_type.clone(), false),
            Field::new("url", DataType::Utf8, false),
            Field::new("visitor", DataType::Utf8, true),
            Field::new("referrer", DataType::Utf8, true),
            Field::new("id", DataType::Utf8, true),
            Field::new("received_at", ts_type, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(UInt64Array::from(vec![1, 2])),
                Arc::new(TimestampMillisecondArray::from(vec![10, 20]).with_timezone("UTC")),
                Arc::new(StringArray::from(vec!["http://a.com/", "http://b.com/"])),
                Arc::new(StringArray::from(vec![Some("v"), None])),
                Arc::new(StringArray::from(vec![None::<&str>, None])),
                Arc::new(StringArray::from(vec![Some("e1"), Some("e2")])),
                Arc::new(TimestampMillisecondArray::from(vec![11, 21]).with_timezone("UTC")),
            ],
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("master").join("2026");
        fs::create_dir_all(&sub).unwrap();
        let file = File::create(sub.join("x.parquet")).unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        fs::write(sub.join("y.parquet.tmp"), b"junk").unwrap();

        let rows = read_master(dir.path());
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].url, "http://a.com/");
        assert_eq!(rows[0].visitor.as_deref(), Some("v"));
        assert_eq!(rows[1].visitor, None);
        assert_eq!((rows[1].seq, rows[1].ts, rows[1].received_at), (2, 20, 21));
        assert_eq!(master_schemas(dir.path())[0].1.fields(), schema.fields());
        assert_eq!(count_by_url(&rows)["http://b.com/"], 1);
    }
}
