//! The speed layer: counts in Redis every event the serving batch view does not cover yet.
//!
//! - The **applier** (one task, the only writer of speed state) tails the WAL, pre-aggregates
//!   each batch per (epoch, url, cell) and applies it to the epoch's Redis keys with one Lua
//!   script per epoch touched. The script also sets the epoch's applied seq, as a compare-and-set
//!   on the previous one, so a crash, timeout or reconnect never applies a batch twice or skips
//!   one (`store.rs`).
//! - Per (epoch, URL) the script also adds the distinct (15-minute cell, visitor hash) pairs to a
//!   Redis set ([`sketch`]), so `/v1/uniques` can merge them with the batch view's sketches and
//!   cell visitor lists, in any zone.
//! - After each committed script the applier updates an in-process **mirror** (`mirror.rs`);
//!   queries read the mirror, never Redis, so they cost a read lock and a few map lookups.
//! - **Exactness**: a query answered with a batch view of cutoff `C` passes `after_cutoff = C`
//!   and gets the sum of exactly the epochs starting after `C`. Every epoch start is `cutoff + 1`
//!   of some batch run, so those epochs hold exactly the events with `seq > C`. Epochs that no
//!   view which may serve needs are collected ([`SpeedLayer::retain_after`]); a read for a view
//!   whose epochs were collected is refused with [`NotCovered`], never answered short.
//! - **Failures**: Redis unreachable → [`SpeedLayer::available`] is false and reads answer
//!   `None` while the applier retries with backoff (cap 1 s) and then catches up. Redis back empty
//!   (the `{prefix}instance` marker is gone) → the live epochs are rebuilt from the master
//!   dataset; reads answer `None` until the rebuild has caught up.

mod aggregate;
mod applier;
pub mod conn;
mod hashes;
mod keys;
pub mod metrics;
mod mirror;
mod priority;
pub mod rank;
mod recent;
mod replica;
mod shard;
pub mod sketch;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tally_core::Seq;
use tally_master::Master;
use thiserror::Error;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::mirror::Mirror;
pub use crate::mirror::{SiteSpeed, SourceId, SourceSpeed, SpeedVisitors};
pub use crate::rank::BaseTotals;
pub use crate::recent::{Realtime, WINDOW_MS as REALTIME_WINDOW_MS};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A read for a batch view whose following epochs were collected: answering it would miss the
/// events of those epochs. The serving layer answers 503 until a newer view serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error(
    "the speed layer no longer holds the events after seq {cutoff} (its oldest epoch starts at \
     {floor}); a newer batch view must serve"
)]
pub struct NotCovered {
    /// The cutoff of the view the read was for.
    pub cutoff: Seq,
    /// The start of the oldest epoch the speed layer holds.
    pub floor: Seq,
}

/// A speed-layer read: `Ok(Some)` the answer, `Ok(None)` the speed layer is unavailable (Redis
/// down or rebuilding: answer batch-only, degraded), `Err` the view is not covered.
pub type Read<T> = std::result::Result<Option<T>, NotCovered>;

#[derive(Debug, Error)]
pub enum Error {
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("master dataset error: {0}")]
    Master(#[from] tally_master::Error),
    /// A background task panicked or was cancelled (a bug, logged where it happened).
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl Error {
    /// Whether this failure is corruption, transient, or the caller's mistake. Nothing the
    /// speed layer holds is precious: every failure is retried, from Redis or the master
    /// dataset, except what the master dataset itself reports.
    pub fn kind(&self) -> tally_core::error::ErrorKind {
        match self {
            Error::Master(e) => e.kind(),
            Error::Redis(_) | Error::Task(_) => tally_core::error::ErrorKind::Transient,
        }
    }
}

/// How the speed layer is run (the `redis` and `speed` config sections).
#[derive(Debug, Clone)]
pub struct SpeedConfig {
    /// e.g. `redis://127.0.0.1:6379/0` or `unix:///run/redis.sock`.
    pub redis_url: String,
    /// Prefix of every key, e.g. `tally:`.
    pub key_prefix: String,
    /// How long an epoch that no serving or fallback view needs is kept before it is deleted
    /// (longer than any query).
    pub gc_grace: Duration,
    /// At most this many events per apply batch from the in-memory tail.
    pub apply_batch_max: usize,
    /// Precision of the visitor sketches (`uniques.precision`): busy URL-cells keep their
    /// registers at it, so uniques over them merge registers instead of sorting hashes.
    pub sketch_precision: u8,
    /// Added to the process's nice value for the applier's threads while they apply
    /// (`speed.applier_nice`; negative: they win contended cores; see `priority.rs`).
    pub applier_nice: i32,
}

/// One live epoch, for `/v1/admin/status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EpochInfo {
    /// First seq of the epoch.
    pub start: Seq,
    /// Last seq of the epoch applied (`start - 1` when none yet).
    pub applied: Seq,
    /// Distinct URLs with views in the epoch.
    pub urls: usize,
}

