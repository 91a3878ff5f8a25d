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

/// KEYS: 1 instance, 2 applied, 3 top, 4 urls, 5 epochs set, 5+i hour hash of url i.
/// ARGV: 1 instance id, 2 expected applied ("0" = none), 3 new applied, 4 epoch start,
/// then per url i: url, url hash, total, n, then n (hour, views) pairs.
/// Returns {0, ""} instance missing or different, {1, cur} applied is not the expected one
/// (nothing written), {2, new} applied.
const APPLY_LUA: &str = r#"
local inst = redis.call('GET', KEYS[1])
if inst ~= ARGV[1] then return {0, ''} end
local cur = redis.call('GET', KEYS[2])
if not cur then cur = '0' end
if cur ~= ARGV[2] then return {1, cur} end
local a = 5
for i = 6, #KEYS do
  local url, h, total, n = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  a = a + 4
  redis.call('HSET', KEYS[4], h, url)
  redis.call('ZINCRBY', KEYS[3], total, url)
  for _ = 1, n do
    redis.call('HINCRBY', KEYS[i], ARGV[a], ARGV[a + 1])
    a = a + 2
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
            .key(k.epochs());
        inv.arg(instance)
            .arg(expected.0)
            .arg(d.last.0)
            .arg(d.epoch.0);
        for (url, u) in &d.urls {
            let h = url_hash(url);
            inv.key(k.hours(d.epoch, &h));
            inv.arg(url.as_str()).arg(h).arg(u.total).arg(u.hours.len());
            for (hour, n) in &u.hours {
                inv.arg(*hour).arg(*n);
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
        Ok(Some(state))
    }

    /// Deletes every key of the epoch in one transaction.
    pub(crate) async fn delete_epoch(&mut self, epoch: Seq) -> Result<()> {
        let hashes: Vec<String> = redis::cmd("HKEYS")
            .arg(self.keys.urls(epoch))
            .query_async(&mut self.conn)
            .await?;
        let mut keys: Vec<String> = hashes.iter().map(|h| self.keys.hours(epoch, h)).collect();
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
