//! [`TestNats`]: a private `nats-server -js` on a loopback port of its own, never the machine's
//! NATS on 4222.

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::{poll_until, send_signal, DEADLINE};

/// A private `nats-server` with JetStream, its store in its own temporary directory (kept across
/// [`TestNats::restart`]), on a free loopback port that stays the same across restarts. Killed
/// on `Drop`.
pub struct TestNats {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

/// The `nats-server` binary: on `PATH`, or Debian's `/usr/sbin/nats-server`.
pub fn nats_server_bin() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").into_iter().flat_map(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("nats-server"))
            .collect::<Vec<_>>()
    });
    on_path
        .chain([PathBuf::from("/usr/sbin/nats-server")])
        .find(|p| p.is_file())
}

impl TestNats {
    /// Starts `nats-server -js` and waits until it accepts connections. `None` (and the test
    /// reports itself skipped, or fails on CI) when `nats-server` is not installed.
    pub fn start(test: &str) -> Option<TestNats> {
        if nats_server_bin().is_none() {
            crate::skip(
                test,
                "nats-server is not installed (scripts/test.sh installs it: apt-get install -y nats-server)",
            );
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("tally-nats-")
            .tempdir()
            .expect("create a temporary directory for nats");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("pick a free port")
            .port();
        let mut nats = TestNats {
            dir,
            port,
            child: None,
        };
        nats.spawn();
        Some(nats)
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "nats-server is already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("nats.log"))
            .expect("create nats.log");
        let child = Command::new(nats_server_bin().expect("checked at start"))
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path().join("store"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let port = self.port;
        poll_until("nats-server to accept connections", DEADLINE, || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("nats-server exited with {status}: {}", self.log());
            }
            let ready = self.log().contains("Server is ready");
            (ready && TcpStream::connect(("127.0.0.1", port)).is_ok()).then_some(())
        });
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `kill -9` the server and wait for it to be gone (its store stays).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (`SIGSTOP`): connections stay open, nothing is answered.
    pub fn pause(&self) {
        if let Some(c) = &self.child {
            send_signal(c.id(), "STOP");
        }
    }

    /// Lets a paused server go on (`SIGCONT`).
    pub fn resume(&self) {
        if let Some(c) = &self.child {
            send_signal(c.id(), "CONT");
        }
    }

    /// Starts the server again on the same port and store after [`TestNats::kill`].
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// What the server wrote to its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        self.kill();
    }
}
