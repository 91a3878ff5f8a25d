//! Redis operations of the speed layer. The applier is the only writer.
//!
//! Why a Lua script rather than `MULTI`/`EXEC`: the script makes each apply a compare-and-set on
//! the epoch's applied seq (and on the instance marker). A retry after a timeout whose first
//! attempt did commit is refused instead of counted twice, and a Redis that lost our state is
//! detected in the same atomic step that would have written into it. `MULTI`/`EXEC` cannot
//! abort on a condition without `WATCH`, which a multiplexed connection cannot use safely.

use std::collections::HashMap;

use redis::aio::ConnectionManager;
use redis::Script;
use tally_core::Seq;

use crate::aggregate::EpochDelta;
use crate::keys::{url_hash, Keys};
use crate::mirror::{EpochState, UrlCounts};
use crate::Result;

/// KEYS: 1 instance, 2 applied, 3 top, 4 urls, 5 epochs set, 6 visitor-keys set, then per url:
/// its hour hash, then one visitor set per day it has visitors on.
/// ARGV: 1 instance id, 2 expected applied ("0" = none), 3 new applied, 4 epoch start, then per
/// url: url, url hash, total, nh, nd, nh (hour, views) pairs, then nd times (m, m hashes).
/// Returns {0, ""} instance missing or different, {1, cur} applied is not the expected one
/// (nothing written), {2, new} applied.
const APPLY_LUA: &str = r#"
local inst = redis.call('GET', KEYS[1])
if inst ~= ARGV[1] then return {0, ''} end
local cur = redis.call('GET', KEYS[2])
if not cur then cur = '0' end
if cur ~= ARGV[2] then return {1, cur} end
local k = 7
local a = 5
while a <= #ARGV do
  local url, h, total = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local nh, nd = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  a = a + 5
  redis.call('HSET', KEYS[4], h, url)
  redis.call('ZINCRBY', KEYS[3], total, url)
  local hk = KEYS[k]
  k = k + 1
  for _ = 1, nh do
    redis.call('HINCRBY', hk, ARGV[a], ARGV[a + 1])
    a = a + 2
  end
  for _ = 1, nd do
    local vk = KEYS[k]
    k = k + 1
    local last = a + tonumber(ARGV[a])
    a = a + 1
    while a <= last do
      local j = math.min(a + 999, last)
      redis.call('SADD', vk, unpack(ARGV, a, j))
      a = j + 1
    end
    redis.call('SADD', KEYS[6], vk)
  end
end
redis.call('SADD', KEYS[5], ARGV[4])
redis.call('SET', KEYS[2], ARGV[3])
return {2, ARGV[3]}
"#;

/// What an apply script did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ApplyOutcome {
    /// Committed.
    Applied,
    /// The instance marker is missing or not ours: Redis lost (or someone replaced) our state.
    InstanceLost,
    /// The epoch's applied seq in Redis is not the one we expected; nothing was written.
    Mismatch(Seq),
}

pub(crate) struct Store {
    pub(crate) conn: ConnectionManager,
    pub(crate) keys: Keys,
    script: Script,
}

impl Store {
    pub(crate) fn new(conn: ConnectionManager, keys: Keys) -> Store {
        Store {
            conn,
            keys,
            script: Script::new(APPLY_LUA),
        }
    }

    pub(crate) async fn instance(&mut self) -> Result<Option<String>> {
        Ok(redis::cmd("GET")
            .arg(self.keys.instance())
            .query_async(&mut self.conn)
            .await?)
    }

    pub(crate) async fn set_instance(&mut self, id: &str) -> Result<()> {
        redis::cmd("SET")
            .arg(self.keys.instance())
            .arg(id)
            .exec_async(&mut self.conn)
            .await?;
        Ok(())
    }

