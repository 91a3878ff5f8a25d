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
use crate::keys::Keys;
use crate::mirror::UrlCounts;
use crate::Result;

/// KEYS: 1 instance, 2 applied, 3 urls, 4 epochs set, then per url: its hour hash, its visitor
/// set. ARGV: 1 instance marker, 2 expected applied ("0" = none), 3 new applied, 4 epoch start,
/// then per url: url, id, nh, nv, nh (hour, views) pairs, nv visitor members.
/// Returns {0, ""} instance missing or different, {1, cur} applied is not the expected one,
/// {3, id} `urls` maps id to another URL (nothing written in either case), {2, new} applied.
const APPLY_LUA: &str = r#"
local inst = redis.call('GET', KEYS[1])
if inst ~= ARGV[1] then return {0, ''} end
local cur = redis.call('GET', KEYS[2])
if not cur then cur = '0' end
if cur ~= ARGV[2] then return {1, cur} end
local fresh = {}
local a = 5
while a <= #ARGV do
  local url, id = ARGV[a], ARGV[a + 1]
  local had = redis.call('HGET', KEYS[3], id)
  if had and had ~= url then return {3, id} end
  fresh[#fresh + 1] = not had
  a = a + 4 + 2 * tonumber(ARGV[a + 2]) + tonumber(ARGV[a + 3])
end
local k = 5
local i = 0
a = 5
while a <= #ARGV do
  local url, id = ARGV[a], ARGV[a + 1]
  local nh, nv = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  a = a + 4
  i = i + 1
  if fresh[i] then redis.call('HSET', KEYS[3], id, url) end
  local hk, vk = KEYS[k], KEYS[k + 1]
  k = k + 2
  for _ = 1, nh do
    redis.call('HINCRBY', hk, ARGV[a], ARGV[a + 1])
    a = a + 2
  end
  local last = a + nv - 1
  while a <= last do
    local j = math.min(a + 999, last)
    redis.call('SADD', vk, unpack(ARGV, a, j))
    a = j + 1
  end
end
redis.call('SADD', KEYS[4], ARGV[4])
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
    /// Redis maps this URL id to another URL; nothing was written.
    IdConflict(u32),
}