/// Counters of the applier since start, for `/metrics` and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpeedStats {
    /// Apply scripts committed (one per epoch touched by a batch).
    pub applies: u64,
    /// Events whose increments were committed.
    pub events_applied: u64,
    /// Times the mirror was (re)loaded from Redis (start, or Redis differed from the mirror).
    pub loads: u64,
    /// Rebuilds from the master dataset (Redis had lost our state).
    pub rebuilds: u64,
    /// Failed attempts (Redis unreachable, timeouts, storage errors), each followed by a backoff.
    pub errors: u64,
    /// Times Redis was rewritten from the mirror (it had lost or changed what we wrote).
    pub resyncs: u64,
    /// Epoch collections considered (each after a grace period following a rise of
    /// [`SpeedLayer::retain_after`]), whether or not they deleted anything.
    pub collections: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) applies: AtomicU64,
    pub(crate) events_applied: AtomicU64,
    pub(crate) loads: AtomicU64,
    pub(crate) rebuilds: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) collections: AtomicU64,
    pub(crate) resyncs: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// State shared by the handle and the applier task.
pub(crate) struct Shared {
    pub(crate) mirror: RwLock<Mirror>,
    /// Highest seq whose effect is in the mirror.
    pub(crate) applied: AtomicU64,
    /// Highest seq whose effect is in Redis (written behind the mirror).
    pub(crate) redis_applied: AtomicU64,
    pub(crate) redis_up: AtomicBool,
    /// The mirror is loaded and no rebuild is going on.
    pub(crate) ready: AtomicBool,
    /// The smallest cutoff of a view that may serve (see [`SpeedLayer::retain_after`]); the
    /// epochs ending at or before it may be collected.
    pub(crate) retain_after: AtomicU64,
    /// A collection is due (set a grace period after `retain_after` rose).
    pub(crate) gc_due: AtomicBool,
    pub(crate) gc_wake: Notify,
    pub(crate) counters: Counters,
    /// The serving batch view's side of the all-time rankings (`None`: no view serves).
    pub(crate) base: Mutex<Option<Arc<dyn BaseTotals>>>,
    /// The last minutes of events, for realtime.
    pub(crate) recent: Mutex<recent::Recent>,
    /// Tests: the next batch added to the mirror panics once its counts are in.
    #[cfg(test)]
    pub(crate) panic_next_apply: AtomicBool,
}

impl Shared {
    /// Rebuilds the mirror's rankings for the current base (after the mirror was replaced).
    pub(crate) fn rank(&self, m: &mut Mirror) {
        let base = tally_core::sync::lock(&self.base)
            .clone()
            .unwrap_or_else(|| Arc::new(rank::NoView));
        m.set_base(base);
    }
}

struct Inner {
    shared: Arc<Shared>,
    master: Master,
    gc_grace: Duration,
    cancel: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Handle to the speed layer. Cheap to clone; the applier stops when the last clone is dropped
/// or [`SpeedLayer::shutdown`] is called.
#[derive(Clone)]
pub struct SpeedLayer {
    inner: Arc<Inner>,
}

impl SpeedLayer {
    /// Starts the applier. Never fails because Redis is down: the applier keeps retrying, and
    /// [`SpeedLayer::available`] says when reads can be trusted. Must be called inside a tokio
    /// runtime.
    pub async fn start(cfg: SpeedConfig, master: Master) -> SpeedLayer {
        // Until the mirror is loaded, reads are unavailable; its floor is already the oldest
        // epoch the master dataset lists, so coverage checks hold from the start.
        let oldest = master.epochs().first().copied().unwrap_or(Seq(1));
        let shared = Arc::new(Shared {
            mirror: RwLock::new(Mirror::empty(oldest, cfg.sketch_precision)),
            applied: AtomicU64::new(0),
            redis_applied: AtomicU64::new(0),
            redis_up: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            retain_after: AtomicU64::new(0),
            gc_due: AtomicBool::new(false),
            gc_wake: Notify::new(),
            counters: Counters::default(),
            base: Mutex::new(None),
            recent: Mutex::new(recent::Recent::default()),
            #[cfg(test)]
            panic_next_apply: AtomicBool::new(false),
        });
        let cancel = CancellationToken::new();
        let task = tokio::spawn(applier::run(
            cfg.clone(),
            master.clone(),
            shared.clone(),
            cancel.child_token(),
        ));
        SpeedLayer {
            inner: Arc::new(Inner {
                shared,
                master,
                gc_grace: cfg.gc_grace,
                cancel,
                task: Mutex::new(Some(task)),
            }),
        }
    }

