//! Redis as a write-behind replica of the mirror.
//!
//! Queries read the in-process mirror, so an event is visible as soon as the applier has added
//! it there; Redis keeps the same state durably (for restarts and other nodes) a little behind.
//! Every delta applied to the mirror is also queued here, coalesced per (epoch, URL) while a
//! Redis write is in flight, and written as one transaction: a compare-and-set on the epoch's
//! applied seq (`WATCH` + `MULTI`/`EXEC`), so Redis's `applied` says exactly which events it
//! holds and no write lands twice. Plain pipelined commands cost Redis a fraction of what a Lua
//! script spends interpreting its arguments (measured: a script spent ~9 µs per event, mostly
//! outside the commands it ran).
//!
//! Cell counts are written as values, not increments: the mirror hands over, with each delta,
//! the views now in each cell it touched, the queue keeps the latest value per (URL, cell), and
//! a write sets the fields of each bucket's hash in one `HSET`. A hot URL's many events become
//! one field per cell, and a bucket's URLs one command (an `HINCRBY` per field was most of
//! what Redis spent on a write). The values of a queue through seq `S` are the counts as of
//! `S`: any later event of that (URL, cell) would have replaced its value in the queue.
//!
//! Anything that says Redis no longer matches what we wrote — the instance marker gone or
//! another one's, an applied seq we did not write, a URL id Redis already maps — is repaired by
//! rewriting the live epochs from the mirror (a *resync*), never by trusting Redis.

use std::collections::BTreeMap;
use std::sync::Arc;

use tally_core::hash::FastMap;
use tally_core::Seq;

use crate::aggregate::UrlDelta;
use crate::keys::{bucket, bucket_member, cell_field, slot, visitor_bucket, Keys};
use crate::mirror::UrlCounts;
use crate::Result;

/// What is queued for Redis of one URL in one epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PendingUrl {
    pub(crate) url: Arc<str>,
    /// The URL is new to the epoch (Redis learns its id with this write).
    pub(crate) fresh: bool,
    /// `(cell, views now in it)` ascending by cell, for the cells changed since the last
    /// write: a small vector, not a map — most queued URLs have one or two cells, and a
    /// `BTreeMap` allocated a node for each (a tenth of the applier's time in
    /// `PendingEpoch::add`, measured with `examples/apply_bench.rs`).
    pub(crate) cells: Vec<(i64, u64)>,
    /// Visitor members ([`crate::keys::visitor_member`]), possibly with repeats.
    pub(crate) visitors: Vec<i64>,
}

/// What is queued for Redis of one epoch: what the events up to `last` changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PendingEpoch {
    pub(crate) last: Seq,
    pub(crate) urls: FastMap<u32, PendingUrl>,
    /// Events queued (for the queue's bound and metrics; each counts once, not again under
    /// its source key).
    pub(crate) events: u64,
}

/// epoch start → what is queued for it.
pub(crate) type Pending = BTreeMap<Seq, PendingEpoch>;

impl PendingEpoch {
    /// Adds one URL's delta `d`, after which its cells hold the views in `now`.
    pub(crate) fn add(
        &mut self,
        id: u32,
        url: &Arc<str>,
        fresh: bool,
        d: &UrlDelta,
        now: &[(i64, u64)],
    ) {
        let p = self.urls.entry(id).or_insert_with(|| PendingUrl {
            url: url.clone(),
            ..PendingUrl::default()
        });
        p.fresh |= fresh;
        for (h, n) in now {
            set_cell(&mut p.cells, *h, *n);
        }
        p.visitors.extend(d.visitors.iter().copied());
        if !tally_core::dims::is_source_key(url) {
            self.events += d.total;
        }
    }

    /// The whole state of an epoch of the mirror, as a write that recreates it.
    pub(crate) fn snapshot(
        applied: Seq,
        urls: impl Iterator<Item = (u32, Arc<str>, UrlCounts)>,
    ) -> PendingEpoch {
        let mut events = 0;
        let urls = urls
            .map(|(id, url, c)| {
                if !tally_core::dims::is_source_key(&url) {
                    events += c.total;
                }
                let p = PendingUrl {
                    url,
                    fresh: true,
                    cells: c.cells,
                    visitors: c.visitors.members().collect(),
                };
                (id, p)
            })
            .collect();
        PendingEpoch {
            last: applied,
            urls,
            events,
        }
    }