/// One epoch as Redis holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LoadedEpoch {
    pub(crate) applied: Seq,
    /// `(id, url, counts)`.
    pub(crate) urls: Vec<(u32, String, UrlCounts)>,
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

    pub(crate) async fn set_instance(&mut self, marker: &str) -> Result<()> {
        redis::cmd("SET")
            .arg(self.keys.instance())
            .arg(marker)
            .exec_async(&mut self.conn)
            .await?;
        Ok(())
    }

    /// Redis's eviction policy: anything but `noeviction` may drop speed keys under memory
    /// pressure, which no compare-and-set can notice. `None` when `CONFIG` is not allowed.
    pub(crate) async fn eviction_policy(&mut self) -> Option<String> {
        let v: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut self.conn)
            .await
            .ok()?;
        v.into_iter().nth(1)
    }

    /// Applies one epoch's delta, its URLs written under `ids` (in `d.urls` order), if Redis
    /// still holds `expected` as the epoch's applied seq.
    pub(crate) async fn apply(
        &mut self,
        instance: &str,
        expected: Seq,
        d: &EpochDelta,
        ids: &[u32],
    ) -> Result<ApplyOutcome> {
        let k = &self.keys;
        let mut inv = self.script.prepare_invoke();
        inv.key(k.instance())
            .key(k.applied(d.epoch))
            .key(k.urls(d.epoch))
            .key(k.epochs());
        inv.arg(instance)
            .arg(expected.0)
            .arg(d.last.0)
            .arg(d.epoch.0);
        for ((url, u), id) in d.urls.iter().zip(ids) {
            let id = id.to_string();
            inv.key(k.hours(d.epoch, &id)).key(k.visitors(d.epoch, &id));
            inv.arg(url.as_str())
                .arg(&id)
                .arg(u.hours.len())
                .arg(u.visitors.len());
            for (hour, n) in &u.hours {
                inv.arg(*hour).arg(*n);
            }
            for m in &u.visitors {
                inv.arg(*m);
            }
        }
        let (code, cur): (i64, String) = inv.invoke_async(&mut self.conn).await?;
        Ok(match code {
            2 => ApplyOutcome::Applied,
            1 => ApplyOutcome::Mismatch(Seq(cur.parse().unwrap_or(0))),
            3 => ApplyOutcome::IdConflict(cur.parse().unwrap_or(u32::MAX)),
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

    /// Loads one epoch's state (`None` when Redis has no applied seq for it). The keys are read
    /// in several round trips; if the applied seq moved meanwhile (another applier overlapping
    /// during a restart), the load starts over so counts and applied seq match.
    pub(crate) async fn load_epoch(&mut self, epoch: Seq) -> Result<Option<LoadedEpoch>> {
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

    async fn load_epoch_once(&mut self, epoch: Seq) -> Result<Option<LoadedEpoch>> {
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
        let mut state = LoadedEpoch {
            applied: Seq(applied),
            urls: Vec::with_capacity(urls.len()),
        };
        let urls: Vec<(String, String)> = urls.into_iter().collect();
        for chunk in urls.chunks(512) {
            let mut p = redis::pipe();
            for (id, _) in chunk {
                p.cmd("HGETALL").arg(self.keys.hours(epoch, id));
                p.cmd("SMEMBERS").arg(self.keys.visitors(epoch, id));
            }
            let replies: Vec<redis::Value> = p.query_async(&mut self.conn).await?;
            let mut replies = replies.into_iter();
            for (id, url) in chunk {
                let (Some(hours), Some(visitors)) = (replies.next(), replies.next()) else {
                    break;
                };
                let hours: HashMap<i64, u64> =
                    redis::from_redis_value(hours).map_err(redis::RedisError::from)?;
                let visitors: Vec<i64> =
                    redis::from_redis_value(visitors).map_err(redis::RedisError::from)?;
                let Ok(id) = id.parse::<u32>() else {
                    // Not an id of this layout: the caller rebuilds on the missing URL.
                    continue;
                };
                let mut c = UrlCounts::default();
                let mut hours: Vec<(i64, u64)> = hours.into_iter().collect();
                hours.sort_unstable();
                for (h, n) in hours {
                    c.add(h, n);
                }
                c.visitors.extend(visitors);
                state.urls.push((id, url.clone(), c));
            }
        }
        Ok(Some(state))
    }

    /// Deletes every key of the epoch (of this layout and the previous one) in one
    /// transaction.
    pub(crate) async fn delete_epoch(&mut self, epoch: Seq) -> Result<()> {
        let ids: Vec<String> = redis::cmd("HKEYS")
            .arg(self.keys.urls(epoch))
            .query_async(&mut self.conn)
            .await?;
        // The previous layout kept the names of its visitor sets in `vkeys`.
        let legacy: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&self.keys.legacy(epoch)[1])
            .query_async(&mut self.conn)
            .await?;
        let mut keys = self.keys.epoch_keys(epoch, ids.iter().map(String::as_str));
        keys.extend(legacy);
        for chunk in keys.chunks(10_000) {
            redis::cmd("UNLINK")
                .arg(chunk)
                .exec_async(&mut self.conn)
                .await?;
        }
        redis::cmd("SREM")
            .arg(self.keys.epochs())
            .arg(epoch.0)
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
    use crate::keys::visitor_member;
    use tally_e2e::TestRedis;

    async fn store(redis: &TestRedis) -> Store {
        let client = redis::Client::open(redis.url()).unwrap();
        let conn = ConnectionManager::new(client).await.unwrap();
        Store::new(conn, Keys::new("t:"))
    }

    #[tokio::test]
    async fn apply_is_a_compare_and_set_on_the_applied_seq_the_instance_and_the_ids() {
        let redis = TestRedis::start();
        let mut s = store(&redis).await;
        let mut events = vec![
            ev(1, "http://a/x", 0),
            ev(2, "http://a/x", 5),
            ev(3, "http://a/y", 0),
        ];
        events[0].event.visitor = Some("v".into());
        let d = aggregate(&events, &[Seq(1)]).remove(0);
        let ids = [0, 1];
        // No instance marker yet: nothing is written.
        assert_eq!(
            s.apply("i1", Seq(0), &d, &ids).await.unwrap(),
            ApplyOutcome::InstanceLost
        );
        assert_eq!(s.listed_epochs().await.unwrap(), Vec::<Seq>::new());
        s.set_instance("i1").await.unwrap();
        assert_eq!(
            s.apply("i1", Seq(0), &d, &ids).await.unwrap(),
            ApplyOutcome::Applied
        );
        // The retry of a batch whose reply was lost is refused and says it had committed.
        assert_eq!(
            s.apply("i1", Seq(0), &d, &ids).await.unwrap(),
            ApplyOutcome::Mismatch(Seq(3))
        );
        // Another process's instance id is refused.
        assert_eq!(
            s.apply("other", Seq(3), &d, &ids).await.unwrap(),
            ApplyOutcome::InstanceLost
        );
        // A URL under an id that Redis maps to another URL: refused, nothing written.
        let d2 = aggregate(&[ev(4, "http://a/z", 0)], &[Seq(1)]).remove(0);
        assert_eq!(
            s.apply("i1", Seq(3), &d2, &[1]).await.unwrap(),
            ApplyOutcome::IdConflict(1)
        );
        assert_eq!(s.applied_of(&[Seq(1)]).await.unwrap(), vec![Seq(3)]);
        let loaded = s.load_epoch(Seq(1)).await.unwrap().unwrap();
        assert_eq!(loaded.applied, Seq(3));
        let mut urls: Vec<_> = loaded
            .urls
            .iter()
            .map(|(i, u, c)| (*i, u.as_str(), c.total))
            .collect();
        urls.sort_unstable();
        assert_eq!(urls, vec![(0, "http://a/x", 2), (1, "http://a/y", 1)]);
        let x = &loaded.urls.iter().find(|u| u.0 == 0).unwrap().2;
        let h = tally_core::sketch::visitor_hash32(b"v");
        assert_eq!(x.visitors, [visitor_member(0, h)].into_iter().collect());
        assert_eq!(x.hours, vec![(0, 2)]);
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