    /// Stops the applier and waits for it. Reads keep answering from the mirror as it was.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        let task = tally_core::sync::lock(&self.inner.task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    fn mirror(&self) -> std::sync::RwLockReadGuard<'_, Mirror> {
        tally_core::sync::read(&self.inner.shared.mirror)
    }

    /// Runs `f` on the mirror when reads can be trusted (see [`Read`]).
    fn read<T>(&self, f: impl FnOnce(&Mirror) -> Result<T, NotCovered>) -> Read<T> {
        if !self.available() {
            return Ok(None);
        }
        f(&self.mirror()).map(Some)
    }

    /// Speed views of `url` in the cells `[from_cell, to_cell)`, summed over the live epochs
    /// starting after `after_cutoff` (the serving batch view's cutoff, or `Seq(0)` without a
    /// view).
    pub fn views(&self, url: &str, after_cutoff: Seq, from_cell: i64, to_cell: i64) -> Read<u64> {
        self.read(|m| m.views(url, after_cutoff, from_cell, to_cell))
    }

    /// Non-zero speed views of `url` per cell in `[from_cell, to_cell)`, ascending by cell.
    pub fn cell_counts(
        &self,
        url: &str,
        after_cutoff: Seq,
        from_cell: i64,
        to_cell: i64,
    ) -> Read<Vec<(i64, u64)>> {
        self.read(|m| m.cell_counts(url, after_cutoff, from_cell, to_cell))
    }

    /// Hands `f` the speed views per URL in `[from_cell, to_cell)` of every URL with views there
    /// (optionally only those whose host is `host`), for an exact top-N merge with the batch
    /// view. The URL keys borrow from the mirror (no copies), under its read lock: keep `f`
    /// short.
    pub fn with_range_totals<R>(
        &self,
        after_cutoff: Seq,
        from_cell: i64,
        to_cell: i64,
        host: Option<&str>,
        f: impl FnOnce(&HashMap<&str, u64>) -> R,
    ) -> Read<R> {
        self.read(|m| {
            m.range_totals(after_cutoff, from_cell, to_cell, host)
                .map(|t| f(&t))
        })
    }

    /// [`with_range_totals`](Self::range_totals) into an owned map.
    pub fn range_totals(
        &self,
        after_cutoff: Seq,
        from_cell: i64,
        to_cell: i64,
        host: Option<&str>,
    ) -> Read<HashMap<String, u64>> {
        self.with_range_totals(after_cutoff, from_cell, to_cell, host, |t| {
            t.iter().map(|(u, n)| (u.to_string(), *n)).collect()
        })
    }

    /// The distinct visitors of `url` in the cells `[from_cell, to_cell)`, over the live epochs
    /// starting after `after_cutoff`, for sketches of `precision`: 32-bit visitor hashes
    /// (`tally_core::sketch::visitor_hash32`, the hash the batch view's sketches hold), and the
    /// registers of busy cells (past the sparse limit). The serving layer unions them with the
    /// batch view's sketches.
    pub fn visitors(
        &self,
        url: &str,
        after_cutoff: Seq,
        from_cell: i64,
        to_cell: i64,
        precision: u8,
    ) -> Read<SpeedVisitors> {
        let collected = self.read(|m| m.visitors(url, after_cutoff, from_cell, to_cell, precision));
        collected.map(|v| v.map(|v| v.finish(precision)))
    }