    /// Applies one epoch's delta if Redis still holds `expected` as the epoch's applied seq.
    pub(crate) async fn apply(
        &mut self,
        instance: &str,
        expected: Seq,
        d: &EpochDelta,
    ) -> Result<ApplyOutcome> {
        let k = &self.keys;
        let mut inv = self.script.prepare_invoke();
        inv.key(k.instance())
            .key(k.applied(d.epoch))
            .key(k.top(d.epoch))
            .key(k.urls(d.epoch))
            .key(k.epochs())
            .key(k.visitor_keys(d.epoch));
        inv.arg(instance)
            .arg(expected.0)
            .arg(d.last.0)
            .arg(d.epoch.0);
        for (url, u) in &d.urls {
            let h = url_hash(url);
            inv.key(k.hours(d.epoch, &h));
            inv.arg(url.as_str())
                .arg(&h)
                .arg(u.total)
                .arg(u.hours.len())
                .arg(u.days.len());
            for (hour, n) in &u.hours {
                inv.arg(*hour).arg(*n);
            }
            for (day, hashes) in &u.days {
                inv.key(k.visitors(d.epoch, &h, *day));
                inv.arg(hashes.len());
                for x in hashes {
                    // As i64, so that small sets are intset-encoded by Redis.
                    inv.arg(*x as i64);
                }
            }
        }
        let (code, cur): (i64, String) = inv.invoke_async(&mut self.conn).await?;
        Ok(match code {
            2 => ApplyOutcome::Applied,
            1 => ApplyOutcome::Mismatch(Seq(cur.parse().unwrap_or(0))),
            _ => ApplyOutcome::InstanceLost,
        })
    }

    /// Start seqs of the epochs that have keys in Redis.
    pub(crate) async fn listed_epochs(&mut self) -> Result<Vec<Seq>> {
        let v: Vec<u64> = redis::cmd("SMEMBERS")
            .arg(self.keys.epochs())
            .query_async(&mut self.conn)
            .await?;
        let mut v: Vec<Seq> = v.into_iter().map(Seq).collect();
        v.sort();
        Ok(v)
    }

    /// The applied seq of each epoch (0 when missing), in one round trip.
    pub(crate) async fn applied_of(&mut self, epochs: &[Seq]) -> Result<Vec<Seq>> {
        if epochs.is_empty() {
            return Ok(Vec::new());
        }
        let mut p = redis::pipe();
        for e in epochs {
            p.cmd("GET").arg(self.keys.applied(*e));
        }
        let v: Vec<Option<u64>> = p.query_async(&mut self.conn).await?;
        Ok(v.into_iter().map(|x| Seq(x.unwrap_or(0))).collect())
    }

    /// Loads one epoch's state (`None` when Redis has no applied seq for it). The hour hashes
    /// are read in several round trips; if the applied seq moved meanwhile (another applier
    /// overlapping during a restart), the load starts over so counts and applied seq match.
    pub(crate) async fn load_epoch(&mut self, epoch: Seq) -> Result<Option<EpochState>> {
        loop {
            let state = self.load_epoch_once(epoch).await?;
            let applied: Option<u64> = redis::cmd("GET")
                .arg(self.keys.applied(epoch))
                .query_async(&mut self.conn)
                .await?;
            if state.as_ref().map(|s| s.applied.0) == applied {
                return Ok(state);
            }
        }
    }

