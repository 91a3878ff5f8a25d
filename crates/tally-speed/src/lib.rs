//! The speed layer: counts in Redis every event the serving batch view does not cover yet.
//!
//! - The **applier** (one task, the only writer of speed state) tails the WAL, pre-aggregates
//!   each batch per (epoch, url, hour) and applies it to the epoch's Redis keys with one Lua
//!   script per epoch touched. The script also sets the epoch's applied seq, as a compare-and-set
//!   on the previous one, so a crash, timeout or reconnect never applies a batch twice or skips
//!   one (`store.rs`).
//! - Per (epoch, URL, UTC day) the script also adds the distinct visitor hashes to a Redis set
//!   ([`sketch`]), so `/v1/uniques` can merge them with the batch view's day sketches.
//! - After each committed script the applier updates an in-process **mirror** (`mirror.rs`);
//!   queries read the mirror, never Redis, so they cost a read lock and a few map lookups.
//! - **Exactness**: a query answered with a batch view of cutoff `C` passes `after_cutoff = C`
//!   and gets the sum of exactly the epochs starting after `C`. Every epoch start is `cutoff + 1`
//!   of some batch run, so those epochs hold exactly the events with `seq > C`.
//! - **Failures**: Redis unreachable → [`SpeedLayer::available`] is false and reads answer
//!   `None` while the applier retries with backoff (cap 1 s) and then catches up. Redis back empty
//!   (the `{prefix}instance` marker is gone) → the live epochs are rebuilt from the master
//!   dataset; reads answer `None` until the rebuild has caught up.

mod aggregate;
mod applier;
mod keys;
mod mirror;
pub mod sketch;
mod store;

use std::collections::HashMap;
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

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum Error {
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("master dataset error: {0}")]
    Master(#[from] tally_master::Error),
    #[error("background task failed: {0}")]
    Task(String),
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
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) applies: AtomicU64,
    pub(crate) events_applied: AtomicU64,
    pub(crate) loads: AtomicU64,
    pub(crate) rebuilds: AtomicU64,
    pub(crate) errors: AtomicU64,
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
    pub(crate) redis_up: AtomicBool,
    /// The mirror is loaded and no rebuild is going on.
    pub(crate) ready: AtomicBool,
    /// Epochs starting before this may be deleted (0: nothing requested).
    pub(crate) gc_floor: AtomicU64,
    pub(crate) gc_wake: Notify,
    pub(crate) counters: Counters,
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
        let shared = Arc::new(Shared {
            mirror: RwLock::new(Mirror::default()),
            applied: AtomicU64::new(0),
            redis_up: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            gc_floor: AtomicU64::new(0),
            gc_wake: Notify::new(),
            counters: Counters::default(),
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
        let task = self.inner.task.lock().expect("task lock").take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    fn mirror(&self) -> Option<std::sync::RwLockReadGuard<'_, Mirror>> {
        if !self.available() {
            return None;
        }
        Some(
            self.inner
                .shared
                .mirror
                .read()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// Speed views of `url` in the hours `[from_hour, to_hour)`, summed over the live epochs
    /// starting after `after_cutoff` (the serving batch view's cutoff, or `Seq(0)` without a
    /// view). `None` when the speed layer is not available.
    pub fn views(&self, url: &str, after_cutoff: Seq, from_hour: i64, to_hour: i64) -> Option<u64> {
        Some(self.mirror()?.views(url, after_cutoff, from_hour, to_hour))
    }

    /// Non-zero speed views of `url` per hour in `[from_hour, to_hour)`, ascending by hour.
    pub fn hour_counts(
        &self,
        url: &str,
        after_cutoff: Seq,
        from_hour: i64,
        to_hour: i64,
    ) -> Option<Vec<(i64, u64)>> {
        Some(
            self.mirror()?
                .hour_counts(url, after_cutoff, from_hour, to_hour),
        )
    }

    /// Like [`range_totals`](Self::range_totals), but hands `f` a map whose URL keys borrow
    /// from the speed layer's mirror (no copies), under its read lock: keep `f` short.
    pub fn with_range_totals<R>(
        &self,
        after_cutoff: Seq,
        from_hour: i64,
        to_hour: i64,
        host: Option<&str>,
        f: impl FnOnce(&HashMap<&str, u64>) -> R,
    ) -> Option<R> {
        let mirror = self.mirror()?;
        let totals = mirror.range_totals_borrowed(after_cutoff, from_hour, to_hour, host);
        Some(f(&totals))
    }

    /// Speed views per URL in `[from_hour, to_hour)` for every URL with views there (optionally
    /// only those whose host is `host`), for an exact top-N merge with the batch view.
    pub fn range_totals(
        &self,
        after_cutoff: Seq,
        from_hour: i64,
        to_hour: i64,
        host: Option<&str>,
    ) -> Option<HashMap<String, u64>> {
        Some(
            self.mirror()?
                .range_totals(after_cutoff, from_hour, to_hour, host),
        )
    }

    /// Distinct visitor hashes ([`sketch::visitor_hash`], identical to the batch layer's) of
    /// `url` on the UTC days `[from_day, to_day)`, over the live epochs starting after
    /// `after_cutoff`, ascending. The serving layer builds a sketch from them and merges it with
    /// the batch view's day sketches. `None` when the speed layer is not available.
    pub fn visitor_hashes(
        &self,
        url: &str,
        after_cutoff: Seq,
        from_day: i64,
        to_day: i64,
    ) -> Option<Vec<u64>> {
        Some(
            self.mirror()?
                .visitor_hashes(url, after_cutoff, from_day, to_day),
        )
    }

    /// Highest seq whose effect is visible to reads.
    pub fn applied_seq(&self) -> Seq {
        Seq(self.inner.shared.applied.load(Ordering::Acquire))
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
        }
    }

    /// The live epochs (as the master dataset lists them) with their applied seq and URL count.
    pub fn epochs(&self) -> Vec<EpochInfo> {
        let starts = self.inner.master.epochs();
        let m = self
            .inner
            .shared
            .mirror
            .read()
            .unwrap_or_else(|p| p.into_inner());
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

    /// Called by the server after it swapped in a batch view with cutoff `current_cutoff`;
    /// `previous_good_cutoff` is the cutoff of the view that would serve again if the current one
    /// were discarded. After `gc_grace`, the epochs that end at or before `previous_good_cutoff`
    /// (needed by neither view) are deleted from Redis and the mirror, and the master dataset
    /// forgets them. Without a previous good view nothing is deleted: if the current view were
    /// discarded, queries would need every epoch.
    pub fn view_published(&self, current_cutoff: Seq, previous_good_cutoff: Option<Seq>) {
        let Some(prev) = previous_good_cutoff else {
            return;
        };
        // The fallback view is never newer than the serving one; be safe if it is.
        let floor = Seq(prev.min(current_cutoff).0 + 1);
        let shared = self.inner.shared.clone();
        let cancel = self.inner.cancel.child_token();
        let grace = self.inner.gc_grace;
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(grace) => {
                    shared.gc_floor.fetch_max(floor.0, Ordering::AcqRel);
                    shared.gc_wake.notify_one();
                }
            }
        });
    }
}