    /// Whole sites (every URL whose host is one of `hosts`) over the live epochs starting
    /// after `after_cutoff`: each one's views per cell in `cells` = `[from, to)` and its
    /// visitors per cell in `visitor_cells` = `[from, to)`, each cell as [`visitors`](Self::visitors)
    /// answers for a URL. One scan of the live URLs under the read lock.
    pub fn sites(
        &self,
        hosts: &[&str],
        after_cutoff: Seq,
        cells: (i64, i64),
        visitor_cells: (i64, i64),
        precision: u8,
    ) -> Read<HashMap<String, SiteSpeed>> {
        let collected =
            self.read(|m| m.sites(hosts, after_cutoff, cells, visitor_cells, precision));
        collected.map(|s| {
            s.map(|mut s| {
                for site in s.values_mut() {
                    for v in site.visitors.values_mut() {
                        *v = std::mem::take(v).finish(precision);
                    }
                }
                s
            })
        })
    }

    /// The source keys (referrer host, URL) of site `host` — of `url` alone when given — over
    /// the live epochs after `after_cutoff`, with their views in `cells` = `[from, to)` (and
    /// per cell, with `per_cell`). A
    /// breakdown by any dimension sums these; [`source_visitors`](Self::source_visitors) gives
    /// the visitors of the keys it ranks first.
    pub fn sources(
        &self,
        host: &str,
        url: Option<&str>,
        after_cutoff: Seq,
        cells: (i64, i64),
        per_cell: bool,
    ) -> Read<Vec<SourceSpeed>> {
        self.read(|m| m.sources(host, url, after_cutoff, cells, per_cell))
    }

    /// The pages of site `host` (`url` alone when given) over the live epochs after
    /// `after_cutoff`, each with all its views in `cells` (and per cell, with `per_cell`): for
    /// a grouping whose value is a function of the URL alone, the same sums as
    /// [`sources`](Self::sources) over one key per page instead of one per (referrer, page).
    pub fn pages(
        &self,
        host: &str,
        url: Option<&str>,
        after_cutoff: Seq,
        cells: (i64, i64),
        per_cell: bool,
    ) -> Read<Vec<SourceSpeed>> {
        self.read(|m| m.pages(host, url, after_cutoff, cells, per_cell))
    }

    /// The campaign keys of site `host` — its views grouped by referrer host and UTM parameters
    /// (`tally_core::dims::write_campaign_key`) — over the live epochs after `after_cutoff`,
    /// with their views in `cells` (and per cell, with `per_cell`): for a grouping whose value
    /// is a function of the campaign alone (`tally_core::dims::is_campaign_dimension`), the
    /// same sums as [`sources`](Self::sources) over far fewer keys.
    pub fn campaigns(
        &self,
        host: &str,
        after_cutoff: Seq,
        cells: (i64, i64),
        per_cell: bool,
    ) -> Read<Vec<SourceSpeed>> {
        self.read(|m| m.campaigns(host, after_cutoff, cells, per_cell))
    }

    /// The visitors of each of `keys` (from [`sources`](Self::sources),
    /// [`pages`](Self::pages) or [`campaigns`](Self::campaigns) with the same
    /// `after_cutoff`) per cell in `visitor_cells` = `[from, to)`, each cell as
    /// [`visitors`](Self::visitors) answers for a URL. Fails with [`NotCovered`] when an epoch
    /// the keys were read from has been collected since.
    pub fn source_visitors(
        &self,
        keys: &[SourceId],
        after_cutoff: Seq,
        visitor_cells: (i64, i64),
        precision: u8,
    ) -> Read<Vec<BTreeMap<i64, SpeedVisitors>>> {
        let collected =
            self.read(|m| m.source_visitors(keys, after_cutoff, visitor_cells, precision));
        collected.map(|s| {
            s.map(|mut s| {
                for k in &mut s {
                    for v in k.values_mut() {
                        *v = std::mem::take(v).finish(precision);
                    }
                }
                s
            })
        })
    }

    /// Site `host` in the last five minutes ([`REALTIME_WINDOW_MS`]): views per page and
    /// distinct visitors of the events applied so far. `None` while the speed layer is
    /// unavailable.
    pub fn realtime(&self, host: &str) -> Option<Realtime> {
        if !self.available() {
            return None;
        }
        let recent = tally_core::sync::lock(&self.inner.shared.recent);
        Some(recent.site(host, tally_core::now_ms()))
    }

    /// host → speed views in `[from_cell, to_cell)` of every site with views there.
    pub fn site_totals(
        &self,
        after_cutoff: Seq,
        from_cell: i64,
        to_cell: i64,
    ) -> Read<HashMap<String, u64>> {
        self.read(|m| {
            m.site_totals(after_cutoff, from_cell, to_cell)
                .map(|t| t.into_iter().map(|(h, n)| (h.to_string(), n)).collect())
        })
    }

