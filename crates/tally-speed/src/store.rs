//! Redis reads and maintenance of the speed layer: the instance marker, the epoch list, loading
//! an epoch into the mirror, deleting one. The applier is the only user; its writes (a
//! compare-and-set transaction per coalesced batch) are in `replica.rs`.

use crate::conn::SpeedConn;
use tally_core::hash::FastMap;
use tally_core::Seq;

use crate::keys::{id_of, split_bucket_member, split_cell_field, visitor_buckets_of, Keys};
use crate::mirror::UrlCounts;
use crate::Result;

/// One epoch as Redis holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LoadedEpoch {
    pub(crate) applied: Seq,
    /// `(id, url, counts)`.
    pub(crate) urls: Vec<(u32, String, UrlCounts)>,
}

/// Reads and maintenance of the speed state in Redis (writes are in `replica.rs`).
#[derive(Clone)]
pub(crate) struct Store {
    pub(crate) conn: SpeedConn,
    pub(crate) keys: Keys,
}

impl Store {
    pub(crate) fn new(conn: SpeedConn, keys: Keys) -> Store {
        Store { conn, keys }
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
        let (applied, buckets): (Option<u64>, Vec<u32>) = redis::pipe()
            .atomic()
            .cmd("GET")
            .arg(self.keys.applied(epoch))
            .cmd("SMEMBERS")
            .arg(self.keys.buckets(epoch))
            .query_async(&mut self.conn)
            .await?;
        let Some(applied) = applied else {
            return Ok(None);
        };
        let mut state = LoadedEpoch {
            applied: Seq(applied),
            urls: Vec::new(),
        };
        for chunk in buckets.chunks(64) {
            let mut p = redis::pipe();
            for b in chunk {
                p.cmd("HGETALL").arg(self.keys.names(epoch, *b));
                p.cmd("HGETALL").arg(self.keys.cells(epoch, *b));
                for v in visitor_buckets_of(*b) {
                    p.cmd("SMEMBERS").arg(self.keys.visitors(epoch, v));
                }
            }
            let replies: Vec<redis::Value> = p.query_async(&mut self.conn).await?;
            let mut replies = replies.into_iter();
            let mut next = || replies.next().unwrap_or(redis::Value::Nil);
            for b in chunk {
                let names: Vec<(String, String)> = decode(next())?;
                let fields: Vec<(i64, u64)> = decode(next())?;
                let mut members = Vec::new();
                for v in visitor_buckets_of(*b) {
                    members.push((v, decode::<Vec<i64>>(next())?));
                }
                state.urls.extend(bucket_state(*b, names, fields, members));
            }
        }
        Ok(Some(state))
    }

    /// Runs the atomic pipeline `p` only while Redis's instance marker is `marker` (`WATCH`ed
    /// from the check to `EXEC`): `false`, and nothing written, once another marker has been
    /// claimed.
    pub(crate) async fn exec_as(&mut self, marker: &str, p: &redis::Pipeline) -> Result<bool> {
        redis::cmd("WATCH")
            .arg(self.keys.instance())
            .exec_async(&mut self.conn)
            .await?;
        let current = self.instance().await?;
        if current.as_deref() != Some(marker) {
            redis::cmd("UNWATCH").exec_async(&mut self.conn).await?;
            return Ok(false);
        }
        let replies: Option<Vec<redis::Value>> = p.query_async(&mut self.conn).await?;
        Ok(replies.is_some())
    }

    /// [`Store::delete_epoch`] in one transaction that runs only while the instance marker is
    /// `marker` (see [`Store::exec_as`]).
    pub(crate) async fn delete_epoch_as(&mut self, epoch: Seq, marker: &str) -> Result<bool> {
        let p = self.delete_transaction(epoch).await?;
        self.exec_as(marker, &p).await
    }

