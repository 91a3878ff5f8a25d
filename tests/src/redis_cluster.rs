//! [`TestRedisCluster`]: a private three-master Redis Cluster on loopback ports, never the
//! machine's Redis.

use std::fs::File;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command};

use crate::{poll_until, DEADLINE};

/// Three `redis-server --cluster-enabled yes` masters (no replicas, no persistence) joined by
/// `redis-cli --cluster create`. Killed on `Drop`.
pub struct TestRedisCluster {
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    children: Vec<Option<Child>>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("pick a free port")
        .port()
}

impl TestRedisCluster {
    /// Starts the three masters, creates the cluster and waits until it serves every slot.
    pub fn start() -> TestRedisCluster {
        let dir = tempfile::Builder::new()
            .prefix("tally-redis-cluster-")
            .tempdir()
            .expect("create a temporary directory for the redis cluster");
        // The cluster bus listens on port + 10000: keep both below 65535.
        let ports: Vec<u16> = (0..3)
            .map(|_| loop {
                let p = free_port();
                if p < 55_000 {
                    break p;
                }
            })
            .collect();
        let mut cluster = TestRedisCluster {
            dir,
            ports,
            children: vec![None, None, None],
        };
        for i in 0..3 {
            cluster.spawn(i);
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok();
        cluster
    }

    fn spawn(&mut self, i: usize) {
        assert!(self.children[i].is_none(), "node {i} is already running");
        let port = self.ports[i].to_string();
        let node_dir = self.dir.path().join(&port);
        std::fs::create_dir_all(&node_dir).expect("node directory");
        let log = File::options()
            .create(true)
            .append(true)
            .open(node_dir.join("redis.log"))
            .expect("create redis.log");
        let mut child = Command::new("redis-server");
        child
            .args(["--bind", "127.0.0.1", "--port", &port])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&node_dir);
        self.children[i] = Some(crate::redis::spawn_logged(child, log));
        let port = self.ports[i];
        poll_until("a cluster node to answer PING", DEADLINE, || {
            (cli(port, &["PING"]).trim() == "PONG").then_some(())
        });
    }

    /// Waits until every running node says the cluster is ok (every slot served).
    pub fn wait_ok(&self) {
        for (i, &port) in self.ports.iter().enumerate() {
            if self.children[i].is_none() {
                continue;
            }
            poll_until("the redis cluster to be ok", DEADLINE, || {
                cli(port, &["CLUSTER", "INFO"])
                    .contains("cluster_state:ok")
                    .then_some(())
            });
        }
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// The index of the master that serves `key`'s slot.
    pub fn owner_of(&self, key: &str) -> usize {
        let slot: u16 = cli(self.ports[0], &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("a slot number");
        let nodes = cli(self.ports[0], &["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port: Option<u16> = f
                .get(1)
                .and_then(|a| a.split('@').next())
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok());
            let serves = f.iter().skip(8).any(|r| match r.split_once('-') {
                Some((a, b)) => {
                    a.parse::<u16>().is_ok_and(|a| a <= slot)
                        && b.parse::<u16>().is_ok_and(|b| slot <= b)
                }
                None => r.parse::<u16>().ok() == Some(slot),
            });
            if serves {
                if let Some(i) = port.and_then(|p| self.ports.iter().position(|&q| q == p)) {
                    return i;
                }
            }
        }
        panic!("no master serves slot {slot}:\n{nodes}");
    }

    /// `kill -9` master `i` (its slots go unserved: no replicas).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts master `i` again: empty (no persistence), it rejoins with its slots from
    /// `nodes.conf`.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_ok();
    }

    /// Keys matching `pattern` on every master.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (i, &port) in self.ports.iter().enumerate() {
            if self.children[i].is_some() {
                out.extend(
                    cli(port, &["--raw", "KEYS", pattern])
                        .lines()
                        .filter(|l| !l.is_empty())
                        .map(String::from),
                );
            }
        }
        out
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for TestRedisCluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}

/// `redis-cli -p port args…`'s standard output (empty when it fails).
fn cli(port: u16, args: &[&str]) -> String {
    let (flags, rest): (Vec<&str>, Vec<&str>) = args.iter().partition(|a| a.starts_with("--"));
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(flags)
        .args(rest)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}
