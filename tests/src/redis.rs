//! [`TestRedis`]: a private `redis-server` on a unix socket, never the machine's.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{poll_until, DEADLINE};

/// Starts `redis-server` as `cmd` says, its output in `log`.
pub(crate) fn spawn_logged(mut cmd: Command, log: File) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log handle"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start redis-server ({e}); install it: apt-get install -y redis-server")
        })
}

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
        let mut child = Command::new("redis-server");
        child
            .args(["--port", "0", "--unixsocket"])
            .arg(&self.socket)
            .args(["--unixsocketperm", "700", "--save", ""])
            .args(if self.persistent {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "everysec"]
            })
            .arg("--dir")
            .arg(self.dir.path());
        let child = spawn_logged(child, log);
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
}