    /// The `MULTI`/`EXEC` pipeline that unlinks every key Redis holds for `epoch` now and takes
    /// it off the epoch list.
    async fn delete_transaction(&mut self, epoch: Seq) -> Result<redis::Pipeline> {
        let keys = self.epoch_keys_in_redis(epoch).await?;
        let mut p = redis::pipe();
        p.atomic();
        for chunk in keys.chunks(10_000) {
            p.cmd("UNLINK").arg(chunk).ignore();
        }
        p.cmd("SREM").arg(self.keys.epochs()).arg(epoch.0).ignore();
        Ok(p)
    }

    /// Every key Redis holds for `epoch`: those of the buckets it lists, and the keys of
    /// earlier layouts (state of those is rebuilt, and deleted first).
    async fn epoch_keys_in_redis(&mut self, epoch: Seq) -> Result<Vec<String>> {
        // `v1` kept the names of its visitor sets in `vkeys`; `v6` named its ids (and so its
        // keys, one cell hash and one visitor set per id) in `urls`.
        let (buckets, legacy, ids): (Vec<u32>, Vec<String>, Vec<String>) = redis::pipe()
            .cmd("SMEMBERS")
            .arg(self.keys.buckets(epoch))
            .cmd("SMEMBERS")
            .arg(&self.keys.legacy(epoch)[1])
            .cmd("HKEYS")
            .arg(self.keys.legacy_urls(epoch))
            .query_async(&mut self.conn)
            .await?;
        let mut keys = self.keys.epoch_keys(epoch, buckets);
        keys.extend(self.keys.legacy(epoch));
        keys.extend(legacy);
        keys.push(self.keys.legacy_urls(epoch));
        for id in ids.iter().filter_map(|id| id.parse().ok()) {
            keys.extend(self.keys.per_id(epoch, id));
        }
        Ok(keys)
    }

    /// Deletes the keys of `epoch` only if it has no applied seq — keys left by no finished
    /// write — and the instance marker is still `marker`, atomically: the applied seq and the
    /// marker are `WATCH`ed from the check to the `UNLINK`s' `EXEC`, so a write landing on the
    /// epoch meanwhile (an applier still stopping while the next one loads) makes this return
    /// `false` and delete nothing. A delete racing such a write unguarded would take the `urls`
    /// hash and leave the write's count keys behind, for the next write to add onto.
    pub(crate) async fn delete_unapplied_epoch(
        &mut self,
        epoch: Seq,
        marker: &str,
    ) -> Result<bool> {
        redis::cmd("WATCH")
            .arg(self.keys.instance())
            .arg(self.keys.applied(epoch))
            .exec_async(&mut self.conn)
            .await?;
        let (inst, applied): (Option<String>, Option<u64>) = redis::pipe()
            .cmd("GET")
            .arg(self.keys.instance())
            .cmd("GET")
            .arg(self.keys.applied(epoch))
            .query_async(&mut self.conn)
            .await?;
        if inst.as_deref() != Some(marker) || applied.is_some() {
            redis::cmd("UNWATCH").exec_async(&mut self.conn).await?;
            return Ok(false);
        }
        let p = self.delete_transaction(epoch).await?;
        let replies: Option<Vec<redis::Value>> = p.query_async(&mut self.conn).await?;
        Ok(replies.is_some())
    }

    /// Deletes every key of the epoch (of this layout and the previous one).
    pub(crate) async fn delete_epoch(&mut self, epoch: Seq) -> Result<()> {
        let p = self.delete_transaction(epoch).await?;
        p.exec_async(&mut self.conn).await?;
        Ok(())
    }
}

fn decode<T: redis::FromRedisValue>(v: redis::Value) -> Result<T> {
    Ok(redis::from_redis_value(v).map_err(redis::RedisError::from)?)
}

