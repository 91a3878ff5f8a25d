//! [`TestServer`]: the real `tally serve` on a free port with its own data directory and Redis.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{poll_until, send_signal, workspace_root, TestRedis, DEADLINE};

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