    async fn load_epoch_once(&mut self, epoch: Seq) -> Result<Option<EpochState>> {
        let (applied, urls): (Option<u64>, HashMap<String, String>) = redis::pipe()
            .atomic()
            .cmd("GET")
            .arg(self.keys.applied(epoch))
            .cmd("HGETALL")
            .arg(self.keys.urls(epoch))
            .query_async(&mut self.conn)
            .await?;
        let Some(applied) = applied else {
            return Ok(None);
        };
        let mut state = EpochState {
            applied: Seq(applied),
            urls: HashMap::with_capacity(urls.len()),
        };
        let urls: Vec<(String, String)> = urls.into_iter().collect();
        for chunk in urls.chunks(512) {
            let mut p = redis::pipe();
            for (h, _) in chunk {
                p.cmd("HGETALL").arg(self.keys.hours(epoch, h));
            }
            let hours: Vec<HashMap<i64, u64>> = p.query_async(&mut self.conn).await?;
            for ((_, url), hours) in chunk.iter().zip(hours) {
                let mut c = UrlCounts::default();
                for (h, n) in hours {
                    if n > 0 {
                        c.hours.insert(h, n);
                        c.total += n;
                    }
                }
                state.urls.insert(url.clone(), c);
            }
        }
        let vkeys: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.visitor_keys(epoch))
            .query_async(&mut self.conn)
            .await?;
        let url_of: HashMap<&str, &str> =
            urls.iter().map(|(h, u)| (h.as_str(), u.as_str())).collect();
        for chunk in vkeys.chunks(512) {
            let mut p = redis::pipe();
            for key in chunk {
                p.cmd("SMEMBERS").arg(key);
            }
            let sets: Vec<Vec<i64>> = p.query_async(&mut self.conn).await?;
            for (key, set) in chunk.iter().zip(sets) {
                let Some((h, day)) = self.keys.parse_visitors(epoch, key) else {
                    continue;
                };
                let Some(c) = url_of.get(h.as_str()).and_then(|u| state.urls.get_mut(*u)) else {
                    continue;
                };
                c.visitors
                    .entry(day)
                    .or_default()
                    .extend(set.into_iter().map(|x| x as u64));
            }
        }
        Ok(Some(state))
    }

    /// Deletes every key of the epoch in one transaction.
    pub(crate) async fn delete_epoch(&mut self, epoch: Seq) -> Result<()> {
        let hashes: Vec<String> = redis::cmd("HKEYS")
            .arg(self.keys.urls(epoch))
            .query_async(&mut self.conn)
            .await?;
        let vkeys: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.visitor_keys(epoch))
            .query_async(&mut self.conn)
            .await?;
        let mut keys: Vec<String> = hashes.iter().map(|h| self.keys.hours(epoch, h)).collect();
        keys.extend(vkeys);
        keys.push(self.keys.visitor_keys(epoch));
        keys.push(self.keys.urls(epoch));
        keys.push(self.keys.top(epoch));
        keys.push(self.keys.applied(epoch));
        redis::pipe()
            .atomic()
            .cmd("UNLINK")
            .arg(&keys)
            .ignore()
            .cmd("SREM")
            .arg(self.keys.epochs())
            .arg(epoch.0)
            .ignore()
            .exec_async(&mut self.conn)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::aggregate;
    use crate::aggregate::tests::ev;
    use std::process::{Child, Command, Stdio};

    /// The child, and the directory of its socket (kept until the child is gone).
    struct Redis(Child, #[allow(dead_code)] tempfile::TempDir);

    impl Drop for Redis {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    async fn store() -> (Redis, Store) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("redis.sock");
        let child = Command::new("/usr/bin/redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&sock)
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let redis = Redis(child, dir);
        let client = redis::Client::open(format!("unix://{}", sock.display())).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let conn = loop {
            match ConnectionManager::new(client.clone()).await {
                Ok(c) => break c,
                Err(e) => {
                    assert!(std::time::Instant::now() < deadline, "redis: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        };
        (redis, Store::new(conn, Keys::new("t:")))
    }

    #[tokio::test]
    async fn apply_is_a_compare_and_set_on_the_applied_seq_and_the_instance() {
        let (_redis, mut s) = store().await;
        let mut events = vec![
            ev(1, "http://a/x", 0),
            ev(2, "http://a/x", 5),
            ev(3, "http://a/y", 0),
        ];
        events[0].event.visitor = Some("v".into());
        let d = aggregate(&events, &[Seq(1)]).remove(0);
        // No instance marker yet: nothing is written.
        assert_eq!(
            s.apply("i1", Seq(0), &d).await.unwrap(),
            ApplyOutcome::InstanceLost
        );
        assert_eq!(s.listed_epochs().await.unwrap(), Vec::<Seq>::new());
        s.set_instance("i1").await.unwrap();
        assert_eq!(
            s.apply("i1", Seq(0), &d).await.unwrap(),
            ApplyOutcome::Applied
        );
        // The retry of a batch whose reply was lost is refused and says it had committed.
        assert_eq!(
            s.apply("i1", Seq(0), &d).await.unwrap(),
            ApplyOutcome::Mismatch(Seq(3))
        );
        // Another process's instance id is refused.
        assert_eq!(
            s.apply("other", Seq(3), &d).await.unwrap(),
            ApplyOutcome::InstanceLost
        );
        let loaded = s.load_epoch(Seq(1)).await.unwrap().unwrap();
        assert_eq!(loaded.applied, Seq(3));
        assert_eq!(loaded.urls["http://a/x"].total, 2);
        assert_eq!(loaded.urls["http://a/y"].total, 1);
        assert_eq!(loaded.urls["http://a/x"].visitors[&0].len(), 1);
        assert_eq!(
            s.applied_of(&[Seq(1), Seq(9)]).await.unwrap(),
            vec![Seq(3), Seq(0)]
        );
        assert_eq!(s.listed_epochs().await.unwrap(), vec![Seq(1)]);
        s.delete_epoch(Seq(1)).await.unwrap();
        assert_eq!(s.load_epoch(Seq(1)).await.unwrap(), None);
        assert_eq!(s.listed_epochs().await.unwrap(), Vec::<Seq>::new());
        let left: Vec<String> = redis::cmd("KEYS")
            .arg("t:e:*")
            .query_async(&mut s.conn)
            .await
            .unwrap();
        assert!(left.is_empty(), "{left:?}");
    }
}