/// The URLs of bucket `b` from its names, its cell fields and its visitor sets
/// (`(visitor bucket, members)`). A name whose field is no slot names no id (the caller
/// rebuilds on the URL it then misses); entries of ids the bucket does not name are no state a
/// write leaves (the name is written with the first counts), and are skipped.
fn bucket_state(
    b: u32,
    names: Vec<(String, String)>,
    fields: Vec<(i64, u64)>,
    visitors: Vec<(u32, Vec<i64>)>,
) -> Vec<(u32, String, UrlCounts)> {
    #[derive(Default)]
    struct Read {
        cells: Vec<(i64, u64)>,
        members: Vec<i64>,
    }
    let mut urls: FastMap<u32, (String, Read)> = names
        .into_iter()
        .filter_map(|(slot, url)| Some((id_of(b, slot.parse().ok()?)?, (url, Read::default()))))
        .collect();
    for (f, n) in fields {
        if let Some((id, cell)) = split_cell_field(b, f) {
            if let Some((_, r)) = urls.get_mut(&id) {
                r.cells.push((cell, n));
            }
        }
    }
    for (v, members) in visitors {
        for m in members {
            if let Some((id, m)) = split_bucket_member(v, m) {
                if let Some((_, r)) = urls.get_mut(&id) {
                    r.members.push(m);
                }
            }
        }
    }
    urls.into_iter()
        .map(|(id, (url, mut r))| {
            let mut c = UrlCounts::default();
            r.cells.sort_unstable();
            for (h, n) in r.cells {
                c.add(h, n);
            }
            // Registers are the mirror's business (`mirror_from`).
            r.members.sort_unstable();
            c.visitors.extend(r.members, None);
            (id, url, c)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::aggregate;
    use crate::aggregate::tests::ev;
    use crate::keys::visitor_member;
    use crate::replica::{self, Pending, PendingEpoch, WriteOutcome};
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use tally_e2e::TestRedis;

    /// `KEYS pattern`.
    async fn keys_like(c: &mut SpeedConn, pattern: &str) -> Vec<String> {
        redis::cmd("KEYS")
            .arg(pattern)
            .query_async(c)
            .await
            .unwrap()
    }

    async fn store(redis: &TestRedis) -> Store {
        Store::new(SpeedConn::open(&redis.url()).unwrap(), Keys::new("t:"))
    }

    fn pending(events: &[tally_master::SeqEvent], ids: &[u32], fresh: bool) -> Pending {
        let d = aggregate(events, &[Seq(1)]).remove(0);
        let mut pe = PendingEpoch {
            last: d.last,
            ..Default::default()
        };
        // Ids in URL order (URLs only: these tests are about URL ids).
        let mut urls: Vec<_> = d
            .urls
            .iter()
            .filter(|(k, _)| !tally_core::dims::is_source_key(k))
            .collect();
        urls.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for ((url, ud), id) in urls.into_iter().zip(ids) {
            // Each URL's first write here: its cells hold the delta's views.
            pe.add(*id, &Arc::from(url.as_str()), fresh, ud, &ud.cells);
        }
        Pending::from([(Seq(1), pe)])
    }

    async fn write(
        s: &mut Store,
        marker: &str,
        expected: &BTreeMap<Seq, Seq>,
        p: &Pending,
    ) -> WriteOutcome {
        let keys = s.keys.clone();
        let tx = replica::transaction(&keys, p);
        replica::write(&mut s.conn, &keys, marker, expected, p, &tx)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_write_is_a_compare_and_set_on_the_applied_seq_the_instance_and_the_ids() {
        let redis = TestRedis::start();
        let mut s = store(&redis).await;
        let mut events = vec![
            ev(1, "http://a/x", 0),
            ev(2, "http://a/x", 5),
            ev(3, "http://a/y", 0),
        ];
        events[0].event.visitor = Some("v".into());
        let p = pending(&events, &[0, 1], true);
        let none = BTreeMap::new();
        // No instance marker yet: nothing is written.
        assert_eq!(
            write(&mut s, "i1", &none, &p).await,
            WriteOutcome::InstanceLost
        );
        assert_eq!(s.listed_epochs().await.unwrap(), Vec::<Seq>::new());
        s.set_instance("i1").await.unwrap();
        assert_eq!(write(&mut s, "i1", &none, &p).await, WriteOutcome::Written);
        // The retry of a write whose reply was lost is refused and says what Redis holds.
        assert_eq!(
            write(&mut s, "i1", &none, &p).await,
            WriteOutcome::Mismatch(Seq(1), Seq(3))
        );
        // Another process's marker is refused.
        let at3 = BTreeMap::from([(Seq(1), Seq(3))]);
        assert_eq!(
            write(&mut s, "other", &at3, &p).await,
            WriteOutcome::InstanceLost
        );
        // A URL written as new under an id Redis already maps: the state is not ours.
        let p2 = pending(&[ev(4, "http://a/z", 0)], &[1], true);
        assert_eq!(write(&mut s, "i1", &at3, &p2).await, WriteOutcome::Diverged);
        let loaded = s.load_epoch(Seq(1)).await.unwrap().unwrap();
        assert_eq!(loaded.applied, Seq(4));
        let mut urls: Vec<_> = loaded
            .urls
            .iter()
            .map(|(i, u, c)| (*i, u.as_str(), c.total))
            .collect();
        urls.sort_unstable();
        // The diverged write landed all the same (it sets names and values: id 1 now says z,
        // with one view); what matters is that the applier learned it and rewrites Redis from
        // the mirror.
        assert_eq!(urls, vec![(0, "http://a/x", 2), (1, "http://a/z", 1)]);
        let x = &loaded.urls.iter().find(|u| u.0 == 0).unwrap().2;
        let h = tally_core::sketch::visitor_hash32(b"v");
        assert_eq!(
            x.visitors.members().collect::<Vec<_>>(),
            [visitor_member(0, h)]
        );
        assert_eq!(x.cells, vec![(0, 2)]);
        // A resync rewrites the epoch from a snapshot, under a new marker.
        let snap = pending(&events, &[0, 1], true);
        assert!(replica::resync(&mut s, "i2", &snap).await.unwrap());
        assert_eq!(s.instance().await.unwrap().as_deref(), Some("i2"));
        let loaded = s.load_epoch(Seq(1)).await.unwrap().unwrap();
        assert_eq!(loaded.applied, Seq(3));
        assert_eq!(loaded.urls.len(), 2);
        assert_eq!(
            s.applied_of(&[Seq(1), Seq(9)]).await.unwrap(),
            vec![Seq(3), Seq(0)]
        );
        assert_eq!(s.listed_epochs().await.unwrap(), vec![Seq(1)]);
        s.delete_epoch(Seq(1)).await.unwrap();
        assert_eq!(s.load_epoch(Seq(1)).await.unwrap(), None);
        assert_eq!(s.listed_epochs().await.unwrap(), Vec::<Seq>::new());
        let left = keys_like(&mut s.conn, "t:e:*").await;
        assert!(left.is_empty(), "{left:?}");
    }

    /// The loader's cleanup of keys no finished write left deletes them only while the epoch
    /// has no applied seq and the marker is the loader's: a write that landed meanwhile is kept
    /// whole, not stripped of its `urls` hash (which would leave count keys for the next write
    /// to add onto).
    #[tokio::test]
    async fn unapplied_keys_are_deleted_only_while_no_write_has_landed() {
        let redis = TestRedis::start();
        let mut s = store(&redis).await;
        s.set_instance("i1").await.unwrap();
        let none = BTreeMap::new();
        let p = pending(&[ev(1, "http://a/x", 0)], &[0], true);
        assert_eq!(write(&mut s, "i1", &none, &p).await, WriteOutcome::Written);
        // Epoch 1 has an applied seq: kept, whoever asks.
        assert!(!s.delete_unapplied_epoch(Seq(1), "i1").await.unwrap());
        assert_eq!(s.load_epoch(Seq(1)).await.unwrap().unwrap().applied, Seq(1));
        // Keys of epoch 5 without an applied seq: kept under another marker, deleted under ours.
        let mut c = s.conn.clone();
        let _: () = redis::pipe()
            .cmd("HSET")
            .arg(s.keys.names(Seq(5), 0))
            .arg(0)
            .arg("http://a/x")
            .ignore()
            .cmd("SADD")
            .arg(s.keys.buckets(Seq(5)))
            .arg(0)
            .ignore()
            .cmd("HINCRBY")
            .arg(s.keys.cells(Seq(5), 0))
            .arg(crate::keys::cell_field(0, 0))
            .arg(3)
            .ignore()
            .cmd("SADD")
            .arg(s.keys.epochs())
            .arg(5)
            .ignore()
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(!s.delete_unapplied_epoch(Seq(5), "other").await.unwrap());
        assert!(s.delete_unapplied_epoch(Seq(5), "i1").await.unwrap());
        let left = keys_like(&mut c, "t:e:5:*").await;
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(s.listed_epochs().await.unwrap(), vec![Seq(1)]);
    }

    /// URLs whose ids share buckets and URLs alone in theirs load back with their own cells
    /// and visitors, none of another id's; deleting the epoch leaves no bucket behind.
    #[tokio::test]
    async fn ids_sharing_a_bucket_load_back_apart() {
        let redis = TestRedis::start();
        let mut s = store(&redis).await;
        s.set_instance("i1").await.unwrap();
        let ids = [0u32, 7, 8, 63, 64, 65, 1000, 4_000_000_000];
        let mut events = Vec::new();
        for (i, _) in ids.iter().enumerate() {
            // URL i: i + 1 views in cell i, from visitors "i/0" … "i/i".
            for k in 0..=i {
                let mut e = ev(
                    events.len() as u64 + 1,
                    &format!("http://a/{i:02}"),
                    i as i64 * tally_core::CELL_MS,
                );
                e.event.visitor = Some(format!("{i}/{k}"));
                events.push(e);
            }
        }
        let p = pending(&events, &ids, true);
        let none = BTreeMap::new();
        assert_eq!(write(&mut s, "i1", &none, &p).await, WriteOutcome::Written);
        let loaded = s.load_epoch(Seq(1)).await.unwrap().unwrap();
        assert_eq!(loaded.urls.len(), ids.len());
        for (id, url, c) in &loaded.urls {
            let i = ids.iter().position(|x| x == id).unwrap();
            assert_eq!(url, &format!("http://a/{i:02}"));
            assert_eq!(c.cells, vec![(i as i64, i as u64 + 1)], "id {id}");
            let want: Vec<i64> = {
                let mut v: Vec<i64> = (0..=i)
                    .map(|k| {
                        let h = tally_core::sketch::visitor_hash32(format!("{i}/{k}").as_bytes());
                        visitor_member(i as i64, h)
                    })
                    .collect();
                v.sort_unstable();
                v
            };
            let mut got: Vec<i64> = c.visitors.members().collect();
            got.sort_unstable();
            assert_eq!(got, want, "id {id}");
        }
        // 8 ids in 4 buckets (0–63, 64–127, 960–1023, the last) and 6 visitor sets (0–7,
        // 8–15, 56–63, 64–71, 1000–1007, the last).
        assert_eq!(keys_like(&mut s.conn, "t:e:1:nb:*").await.len(), 4);
        assert_eq!(keys_like(&mut s.conn, "t:e:1:hb:*").await.len(), 4);
        assert_eq!(keys_like(&mut s.conn, "t:e:1:vb:*").await.len(), 6);
        s.delete_epoch(Seq(1)).await.unwrap();
        let left = keys_like(&mut s.conn, "t:e:*").await;
        assert!(left.is_empty(), "{left:?}");
    }

    /// State of the layout before buckets (a cell hash and a visitor set per id) is deleted
    /// whole with its epoch, so a rebuild after an upgrade leaves nothing behind.
    #[tokio::test]
    async fn an_epoch_of_the_layout_before_buckets_is_deleted_whole() {
        let redis = TestRedis::start();
        let mut s = store(&redis).await;
        let mut c = s.conn.clone();
        let mut p = redis::pipe();
        p.cmd("SADD").arg(s.keys.epochs()).arg(3).ignore();
        p.cmd("SET").arg(s.keys.applied(Seq(3))).arg(9).ignore();
        for id in [5u32, 70, 900] {
            let [h, v] = s.keys.per_id(Seq(3), id);
            p.cmd("HSET")
                .arg(s.keys.legacy_urls(Seq(3)))
                .arg(id)
                .arg(format!("http://a/{id}"))
                .ignore();
            p.cmd("HINCRBY").arg(h).arg(0).arg(2).ignore();
            p.cmd("SADD").arg(v).arg(visitor_member(0, 7)).ignore();
        }
        let _: () = p.query_async(&mut c).await.unwrap();
        s.delete_epoch(Seq(3)).await.unwrap();
        let left = keys_like(&mut c, "t:e:*").await;
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(s.listed_epochs().await.unwrap(), Vec::<Seq>::new());
    }

    /// A rewrite stopped after any of its transactions (a restart, a newer claim) leaves keys
    /// only of epochs Redis lists, so the next start-up or rewrite, which deletes what is
    /// listed, leaves no key behind.
    #[tokio::test]
    async fn a_rewrite_stopped_half_way_leaves_no_key_outside_a_listed_epoch() {
        let redis = TestRedis::start();
        let mut s = store(&redis).await;
        let events: Vec<_> = (0..7)
            .map(|i| ev(i + 1, &format!("http://a/{i}"), 0))
            .collect();
        let snap = pending(&events, &[0, 1, 2, 3, 4, 5, 6], true);
        let keys = s.keys.clone();
        let steps = replica::rewrite_transactions(&keys, &snap, "m", 2).count();
        assert_eq!(steps, 4, "7 URLs in chunks of 2");
        for stop_after in 1..=steps {
            for p in replica::rewrite_transactions(&keys, &snap, "m", 2).take(stop_after) {
                let _: () = p.query_async(&mut s.conn).await.unwrap();
            }
            let listed = s.listed_epochs().await.unwrap();
            let left = keys_like(&mut s.conn, "t:e:*").await;
            assert!(!left.is_empty());
            for k in &left {
                let epoch: u64 = k.split(':').nth(2).unwrap().parse().unwrap();
                assert!(listed.contains(&Seq(epoch)), "{k} of an unlisted epoch");
            }
            for e in listed {
                s.delete_epoch(e).await.unwrap();
            }
            let left = keys_like(&mut s.conn, "t:e:*").await;
            assert!(left.is_empty(), "after stopping at {stop_after}: {left:?}");
        }
    }

    /// A rewrite whose claim was taken over by a newer one stops at its next step and writes
    /// nothing more; the newer rewrite's state stays whole, under its final marker.
    #[tokio::test]
    async fn a_rewrite_overtaken_by_a_newer_one_writes_nothing_more() {
        let redis = TestRedis::start();
        let mut s = store(&redis).await;
        let events = vec![ev(1, "http://a/x", 0), ev(2, "http://a/y", 0)];
        let newer = pending(&events, &[0, 1], true);
        assert!(replica::resync(&mut s, "new", &newer).await.unwrap());
        // An older rewrite, mid-way: its claim was replaced by the newer one's.
        let old_claim = crate::keys::rewriting_marker("old");
        let mut p = redis::pipe();
        p.atomic()
            .cmd("SET")
            .arg(s.keys.applied(Seq(1)))
            .arg(999)
            .ignore();
        assert!(!s.exec_as(&old_claim, &p).await.unwrap());
        assert!(!s.delete_epoch_as(Seq(1), &old_claim).await.unwrap());
        assert_eq!(s.instance().await.unwrap().as_deref(), Some("new"));
        let loaded = s.load_epoch(Seq(1)).await.unwrap().unwrap();
        assert_eq!(loaded.applied, Seq(2));
        assert_eq!(loaded.urls.len(), 2);
        // While a rewrite holds its claim, compare-and-set writes fail on the marker.
        s.set_instance(&crate::keys::rewriting_marker("next"))
            .await
            .unwrap();
        let more = pending(&[ev(3, "http://a/x", 0)], &[0], false);
        let expected = BTreeMap::from([(Seq(1), Seq(2))]);
        assert_eq!(
            write(&mut s, "new", &expected, &more).await,
            WriteOutcome::InstanceLost
        );
    }
}