    /// Events queued.
    pub(crate) fn events(&self) -> u64 {
        self.events
    }
}

/// Merges `newer` into `older` (both queued, `newer` after `older`).
pub(crate) fn merge(older: &mut Pending, newer: Pending) {
    for (epoch, n) in newer {
        let o = older.entry(epoch).or_default();
        o.last = o.last.max(n.last);
        o.events += n.events;
        for (id, u) in n.urls {
            match o.urls.get_mut(&id) {
                None => {
                    o.urls.insert(id, u);
                }
                Some(p) => {
                    p.fresh |= u.fresh;
                    for (h, c) in u.cells {
                        set_cell(&mut p.cells, h, c);
                    }
                    let before = p.visitors.len();
                    p.visitors.extend(u.visitors);
                    compact_visitors(&mut p.visitors, before);
                }
            }
        }
    }
}

/// Sets `cell` of `cells` (ascending by cell) to `n` views.
fn set_cell(cells: &mut Vec<(i64, u64)>, cell: i64, n: u64) {
    match cells.binary_search_by_key(&cell, |(h, _)| *h) {
        Ok(i) => cells[i].1 = n,
        Err(i) => cells.insert(i, (cell, n)),
    }
}

/// Sorts out the repeats of a URL's queued visitor members each time their count passes a
/// power of two (from 256): a queue that waits long on Redis holds each (cell, visitor) about
/// once, as the mirror does, instead of once per batch that saw it.
fn compact_visitors(v: &mut Vec<i64>, before: usize) {
    let after = v.len();
    if after >= 256 && before.max(1).ilog2() != after.ilog2() {
        v.sort_unstable();
        v.dedup();
    }
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteOutcome {
    /// Committed: Redis's applied seq of every written epoch is its `last`.
    Written,
    /// The instance marker is missing or not ours.
    InstanceLost,
    /// An epoch's applied seq in Redis is not what we last wrote (`epoch`, what Redis has).
    Mismatch(Seq, Seq),
    /// A watched key changed between the check and the transaction: retry.
    Raced,
    /// Redis already mapped an id we wrote as new: it holds state we did not write.
    Diverged,
}

/// Commands per transaction when rewriting whole epochs.
const RESYNC_CHUNK_URLS: usize = 20_000;

/// Appends the commands that add `urls` (ascending by id) to the epoch `epoch`, a few per
/// bucket of ids: the names of its fresh URLs in one `HSET` (with `expect`, its reply — the
/// fields it added — must be their number: a smaller one means Redis already mapped an id),
/// its cell values in one `HSET`, and the visitor members of each visitor bucket in one
/// `SADD`; the buckets of fresh URLs in one. Every other reply is ignored.
fn push_urls(
    p: &mut redis::Pipeline,
    keys: &Keys,
    epoch: Seq,
    urls: &[(&u32, &PendingUrl)],
    mut expect: Option<&mut Vec<i64>>,
) {
    let mut members: Vec<i64> = Vec::new();
    let mut open = None;
    let flush = |p: &mut redis::Pipeline, b: Option<u32>, members: &mut Vec<i64>| {
        if let Some(b) = b.filter(|_| !members.is_empty()) {
            members.sort_unstable();
            members.dedup();
            for chunk in members.chunks(10_000) {
                p.cmd("SADD")
                    .arg(keys.visitors(epoch, b))
                    .arg(chunk)
                    .ignore();
            }
        }
        members.clear();
    };
    let mut named: Vec<u32> = Vec::new();
    // What the bucket being written gets, sent when the bucket changes.
    let mut names: Vec<(u32, &str)> = Vec::new();
    let mut fields: Vec<(i64, u64)> = Vec::new();
    let mut current = None;
    let mut send = |p: &mut redis::Pipeline,
                    b: Option<u32>,
                    names: &mut Vec<(u32, &str)>,
                    fields: &mut Vec<(i64, u64)>| {
        let Some(b) = b else { return };
        if !names.is_empty() {
            p.cmd("HSET").arg(keys.names(epoch, b)).arg(&names[..]);
            match expect.as_deref_mut() {
                Some(e) => e.push(names.len() as i64),
                None => {
                    p.ignore();
                }
            }
            named.push(b);
        }
        if !fields.is_empty() {
            p.cmd("HSET")
                .arg(keys.cells(epoch, b))
                .arg(&fields[..])
                .ignore();
        }
        names.clear();
        fields.clear();
    };
    for (id, u) in urls {
        let id = **id;
        if current != Some(bucket(id)) {
            send(p, current, &mut names, &mut fields);
            current = Some(bucket(id));
        }
        if u.fresh {
            names.push((slot(id), &*u.url));
        }
        fields.extend(u.cells.iter().map(|(h, n)| (cell_field(id, *h), *n)));
        let b = visitor_bucket(id);
        if open != Some(b) {
            flush(p, open, &mut members);
            open = Some(b);
        }
        members.extend(u.visitors.iter().map(|m| bucket_member(id, *m)));
    }
    flush(p, open, &mut members);
    send(p, current, &mut names, &mut fields);
    if !named.is_empty() {
        p.cmd("SADD").arg(keys.buckets(epoch)).arg(named).ignore();
    }
}

/// The `MULTI`/`EXEC` pipeline that adds `pending` and sets each epoch's applied seq (built
/// off the async runtime for large batches: see the applier).
pub(crate) fn transaction(keys: &Keys, pending: &Pending) -> Transaction {
    let mut p = redis::pipe();
    p.atomic();
    let mut expect = Vec::new();
    for (e, pe) in pending {
        let mut ids: Vec<(&u32, &PendingUrl)> = pe.urls.iter().collect();
        ids.sort_unstable_by_key(|(id, _)| **id);
        push_urls(&mut p, keys, *e, &ids, Some(&mut expect));
        p.cmd("SADD").arg(keys.epochs()).arg(e.0).ignore();
        p.cmd("SET").arg(keys.applied(*e)).arg(pe.last.0).ignore();
    }
    Transaction { pipe: p, expect }
}

/// A write's `MULTI`/`EXEC` pipeline and the replies it must get ([`push_urls`]).
pub(crate) struct Transaction {
    pub(crate) pipe: redis::Pipeline,
    expect: Vec<i64>,
}

/// Writes `tx` (the [`transaction`] of `pending`) if Redis still holds `marker` and, for every
/// epoch of `pending`, the applied seq in `expected` (absent: none).
pub(crate) async fn write(
    conn: &mut crate::conn::SpeedConn,
    keys: &Keys,
    marker: &str,
    expected: &BTreeMap<Seq, Seq>,
    pending: &Pending,
    tx: &Transaction,
) -> Result<WriteOutcome> {
    let mut watch = redis::cmd("WATCH");
    watch.arg(keys.instance());
    for e in pending.keys() {
        watch.arg(keys.applied(*e));
    }
    watch.exec_async(conn).await?;
    let mut check = redis::pipe();
    check.cmd("GET").arg(keys.instance());
    for e in pending.keys() {
        check.cmd("GET").arg(keys.applied(*e));
    }
    let (inst, applied): (Option<String>, Vec<Option<u64>>) = {
        let mut v: Vec<redis::Value> = check.query_async(conn).await?;
        let inst = redis::from_redis_value(v.remove(0)).map_err(redis::RedisError::from)?;
        let applied = v
            .into_iter()
            .map(|x| redis::from_redis_value(x).map_err(redis::RedisError::from))
            .collect::<std::result::Result<Vec<Option<u64>>, _>>()?;
        (inst, applied)
    };
    let unwatch = |conn: &mut crate::conn::SpeedConn| {
        let mut c = conn.clone();
        async move { redis::cmd("UNWATCH").exec_async(&mut c).await }
    };
    if inst.as_deref() != Some(marker) {
        unwatch(conn).await?;
        return Ok(WriteOutcome::InstanceLost);
    }
    for ((e, _), cur) in pending.iter().zip(&applied) {
        let want = expected.get(e).map_or(0, |s| s.0);
        if cur.unwrap_or(0) != want {
            unwatch(conn).await?;
            return Ok(WriteOutcome::Mismatch(*e, Seq(cur.unwrap_or(0))));
        }
    }
    let replies: Option<Vec<i64>> = tx.pipe.query_async(conn).await?;
    match replies {
        None => Ok(WriteOutcome::Raced),
        Some(r) if r != tx.expect => Ok(WriteOutcome::Diverged),
        Some(_) => Ok(WriteOutcome::Written),
    }
}

/// Rewrites Redis from `snapshot` (whole epochs of the mirror) and leaves it marked `marker`.
///
/// A rewrite is several transactions, and it can outlive the applier that started it (a
/// restart drops the applier, not its Redis task), so it must never interleave with another
/// applier's state:
/// 1. it first sets the instance marker to its **claim**, `rewriting/{marker}` — not a marker
///    of any state ([`keys::marker_is_ours`](crate::keys::marker_is_ours) refuses it), so a
///    loader meanwhile rebuilds instead of adopting half-written state, and every
///    compare-and-set write meanwhile fails on the marker;
/// 2. deletes every epoch Redis lists and every epoch of the snapshot, then writes each epoch
///    in transactions of bounded size, its applied seq with its last one, and the final
///    `marker` with the very last transaction;
/// 3. runs every step after the claim only while the claim is still in place
///    ([`Store::exec_as`](crate::store::Store::exec_as)): a newer rewrite claims over it, and
///    this one stops at its next step (`Ok(false)`), writing nothing more.
///
/// A crash half-way leaves the claim, which the next start rebuilds from. (Found by
/// `stopping_at_random_moments_mid_apply_never_double_counts`: an old rewrite's chunks written
/// between the next applier's steps counted views under the wrong URL.)
pub(crate) async fn resync(
    store: &mut crate::store::Store,
    marker: &str,
    snapshot: &Pending,
) -> Result<bool> {
    let claim = crate::keys::rewriting_marker(marker);
    store.set_instance(&claim).await?;
    let mut doomed = store.listed_epochs().await?;
    doomed.extend(snapshot.keys().copied());
    doomed.sort();
    doomed.dedup();
    for e in doomed {
        if !store.delete_epoch_as(e, &claim).await? {
            return Ok(false);
        }
    }
    let keys = store.keys.clone();
    for p in rewrite_transactions(&keys, snapshot, marker, RESYNC_CHUNK_URLS) {
        if !store.exec_as(&claim, &p).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The transactions that write `snapshot` after a rewrite's deletes, built one at a time as
/// they are sent: one per chunk of `chunk_urls` of an epoch's URLs (by id); an epoch's first one lists it, its
/// last one sets its applied seq, and the very last one sets `marker`.
///
/// Listed with its first keys, not its last: a rewrite stopped half-way (a restart, a newer
/// claim) leaves keys that the next rewrite or start-up finds through the list and deletes.
/// Listed only at the end, they leaked for good (seen: 1.3 GB of Redis after a restart
/// mid-rewrite in `scripts/bench.sh mixed`). The applied seq still comes last: a listed epoch
/// without one is an unfinished write, deleted before anything is added to it.
pub(crate) fn rewrite_transactions<'a>(
    keys: &'a Keys,
    snapshot: &'a Pending,
    marker: &'a str,
    chunk_urls: usize,
) -> impl Iterator<Item = redis::Pipeline> + 'a {
    let chunk_urls = chunk_urls.max(1);
    /// One URL of a snapshot: its id and what to write.
    type Url<'a> = (&'a u32, &'a PendingUrl);
    /// An epoch, its URLs in one transaction, whether it is the epoch's first / last one.
    type Step<'a> = (Seq, &'a PendingEpoch, Vec<Url<'a>>, bool, bool);
    let mut steps: Vec<Step<'a>> = Vec::new();
    for (e, pe) in snapshot {
        let mut ids: Vec<Url> = pe.urls.iter().collect();
        ids.sort_unstable_by_key(|(id, _)| **id);
        let n = ids.len().div_ceil(chunk_urls).max(1);
        let mut rest = ids.into_iter();
        for i in 0..n {
            let chunk: Vec<Url> = rest.by_ref().take(chunk_urls).collect();
            steps.push((*e, pe, chunk, i == 0, i + 1 == n));
        }
    }
    let total = steps.len().max(1);
    let mut steps = steps.into_iter();
    (0..total).map(move |i| {
        let mut p = redis::pipe();
        p.atomic();
        if let Some((e, pe, chunk, first_of_epoch, last_of_epoch)) = steps.next() {
            if first_of_epoch {
                p.cmd("SADD").arg(keys.epochs()).arg(e.0).ignore();
            }
            push_urls(&mut p, keys, e, &chunk, None);
            if last_of_epoch {
                p.cmd("SET").arg(keys.applied(e)).arg(pe.last.0).ignore();
            }
        }
        if i + 1 == total {
            p.cmd("SET").arg(keys.instance()).arg(marker).ignore();
        }
        p
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The queue of one event of URL 7 in cell 0, its `last`-th: the cell now holds `last`.
    fn batch(last: u64, members: impl Iterator<Item = i64>) -> Pending {
        let url = PendingUrl {
            url: Arc::from("http://a/x"),
            fresh: false,
            cells: vec![(0, last)],
            visitors: members.collect(),
        };
        Pending::from([(
            Seq(1),
            PendingEpoch {
                last: Seq(last),
                urls: FastMap::from_iter([(7, url)]),
                events: 1,
            },
        )])
    }

    /// Cells are queued as values: a newer value replaces an older one, whichever order the
    /// queues were built in, and a write sets each bucket's fields in one `HSET`.
    #[test]
    fn newer_cell_values_replace_older_ones_and_a_bucket_is_one_hset() {
        let mut q = batch(1, std::iter::empty());
        merge(&mut q, batch(5, std::iter::empty()));
        let pe = &q[&Seq(1)];
        assert_eq!(pe.urls[&7].cells, vec![(0, 5)]);
        assert_eq!(pe.events(), 2);
        let mut pe = PendingEpoch::default();
        let url: Arc<str> = Arc::from("http://a/x");
        let d = UrlDelta {
            cells: vec![(3, 1), (4, 2)],
            total: 3,
            ..UrlDelta::default()
        };
        pe.add(1, &url, true, &d, &[(3, 10), (4, 2)]);
        pe.add(2, &url, true, &d, &[(3, 1), (4, 2)]);
        pe.add(1, &url, false, &d, &[(3, 11), (4, 4)]);
        assert_eq!(pe.urls[&1].cells, vec![(3, 11), (4, 4)]);
        assert_eq!(pe.events(), 9);
        let keys = Keys::new("t:");
        let tx = transaction(&keys, &Pending::from([(Seq(1), pe)]));
        let hsets: Vec<&redis::Cmd> = tx
            .pipe
            .cmd_iter()
            .filter(|c| c.args_iter().next() == Some(redis::Arg::Simple(&b"HSET"[..])))
            .collect();
        // Ids 1 and 2 share a bucket: one command for their names (whose reply must say
        // both were new), one for their four cells.
        assert_eq!(hsets.len(), 2);
        assert_eq!(hsets[0].args_iter().count(), 2 + 2 * 2);
        assert_eq!(hsets[1].args_iter().count(), 2 + 2 * 4);
        assert_eq!(tx.expect, vec![2]);
    }

    /// A queue that waits long holds each of a URL's (cell, visitor) members about once, not
    /// once per batch that saw it, and loses none.
    #[test]
    fn a_long_queue_keeps_each_visitor_about_once() {
        let mut q = Pending::new();
        for b in 0..1000u64 {
            // 300 visitors come back in every batch, and one new one each time.
            merge(&mut q, batch(b + 1, (0..300).chain([1000 + b as i64])));
        }
        let u = &q[&Seq(1)].urls[&7];
        assert_eq!(u.cells, vec![(0, 1000)]);
        let distinct: std::collections::BTreeSet<i64> = u.visitors.iter().copied().collect();
        assert_eq!(distinct.len(), 1300);
        assert!(u.visitors.len() < 2 * 1300 + 300, "{}", u.visitors.len());
    }
}