    /// The exact top `limit` URLs of all time — views until `to_cell`, the next full hour —
    /// of the serving view `view_id` (cutoff `after_cutoff`; `""` and `Seq(0)` without a view)
    /// plus the speed layer, optionally of one host, in `O(limit)` from rankings kept up to date
    /// by every apply. `Ok(Some(None))` when the rankings cannot answer (built for another view,
    /// or a limit above what they keep: 1 000 overall, 100 per host): scan instead.
    pub fn top_all_time(
        &self,
        view_id: &str,
        after_cutoff: Seq,
        limit: usize,
        host: Option<&str>,
        to_cell: i64,
    ) -> Read<Option<Vec<(String, u64)>>> {
        self.read(|m| m.top_all_time(view_id, after_cutoff, limit, host, to_cell))
    }

    /// Tells the speed layer which batch view serves, for its all-time rankings; rebuilds them
    /// (blocking: call it off the async runtime).
    pub fn set_base(&self, base: Option<Arc<dyn BaseTotals>>) {
        let shared = &self.inner.shared;
        *tally_core::sync::lock(&shared.base) = base;
        let mut m = tally_core::sync::write(&shared.mirror);
        shared.rank(&mut m);
    }

    /// Whether reads for a batch view with cutoff `cutoff` are answered (none of the epochs
    /// after it was collected). Independent of Redis being reachable.
    pub fn covers(&self, cutoff: Seq) -> bool {
        self.mirror().covers(cutoff)
    }

    /// Highest seq whose effect is visible to reads.
    pub fn applied_seq(&self) -> Seq {
        Seq(self.inner.shared.applied.load(Ordering::Acquire))
    }

    /// Highest seq whose effect Redis holds (Redis is written a little behind what reads see).
    pub fn redis_applied_seq(&self) -> Seq {
        Seq(self.inner.shared.redis_applied.load(Ordering::Acquire))
    }

    /// Whether the last Redis operation succeeded.
    pub fn redis_up(&self) -> bool {
        self.inner.shared.redis_up.load(Ordering::Acquire)
    }

    /// Whether reads answer (Redis reachable, mirror loaded, no rebuild going on).
    pub fn available(&self) -> bool {
        self.redis_up() && self.inner.shared.ready.load(Ordering::Acquire)
    }

    /// Counters of the applier since start.
    pub fn stats(&self) -> SpeedStats {
        let c = &self.inner.shared.counters;
        SpeedStats {
            applies: c.applies.load(Ordering::Relaxed),
            events_applied: c.events_applied.load(Ordering::Relaxed),
            loads: c.loads.load(Ordering::Relaxed),
            rebuilds: c.rebuilds.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            collections: c.collections.load(Ordering::Relaxed),
            resyncs: c.resyncs.load(Ordering::Relaxed),
        }
    }

    /// The live epochs (as the master dataset lists them) with their applied seq and URL count.
    pub fn epochs(&self) -> Vec<EpochInfo> {
        let starts = self.inner.master.epochs();
        let m = self.mirror();
        starts
            .into_iter()
            .map(|start| {
                let e = m.epochs.get(&start);
                EpochInfo {
                    start,
                    applied: e
                        .map(|e| e.applied)
                        .filter(|a| *a >= start)
                        .unwrap_or(Seq(start.0.saturating_sub(1))),
                    urls: e.map_or(0, |e| e.urls.len()),
                }
            })
            .collect()
    }

    /// Tells the speed layer the smallest cutoff of the batch views that may serve: the
    /// serving view and the fallbacks a discard would turn to (`Seq(0)`: keep every epoch).
    /// When it rises, the epochs ending at or before it are collected after `gc_grace` — with
    /// the value current *then*, so a discard meanwhile lowers what is collected. A view whose
    /// epochs were collected anyway (discarded further back than the fallbacks) gets
    /// [`NotCovered`] on every read, never a short count.
    pub fn retain_after(&self, cutoff: Seq) {
        let shared = self.inner.shared.clone();
        let prev = shared.retain_after.swap(cutoff.0, Ordering::AcqRel);
        if cutoff.0 <= prev {
            return;
        }
        let cancel = self.inner.cancel.child_token();
        let grace = self.inner.gc_grace;
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(grace) => {
                    shared.gc_due.store(true, Ordering::Release);
                    shared.gc_wake.notify_one();
                }
            }
        });
    }
}
