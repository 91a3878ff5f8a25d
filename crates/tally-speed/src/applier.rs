//! The applier: the one task that writes speed state.
//!
//! - **Visibility.** It waits for acknowledged events (notified by the master dataset's watch
//!   channel), reads them from the in-memory tail (or from storage when the tail no longer has
//!   them, and always while rebuilding), pre-aggregates them and adds them to the mirror — in
//!   parts of [`APPLY_PART_URLS`] URLs, each under its own short write lock, so queries never
//!   wait long — then publishes the applied seq. Queries see an event a few milliseconds after
//!   its acknowledgement, whatever Redis is doing.
//! - **Redis, written behind** (`replica.rs`). Each delta is also queued; while one Redis
//!   transaction is in flight, the next deltas coalesce. The transaction is a compare-and-set on
//!   every epoch's applied seq, so Redis's `applied` names exactly the events it holds. A Redis
//!   that no longer holds what we wrote (restarted empty, flushed, restored, another dataset's
//!   marker) is rewritten from the mirror; one that is unreachable makes reads unavailable
//!   (`speed_available: false`, as API.md requires) while the queue waits, bounded by
//!   [`PENDING_MAX_EVENTS`] beyond which a rewrite replaces it. A Redis that answers but
//!   slowly keeps its queue, whatever its length (see `Applier::queue`).
//!
//! States: `Sync` (load the mirror from Redis at start, or after the mirror refused a delta) →
//! `Run`; `Rebuild` (the mirror from the master dataset) when Redis has no usable state. Storage
//! errors go back to `Run` after a backoff (50 ms doubling to 1 s).

use std::collections::{BTreeMap, BTreeSet};

use crate::metrics::{
    APPLY_BATCH_EVENTS, APPLY_SECONDS, MIRROR_WRITE_SECONDS, REDIS_WRITE_EVENTS,
    REDIS_WRITE_SECONDS,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_core::Seq;
use tally_master::{Master, SeqEvent, Tail};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::aggregate::{aggregate, epoch_of, EpochDelta, UrlDelta};
use crate::keys::{instance_marker, marker_is_ours, rewriting_marker, Keys};
use crate::mirror::{Mirror, UrlUpdate};
use crate::priority::applier_priority;
use crate::replica::{self, Pending, PendingEpoch, WriteOutcome};
use crate::store::{LoadedEpoch, Store};
use crate::{Counters, Error, Result, Shared, SpeedConfig};

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// While idle, check Redis (reachable, still holding our state) this often.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Events read per `read_range` call from storage: while rebuilding, and whenever the applier
/// is further behind than the in-memory tail holds. A master file is sorted by URL, not by seq,
/// so every call decodes each file it touches whole: 20 000-event chunks (`apply_batch_max`)
/// decoded a 1M-event file 50 times, which kept an applier that had fallen past the tail from
/// ever catching up (the mixed benchmark's lag stuck around 1–3 M events). The window is
/// counted in events, not `seq`s (`Master::storage_window`): in cluster mode 250 000 `seq`s
/// may hold two messages.
const STORAGE_CHUNK: usize = 250_000;
/// Batches larger than this are aggregated off the runtime.
const INLINE_AGGREGATE_MAX: usize = 1024;
/// How long a stopping applier keeps writing what Redis does not hold yet (so that a restart
/// resumes from Redis instead of replaying).
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);
/// URLs added to the mirror under one write lock. Under 100 000 events/s on fresh URLs the
/// applier holds the lock about half the time, ~7 µs per URL on saturated cores
/// (`tally_speed_mirror_write_seconds`); 256 URLs keep each hold, and so each query's wait for
/// it, around 2 ms (2 048 held it 14 ms on average and up to 100 ms).
pub(crate) const APPLY_PART_URLS: usize = 256;
/// Events queued while Redis fails beyond which the queue is dropped and Redis is rewritten
/// from the mirror once it answers again (bounds the memory a long Redis outage can take).
pub(crate) const PENDING_MAX_EVENTS: u64 = 2_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Sync,
    Rebuild,
    Run,
}

/// A Redis task in flight: a transaction of queued deltas (what it tried, to put back on a
/// transient failure) or a rewrite from the mirror (the applied seqs it writes).
enum Inflight {
    Write(JoinHandle<WriteDone>),
    Resync(JoinHandle<ResyncDone>),
}

type WriteDone = (Pending, BTreeSet<Seq>, Result<WriteOutcome>);
type ResyncDone = (BTreeMap<Seq, Seq>, Result<bool>);

/// What a finished Redis task gave back.
enum Done {
    Write(WriteDone),
    Resync(ResyncDone),
}

/// Waits for the Redis task in flight (forever when there is none) and takes it out.
async fn finished(inflight: &mut Option<Inflight>) -> Done {
    let done = match inflight {
        None => std::future::pending().await,
        Some(Inflight::Write(h)) => Done::Write(
            h.await
                .unwrap_or_else(|e| (Pending::new(), BTreeSet::new(), Err(Error::Task(e)))),
        ),
        Some(Inflight::Resync(h)) => Done::Resync(
            h.await
                .unwrap_or_else(|e| (BTreeMap::new(), Err(Error::Task(e)))),
        ),
    };
    *inflight = None;
    done
}

struct Applier {
    cfg: SpeedConfig,
    master: Master,
    shared: Arc<Shared>,
    store: Store,
    acked: watch::Receiver<Seq>,
    /// Our instance marker, as written in `{prefix}instance` (`keys::instance_marker`).
    instance: Option<String>,
    /// The mirror holds a state Redis held at some point, plus what we applied since.
    loaded: bool,
    /// Every event with `seq <= pos` is in the mirror (or skipped as belonging to a forgotten
    /// epoch).
    pos: Seq,
    /// While rebuilding: reads stay unavailable until `pos` reaches this.
    rebuild_target: Option<Seq>,
    /// Epochs starting before this are garbage.
    floor: Seq,
    /// Deltas in the mirror and not yet in Redis, coalesced.
    pending: Pending,
    /// The applied seq Redis holds per epoch (what we last wrote or loaded).
    redis_applied: BTreeMap<Seq, Seq>,
    /// Collected epochs whose Redis keys are still to be deleted.
    doomed: BTreeSet<Seq>,
    /// Redis no longer holds what we wrote: rewrite it from the mirror.
    resync: bool,
    inflight: Option<Inflight>,
    /// No Redis task starts before this (backoff after a failure).
    redis_retry_at: Option<Instant>,
    redis_backoff: Duration,
    /// When Redis last answered (a heartbeat checks the marker when idle longer).
    redis_seen: Instant,
    /// A batch being added to the mirror off the runtime. Kept here, not in a local, so that
    /// a stop in the middle of [`Applier::step`] still waits for it (and queues what it added)
    /// before the last flush: a mirror changed behind the applier's back could otherwise be
    /// snapshotted half-applied.
    applying: Option<Applying>,
    /// The next batch, read and aggregated while the one before it is added to the mirror.
    read_ahead: Option<ReadAhead>,
    /// The applier is stopping: it writes what is queued but never rewrites Redis from its
    /// mirror (the next applier decides, from what Redis then holds).
    stopping: bool,
}

/// A batch being added to the mirror: every event with `seq <= through` once it finishes.
struct Applying {
    through: Seq,
    events: u64,
    started: Instant,
    task: JoinHandle<std::result::Result<Pending, String>>,
}

/// A batch being read from the in-memory tail and aggregated off the runtime, while the batch
/// before it (every event up to `after`) is added to the mirror: the applier's two halves run
/// on two threads, so that reading the next events never waits for the mirror, nor the mirror
/// for them. `None` when the tail no longer held the events (they are read from storage then).
struct ReadAhead {
    after: Seq,
    task: JoinHandle<Option<(Seq, Vec<EpochDelta>)>>,
}

pub(crate) async fn run(
    cfg: SpeedConfig,
    master: Master,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let conn = match crate::conn::SpeedConn::open(&cfg.redis_url) {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "speed layer disabled: invalid redis url");
            return;
        }
    };
    let mut a = Applier {
        store: Store::new(conn, Keys::new(&cfg.key_prefix)),
        acked: master.subscribe(),
        cfg,
        master,
        shared,
        instance: None,
        loaded: false,
        pos: Seq::ZERO,
        rebuild_target: None,
        floor: Seq::ZERO,
        pending: Pending::new(),
        redis_applied: BTreeMap::new(),
        doomed: BTreeSet::new(),
        resync: false,
        inflight: None,
        redis_retry_at: None,
        redis_backoff: BACKOFF_MIN,
        redis_seen: Instant::now(),
        applying: None,
        read_ahead: None,
        stopping: false,
    };
    if let Some(policy) = a.store.eviction_policy().await {
        if policy != "noeviction" {
            warn!(%policy, "redis may evict keys under memory pressure (maxmemory-policy is not \
                noeviction): evicted speed-layer keys would lose counts until the next batch run; \
                set maxmemory-policy noeviction");
        }
    }
    let mut phase = Phase::Sync;
    let mut backoff = BACKOFF_MIN;
    loop {
        let res = tokio::select! {
            _ = cancel.cancelled() => break,
            r = a.step(phase) => r,
        };
        match res {
            Ok(next) => {
                phase = next;
                backoff = BACKOFF_MIN;
            }
            Err(e) => {
                Counters::bump(&a.shared.counters.errors, 1);
                if matches!(e, Error::Redis(_)) {
                    a.shared.redis_up.store(false, Ordering::Release);
                }
                warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "speed applier failed; retrying");
                if !a.loaded {
                    phase = Phase::Sync;
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    a.stopping = true;
    if let Err(e) = a.finish_apply().await {
        debug!(error = %e, "the last batch was not added to the mirror");
    }
    a.flush_redis(SHUTDOWN_FLUSH).await;
    debug!("speed applier stopped");
}

/// The live epochs: the master dataset's list without the garbage below `floor`.
fn live_epochs(master: &Master, floor: Seq) -> Vec<Seq> {
    let mut v: Vec<Seq> = master
        .epochs()
        .into_iter()
        .filter(|s| *s >= floor)
        .collect();
    if v.is_empty() {
        v.push(floor.max(Seq(1)));
    }
    v
}

/// A random-enough id for a new incarnation of the speed state.
fn new_incarnation() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{:x}-{:x}-{:x}",
        nanos,
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl Applier {
    async fn step(&mut self, phase: Phase) -> Result<Phase> {
        match phase {
            Phase::Sync => self.sync().await,
            Phase::Rebuild => self.rebuild().await,
            Phase::Run => self.run_once().await,
        }
    }

    fn set_ready(&mut self) {
        if let Some(t) = self.rebuild_target {
            if self.pos >= t {
                info!(applied_seq = self.pos.0, "speed layer rebuild caught up");
                self.rebuild_target = None;
            }
        }
        self.shared.ready.store(
            self.loaded && self.rebuild_target.is_none(),
            Ordering::Release,
        );
    }

    fn set_pos(&mut self, pos: Seq) {
        self.pos = pos;
        self.shared.applied.store(pos.0, Ordering::Release);
    }

    fn set_redis_up(&mut self, up: bool) {
        self.shared.redis_up.store(up, Ordering::Release);
        if up {
            self.redis_seen = Instant::now();
        }
    }

    fn mirror_write(&self) -> std::sync::RwLockWriteGuard<'_, Mirror> {
        tally_core::sync::write(&self.shared.mirror)
    }

    fn mirror_read(&self) -> std::sync::RwLockReadGuard<'_, Mirror> {
        tally_core::sync::read(&self.shared.mirror)
    }

    /// Writes what is queued for Redis, for at most `limit` (at shutdown).
    async fn flush_redis(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self.inflight.is_none() {
                self.redis_retry_at = None;
                self.start_redis();
            }
            if self.inflight.is_none() {
                return;
            }
            match tokio::time::timeout_at(deadline.into(), finished(&mut self.inflight)).await {
                Ok(d) => {
                    let failed =
                        matches!(&d, Done::Write((_, _, Err(_))) | Done::Resync((_, Err(_))));
                    self.redis_done(d);
                    if failed {
                        return;
                    }
                }
                Err(_) => return,
            }
            if Instant::now() >= deadline {
                return;
            }
        }
    }

    /// Drops whatever is queued or in flight for Redis (before the mirror is replaced).
    async fn reset_replica(&mut self) {
        if self.inflight.is_some() {
            let _ = finished(&mut self.inflight).await;
        }
        self.pending.clear();
        self.set_redis_applied(BTreeMap::new());
        self.resync = false;
        self.redis_retry_at = None;
    }

    /// Loads the mirror from Redis when Redis holds our state, else rebuilds it.
    async fn sync(&mut self) -> Result<Phase> {
        self.shared.ready.store(false, Ordering::Release);
        self.reset_replica().await;
        let inst = self.store.instance().await?;
        self.set_redis_up(true);
        let inst = match inst {
            None => {
                info!("redis holds no speed state; building it from the master dataset");
                return Ok(Phase::Rebuild);
            }
            Some(m) if m.starts_with(&rewriting_marker("")) => {
                info!(
                    marker = %m,
                    "a rewrite of the speed state in redis was stopped half-way (a restart while \
                     redis caught up); rebuilding it from the master dataset"
                );
                return Ok(Phase::Rebuild);
            }
            Some(m) if !marker_is_ours(&m, self.master.dataset_id()) => {
                warn!(
                    marker = %m,
                    dataset_id = self.master.dataset_id(),
                    "redis holds speed state of another master dataset or key layout (a replaced \
                     data_dir, or two servers sharing one redis.key_prefix); rebuilding it from \
                     this dataset"
                );
                return Ok(Phase::Rebuild);
            }
            Some(m) => m,
        };
        let live = live_epochs(&self.master, self.floor);
        self.load(inst, live).await
    }

    /// Replaces the mirror with what Redis holds for the live epochs and resumes after it.
    /// State that cannot be the result of in-order applies — an epoch missing before one that
    /// has state, a URL id naming two URLs — is rebuilt rather than trusted.
    async fn load(&mut self, inst: String, live: Vec<Seq>) -> Result<Phase> {
        for e in self.store.listed_epochs().await? {
            if !live.contains(&e) {
                info!(
                    epoch = e.0,
                    "deleting a speed epoch the master dataset no longer lists"
                );
                self.store.delete_epoch(e).await?;
            }
        }
        // Each epoch is loaded consistently on its own (`load_epoch`), but one transaction may
        // move several epochs (the end of one and the start of the next): a write landing
        // between two epochs' loads would leave the mirror with an old epoch and a newer one,
        // and resuming after the newer one's applied seq would skip the old one's tail. So the
        // applied seqs of all epochs are read again together, and the load starts over when
        // any moved (a restart overlapping the previous applier's last writes).
        let loaded = 'load: loop {
            let mut loaded: Vec<(Seq, Option<LoadedEpoch>)> = Vec::with_capacity(live.len());
            for e in &live {
                loaded.push((*e, self.store.load_epoch(*e).await?));
            }
            let now = self.store.applied_of(&live).await?;
            let same = loaded
                .iter()
                .zip(&now)
                .all(|((_, s), n)| s.as_ref().map_or(Seq(0), |s| s.applied) == *n);
            if !same {
                continue;
            }
            // Keys without an applied seq are no finished write: garbage, deleted before this
            // applier writes the epoch afresh. Only while the epoch still has no applied seq and
            // the marker is unchanged; else a write landed meanwhile and the load starts over.
            for (e, state) in &loaded {
                if state.is_none() && !self.store.delete_unapplied_epoch(*e, &inst).await? {
                    let now = self.store.instance().await?;
                    if now.as_deref() != Some(inst.as_str()) {
                        info!(
                            "the speed state in redis changed hands while loading; syncing again"
                        );
                        return Ok(Phase::Sync);
                    }
                    continue 'load;
                }
            }
            break loaded;
        };
        let mut m = match mirror_from(live[0], self.cfg.sketch_precision, loaded) {
            Ok(m) => m,
            Err(reason) => {
                warn!(%reason, "speed state in redis is not consistent; rebuilding it");
                return Ok(Phase::Rebuild);
            }
        };
        let pos = m
            .epochs
            .values()
            .map(|e| e.applied)
            .max()
            .unwrap_or(Seq(live[0].0.saturating_sub(1)));
        let acked = self.master.acked_seq();
        if pos > acked {
            warn!(
                applied_seq = pos.0,
                acked_seq = acked.0,
                "redis holds seqs the master dataset does not have; rebuilding"
            );
            return Ok(Phase::Rebuild);
        }
        let urls = m.dict.len();
        self.set_redis_applied(m.epochs.iter().map(|(e, s)| (*e, s.applied)).collect());
        Counters::bump(&self.shared.counters.loads, 1);
        self.shared.rank(&mut m);
        *self.mirror_write() = m;
        self.instance = Some(inst);
        self.loaded = true;
        self.set_pos(pos);
        self.set_ready();
        info!(
            applied_seq = pos.0,
            epochs = live.len(),
            urls,
            "speed state loaded from redis"
        );
        Ok(Phase::Run)
    }

    /// Empties the mirror and replays the live epochs from the master dataset into it; Redis is
    /// rewritten under a new marker and then follows the replay.
    async fn rebuild(&mut self) -> Result<Phase> {
        self.shared.ready.store(false, Ordering::Release);
        self.reset_replica().await;
        let live = live_epochs(&self.master, self.floor);
        let mut m = Mirror::empty(live[0], self.cfg.sketch_precision);
        self.shared.rank(&mut m);
        *self.mirror_write() = m;
        self.instance = Some(instance_marker(
            self.master.dataset_id(),
            &new_incarnation(),
        ));
        self.resync = true;
        self.loaded = true;
        self.set_pos(Seq(live[0].0.saturating_sub(1)));
        let target = self.master.acked_seq();
        self.rebuild_target = Some(target);
        Counters::bump(&self.shared.counters.rebuilds, 1);
        info!(
            from_seq = self.pos.0,
            target_seq = target.0,
            "speed layer rebuild started"
        );
        self.set_ready();
        Ok(Phase::Run)
    }

    async fn run_once(&mut self) -> Result<Phase> {
        self.maybe_gc().await?;
        self.poll_redis().await;
        self.start_redis();
        let acked = *self.acked.borrow_and_update();
        if acked <= self.pos {
            self.set_ready();
            let wake = match self.redis_retry_at {
                Some(t) if self.wants_redis() => t.saturating_duration_since(Instant::now()),
                _ => HEARTBEAT,
            };
            let mut done = None;
            let mut beat = false;
            tokio::select! {
                r = self.acked.changed() => {
                    if r.is_err() {
                        // The master dataset is closed: nothing more will come.
                        tokio::time::sleep(HEARTBEAT).await;
                    }
                }
                d = finished(&mut self.inflight) => done = Some(d),
                _ = self.shared.gc_wake.notified() => {}
                _ = tokio::time::sleep(wake) => beat = true,
            }
            if let Some(d) = done {
                self.redis_done(d);
            }
            if beat && self.inflight.is_none() && self.redis_seen.elapsed() >= HEARTBEAT {
                self.heartbeat().await;
            }
            return Ok(Phase::Run);
        }
        let started = Instant::now();
        let (through, deltas) = match self.take_read_ahead().await {
            Some(batch) => batch,
            None => self.read_batch(acked).await?,
        };
        let events: u64 = deltas.iter().map(EpochDelta::events).sum();
        debug!(
            after = self.pos.0,
            through = through.0,
            events,
            "speed applier batch"
        );
        // Off the async runtime: adding a large batch takes milliseconds of CPU that request
        // handlers should not wait behind.
        let queue: Vec<bool> = deltas
            .iter()
            .map(|d| !self.resync && self.redis_applied_ok(d.epoch))
            .collect();
        let shared = self.shared.clone();
        let nice = self.cfg.applier_nice;
        self.applying = Some(Applying {
            through,
            events,
            started,
            task: tokio::task::spawn_blocking(move || {
                let _priority = applier_priority(nice);
                apply_to_mirror(&shared, &deltas, &queue)
            }),
        });
        self.read_ahead(through);
        if !self.finish_apply().await? {
            self.loaded = false;
            return Ok(Phase::Sync);
        }
        self.start_redis();
        Ok(Phase::Run)
    }

    /// Waits for the batch being added to the mirror, if any, then queues what it added for
    /// Redis and publishes the applied seq. `Ok(false)` when the mirror refused a delta (it
    /// must be reloaded). Cancel-safe: the batch stays in `applying` until it has finished.
    async fn finish_apply(&mut self) -> Result<bool> {
        let Some(a) = self.applying.as_mut() else {
            return Ok(true);
        };
        let applied = (&mut a.task).await;
        let Some(a) = self.applying.take() else {
            return Ok(true);
        };
        let applied = match applied {
            Ok(applied) => applied,
            Err(e) => {
                // A panic may have left the batch half-added: the mirror is no longer the
                // image of `pos`, and retrying from `pos` would add its first half twice.
                self.loaded = false;
                self.shared.ready.store(false, Ordering::Release);
                return Err(Error::Task(e));
            }
        };
        match applied {
            Ok(queued) => self.queue(queued),
            Err(reason) => {
                error!(%reason, "the mirror refused a delta; reloading it from redis");
                return Ok(false);
            }
        }
        Counters::bump(&self.shared.counters.events_applied, a.events);
        // Ready first, then the applied seq: whoever sees every event applied sees reads ready.
        self.pos = self.pos.max(a.through);
        self.set_ready();
        self.set_pos(self.pos);
        metrics::histogram!(APPLY_SECONDS).record(a.started.elapsed().as_secs_f64());
        metrics::histogram!(APPLY_BATCH_EVENTS).record(a.events as f64);
        Ok(true)
    }

    /// Queues what was added to the mirror for Redis.
    ///
    /// While Redis takes writes, the queue is kept however far behind it is: it coalesces per
    /// (epoch, URL), so it never holds more than the mirror does, and writing it is always
    /// less work than rewriting everything. (It used to be dropped past
    /// [`PENDING_MAX_EVENTS`] for a rewrite from the mirror: under a sustained 100 000
    /// events/s, `scripts/bench.sh mixed` saw rewrites of three million URLs that took longer
    /// than the queue they replaced and fell further behind.) Only while Redis fails is the
    /// queue bounded, and dropped for a rewrite once it answers again.
    fn queue(&mut self, queued: Pending) {
        replica::merge(&mut self.pending, queued);
        if self.redis_retry_at.is_none() {
            return;
        }
        let queued_events: u64 = self.pending.values().map(PendingEpoch::events).sum();
        if queued_events > PENDING_MAX_EVENTS {
            warn!(
                events = queued_events,
                "redis is too far behind; it will be rewritten from the mirror instead"
            );
            self.pending.clear();
            self.resync = true;
        }
    }

    /// Whether deltas of `epoch` can be queued (not an epoch collected meanwhile).
    fn redis_applied_ok(&self, epoch: Seq) -> bool {
        epoch >= self.floor
    }

    fn wants_redis(&self) -> bool {
        self.resync || !self.pending.is_empty() || !self.doomed.is_empty()
    }

    /// Starts the next Redis task when none is in flight and something is due.
    fn start_redis(&mut self) {
        if self.inflight.is_some() || !self.wants_redis() || !self.loaded {
            return;
        }
        if self.resync && self.stopping {
            return;
        }
        if self.redis_retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let marker = self
            .instance
            .clone()
            .unwrap_or_else(|| instance_marker(self.master.dataset_id(), &new_incarnation()));
        self.instance = Some(marker.clone());
        let mut store = self.store.clone();
        if self.resync {
            // The snapshot holds every delta queued so far; deltas after it queue again, to be
            // written once the rewrite is done (or dropped if it fails: the next one has them).
            let snapshot = self.mirror_read().snapshot();
            self.pending.clear();
            self.doomed.clear();
            self.resync = false;
            let applied: BTreeMap<Seq, Seq> = snapshot.iter().map(|(e, p)| (*e, p.last)).collect();
            info!(
                epochs = snapshot.len(),
                urls = snapshot.values().map(|p| p.urls.len()).sum::<usize>(),
                "rewriting the speed state in redis from the mirror"
            );
            self.inflight = Some(Inflight::Resync(tokio::spawn(async move {
                let r = replica::resync(&mut store, &marker, &snapshot).await;
                (applied, r)
            })));
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        let doomed = std::mem::take(&mut self.doomed);
        let expected = self.redis_applied.clone();
        self.inflight = Some(Inflight::Write(tokio::spawn(async move {
            let t = Instant::now();
            let mut r = Ok(WriteOutcome::Written);
            for e in &doomed {
                if let Err(err) = store.delete_epoch(*e).await {
                    r = Err(err);
                    break;
                }
            }
            let mut pending = pending;
            if r.is_ok() && !pending.is_empty() {
                let keys = store.keys.clone();
                let built = tokio::task::spawn_blocking(move || {
                    let tx = replica::transaction(&keys, &pending);
                    (pending, tx)
                })
                .await;
                match built {
                    Ok((p, tx)) => {
                        pending = p;
                        r = replica::write(
                            &mut store.conn,
                            &store.keys,
                            &marker,
                            &expected,
                            &pending,
                            &tx,
                        )
                        .await;
                    }
                    Err(e) => {
                        // The pending deltas are lost with the task: rewrite Redis instead.
                        pending = Pending::new();
                        r = Ok(WriteOutcome::Diverged);
                        warn!(error = %e, "building the redis transaction failed");
                    }
                }
            }
            metrics::histogram!(REDIS_WRITE_SECONDS).record(t.elapsed().as_secs_f64());
            (pending, doomed, r)
        })));
    }

    /// Handles the Redis task in flight if it has finished.
    async fn poll_redis(&mut self) {
        let finished_now = match &self.inflight {
            Some(Inflight::Write(h)) => h.is_finished(),
            Some(Inflight::Resync(h)) => h.is_finished(),
            None => false,
        };
        if finished_now {
            let d = finished(&mut self.inflight).await;
            self.redis_done(d);
        }
    }

    fn redis_done(&mut self, d: Done) {
        match d {
            Done::Write((tried, doomed, r)) => self.after_write(tried, doomed, r),
            Done::Resync((applied, r)) => match r {
                Ok(false) => {
                    // Another rewrite claimed Redis after ours: ours stopped; the state there
                    // is not ours. Rewrite again under a new marker.
                    warn!("another rewrite of the speed state claimed redis; rewriting again");
                    self.instance = Some(instance_marker(
                        self.master.dataset_id(),
                        &new_incarnation(),
                    ));
                    self.pending.clear();
                    self.resync = true;
                    self.redis_ok();
                }
                Ok(true) => {
                    self.set_redis_applied(applied);
                    Counters::bump(&self.shared.counters.resyncs, 1);
                    self.redis_ok();
                    info!("speed state in redis rewritten from the mirror");
                }
                Err(e) => {
                    self.pending.clear();
                    self.resync = true;
                    self.redis_failed(&e);
                }
            },
        }
        self.start_redis();
    }

    fn after_write(&mut self, tried: Pending, doomed: BTreeSet<Seq>, r: Result<WriteOutcome>) {
        match r {
            Ok(WriteOutcome::Written) => {
                let events: u64 = tried.values().map(PendingEpoch::events).sum();
                let mut applied = std::mem::take(&mut self.redis_applied);
                for (e, p) in &tried {
                    applied.insert(*e, p.last);
                }
                for e in &doomed {
                    applied.remove(e);
                }
                self.set_redis_applied(applied);
                Counters::bump(&self.shared.counters.applies, 1);
                metrics::histogram!(REDIS_WRITE_EVENTS).record(events as f64);
                self.redis_ok();
            }
            Ok(WriteOutcome::Raced) => {
                self.put_back(tried, doomed);
            }
            Ok(outcome) => {
                warn!(
                    ?outcome,
                    "redis no longer holds the speed state we wrote (restarted, flushed or \
                     changed); rewriting it from the mirror"
                );
                self.instance = Some(instance_marker(
                    self.master.dataset_id(),
                    &new_incarnation(),
                ));
                self.resync = true;
                self.redis_ok();
            }
            Err(e) => {
                self.put_back(tried, doomed);
                self.redis_failed(&e);
            }
        }
    }

    /// Queues a transaction's deltas again (before the ones that came meanwhile).
    fn put_back(&mut self, mut tried: Pending, mut doomed: BTreeSet<Seq>) {
        tried.retain(|e, _| *e >= self.floor);
        replica::merge(&mut tried, std::mem::take(&mut self.pending));
        self.pending = tried;
        doomed.extend(std::mem::take(&mut self.doomed));
        self.doomed = doomed;
    }

    /// Publishes what Redis holds now.
    fn set_redis_applied(&mut self, applied: BTreeMap<Seq, Seq>) {
        let top = applied.values().max().copied().unwrap_or(Seq::ZERO);
        self.redis_applied = applied;
        self.shared.redis_applied.store(top.0, Ordering::Release);
    }

    fn redis_ok(&mut self) {
        self.set_redis_up(true);
        self.redis_retry_at = None;
        self.redis_backoff = BACKOFF_MIN;
    }

    fn redis_failed(&mut self, e: &Error) {
        Counters::bump(&self.shared.counters.errors, 1);
        if matches!(e, Error::Redis(_)) {
            self.set_redis_up(false);
        }
        warn!(error = %e, retry_ms = self.redis_backoff.as_millis() as u64, "speed state not written to redis; retrying");
        self.redis_retry_at = Some(Instant::now() + self.redis_backoff);
        self.redis_backoff = (self.redis_backoff * 2).min(BACKOFF_MAX);
    }

    /// While idle: checks that Redis answers and still holds our marker.
    async fn heartbeat(&mut self) {
        match self.store.instance().await {
            Ok(inst) => {
                self.set_redis_up(true);
                if inst != self.instance && !self.resync {
                    warn!("redis no longer holds the speed state (restarted empty, flushed or replaced); rewriting it from the mirror");
                    self.instance = Some(instance_marker(
                        self.master.dataset_id(),
                        &new_incarnation(),
                    ));
                    self.pending.clear();
                    self.resync = true;
                    self.start_redis();
                }
            }
            Err(e) => {
                Counters::bump(&self.shared.counters.errors, 1);
                self.set_redis_up(false);
                debug!(error = %e, "redis heartbeat failed");
            }
        }
    }

    /// Starts reading the batch after `after` (the batch being applied) from the tail, when
    /// more events are acknowledged and the applier is not rebuilding.
    fn read_ahead(&mut self, after: Seq) {
        if self.rebuild_target.is_some() || *self.acked.borrow() <= after {
            return;
        }
        let (master, shared) = (self.master.clone(), self.shared.clone());
        let (max, floor) = (self.cfg.apply_batch_max.max(1), self.floor);
        let nice = self.cfg.applier_nice;
        self.read_ahead = Some(ReadAhead {
            after,
            task: tokio::task::spawn_blocking(move || {
                let _priority = applier_priority(nice);
                match master.tail_after(after, max) {
                    Tail::Events(v) => take_events(&master, &shared, &v, floor),
                    _ => None,
                }
            }),
        });
    }

    /// The batch read ahead, if it starts where the mirror is now (a batch that failed to
    /// apply, a reload or a rebuild since make it useless) — without the deltas of epochs
    /// collected meanwhile, as a read now would leave them out.
    async fn take_read_ahead(&mut self) -> Option<(Seq, Vec<EpochDelta>)> {
        let r = self.read_ahead.take()?;
        if r.after != self.pos || self.rebuild_target.is_some() {
            return None;
        }
        let (through, mut deltas) = r.task.await.ok()??;
        deltas.retain(|d| d.epoch >= self.floor);
        Some((through, deltas))
    }

    /// The next events after `pos`, aggregated: `(through, deltas)` where every event with
    /// `pos < seq <= through` is in `deltas` (or in a forgotten epoch).
    async fn read_batch(&mut self, acked: Seq) -> Result<(Seq, Vec<EpochDelta>)> {
        // `apply_batch_max` binds only with a backlog, where a larger batch catches up faster
        // (a site's counts are added once per batch) and no per-batch round trip is saved by
        // going smaller (Redis is written behind). Rebuilds read storage in larger chunks.
        let max = self.cfg.apply_batch_max.max(1);
        let floor = self.floor;
        if self.rebuild_target.is_none() {
            if let Tail::Events(v) = self.master.tail_after(self.pos, max) {
                let taken = if v.len() <= INLINE_AGGREGATE_MAX {
                    take_events(&self.master, &self.shared, &v, floor)
                } else {
                    let (master, shared) = (self.master.clone(), self.shared.clone());
                    tokio::task::spawn_blocking(move || take_events(&master, &shared, &v, floor))
                        .await
                        .map_err(Error::Task)?
                };
                if let Some(batch) = taken {
                    return Ok(batch);
                }
            }
        }
        let chunk = max.max(STORAGE_CHUNK);
        let after = self.pos;
        let master = self.master.clone();
        let shared = self.shared.clone();
        let nice = self.cfg.applier_nice;
        let (through, deltas) = tokio::task::spawn_blocking(move || -> Result<_> {
            let _priority = applier_priority(nice);
            let through = master.storage_window(after, chunk)?.min(acked);
            let events = master.read_range(after, through)?;
            file_recent(&shared, &events);
            let epochs = live_epochs(&master, floor);
            Ok((through, aggregate(&events, &epochs)))
        })
        .await
        .map_err(Error::Task)??;
        debug!(
            after = after.0,
            through = through.0,
            "speed applier read from storage"
        );
        Ok((through, deltas))
    }

    /// Collects the epochs that no view which may serve needs: those ending at or before the
    /// retained cutoff (`SpeedLayer::retain_after`), read now — not when the collection was
    /// scheduled — so a discard in between lowers it. Order: the master dataset forgets them
    /// (durably: a restart never lists them again), then the mirror drops them and raises its
    /// coverage floor under its write lock (reads for older cutoffs are refused from then on),
    /// then their Redis keys are deleted (by the next Redis task).
    async fn maybe_gc(&mut self) -> Result<()> {
        if !self.loaded || !self.shared.gc_due.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        Counters::bump(&self.shared.counters.collections, 1);
        let retain = Seq(self.shared.retain_after.load(Ordering::Acquire));
        // Never cut into an epoch: keep the one that contains the first retained seq.
        let starts = self.master.epochs();
        let floor = epoch_of(&starts, retain.next()).unwrap_or(retain.next());
        if floor <= self.floor.max(starts.first().copied().unwrap_or(Seq(1))) {
            return Ok(());
        }
        let master = self.master.clone();
        tokio::task::spawn_blocking(move || master.forget_epochs_before(floor))
            .await
            .map_err(Error::Task)??;
        self.floor = self.floor.max(floor);
        self.mirror_write().collect_before(floor);
        self.pending.retain(|e, _| *e >= floor);
        let gone: Vec<Seq> = self.redis_applied.range(..floor).map(|(e, _)| *e).collect();
        self.doomed.extend(gone);
        match self.store.listed_epochs().await {
            Ok(listed) => self
                .doomed
                .extend(listed.into_iter().filter(|e| *e < floor)),
            Err(e) => debug!(error = %e, "cannot list redis epochs now; deleting what is known"),
        }
        for e in &self.doomed {
            info!(epoch = e.0, "speed epoch collected");
        }
        self.start_redis();
        Ok(())
    }
}

/// Takes events read from the tail (ascending seq): files them into the realtime window and
/// aggregates them by the live epochs from `floor` on — `(through, deltas)`, `None` when
/// there are none.
fn take_events(
    master: &Master,
    shared: &Shared,
    events: &[Arc<SeqEvent>],
    floor: Seq,
) -> Option<(Seq, Vec<EpochDelta>)> {
    let through = events.last()?.seq;
    file_recent(shared, events.iter().map(|e| &**e));
    // Read after the events, so the list holds the epoch of each of them.
    let epochs = live_epochs(master, floor);
    Some((through, aggregate(events.iter().map(|e| &**e), &epochs)))
}

/// Files events into the realtime window ([`crate::recent`]).
fn file_recent<'a>(shared: &Shared, events: impl IntoIterator<Item = &'a SeqEvent>) {
    tally_core::sync::lock(&shared.recent).file(events, tally_core::now_ms());
}

/// Adds `deltas` to the mirror, each in parts of [`APPLY_PART_URLS`] URLs under its own short
/// write lock; returns what to queue for Redis (the deltas whose `queue` flag is set). `Err`
/// when the mirror refused a delta. The caller publishes the applied seq.
fn apply_to_mirror(
    shared: &Shared,
    deltas: &[EpochDelta],
    queue: &[bool],
) -> std::result::Result<Pending, String> {
    let mut queued = Pending::new();
    // The rankings' base, for reading the URLs' batch totals before taking the lock (the
    // mirror reads them itself if the base changed meanwhile).
    let base = tally_core::sync::lock(&shared.base).clone();
    for (d, &q) in deltas.iter().zip(queue) {
        let (urls, precision) = {
            let m = tally_core::sync::read(&shared.mirror);
            (m.prepare(d), m.precision)
        };
        let mut pe = PendingEpoch::default();
        let mut urls = urls.into_iter();
        loop {
            let mut part: Vec<UrlUpdate> = urls.by_ref().take(APPLY_PART_URLS).collect();
            if part.is_empty() {
                break;
            }
            for u in &mut part {
                u.complete(precision, base.as_ref());
            }
            let deltas: Vec<(u32, &UrlDelta)> = part.iter().map(|u| (u.id, u.delta)).collect();
            let (names, direct) = {
                let mut m = tally_core::sync::write(&shared.mirror);
                let held = std::time::Instant::now();
                let names = m.apply_urls(d.epoch, part, base.as_ref());
                drop(m);
                metrics::histogram!(MIRROR_WRITE_SECONDS).record(held.elapsed().as_secs_f64());
                names?
            };
            if q {
                for ((id, ud), (fresh, name, now)) in deltas.into_iter().zip(names) {
                    pe.add(id, &name, fresh, ud, &now);
                }
                for (id, name, fresh, ud) in &direct {
                    pe.add(*id, name, *fresh, ud, &ud.cells);
                }
            }
        }
        let sites: Vec<_> = d.sites.iter().collect();
        for part in sites.chunks(APPLY_PART_URLS) {
            let mut m = tally_core::sync::write(&shared.mirror);
            let held = std::time::Instant::now();
            m.apply_sites(d.epoch, part.iter().copied());
            drop(m);
            metrics::histogram!(MIRROR_WRITE_SECONDS).record(held.elapsed().as_secs_f64());
        }
        #[cfg(test)]
        if shared.panic_next_apply.swap(false, Ordering::AcqRel) {
            panic!("injected: a batch half-added to the mirror");
        }
        tally_core::sync::write(&shared.mirror).set_applied(d.epoch, d.last);
        if q {
            pe.last = d.last;
            replica::merge(&mut queued, Pending::from([(d.epoch, pe)]));
        }
    }
    Ok(queued)
}

/// The mirror of the live epochs `loaded` (ascending; `None`: no state in Redis) whose first
/// epoch starts at `floor`, keeping registers of `precision` for busy URL-days. Refuses state
/// that in-order applies cannot produce.
fn mirror_from(
    floor: Seq,
    precision: u8,
    loaded: Vec<(Seq, Option<LoadedEpoch>)>,
) -> Result<Mirror, String> {
    let mut m = Mirror::empty(floor, precision);
    // Applies go in seq order: an epoch with state means every earlier epoch had its events
    // applied, and each closed epoch holds at least one event.
    if let Some(last_with_state) = loaded.iter().rposition(|(_, s)| s.is_some()) {
        if let Some((e, _)) = loaded[..last_with_state].iter().find(|(_, s)| s.is_none()) {
            return Err(format!(
                "epoch {e} has no state but a later one has (keys lost or evicted?)"
            ));
        }
    }
    let now_cell = tally_core::cell_of(tally_core::now_ms());
    for (start, state) in loaded {
        let Some(state) = state else { continue };
        let e = m.epochs.entry(start).or_default();
        e.applied = state.applied;
        // (URL, direct source key id, counts): linked to the URL's id once every URL is known.
        let mut direct = Vec::new();
        for (id, url, mut counts) in state.urls {
            counts.visitors.densify(precision);
            m.dict
                .insert(id, &url)
                .map_err(|r| format!("epoch {start}: {r}"))?;
            m.dict.seen_in(id, start);
            match tally_core::dims::parse_source_key(&url) {
                Some(("", u)) => {
                    direct.push((u.to_string(), id, counts));
                    continue;
                }
                Some(_) => {
                    e.sources.insert(id, counts);
                    continue;
                }
                None => {}
            }
            // Hours still ahead of the clock, as `Mirror::apply_urls` records them.
            for (h, _) in counts.cells.iter().filter(|(h, _)| *h > now_cell) {
                e.ahead.entry(*h).or_default().insert(id);
            }
            e.urls.insert(id, counts);
        }
        for (url, id, counts) in direct {
            match m.dict.id(&url).filter(|u| e.urls.get(u).is_some()) {
                Some(u) => {
                    e.direct.insert(u, crate::mirror::Direct { id, counts });
                }
                None => {
                    return Err(format!(
                        "epoch {start}: direct views of {url}, not a URL of it"
                    ))
                }
            }
        }
        m.derive_sites(start);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::tests::ev;
    use crate::mirror::UrlCounts;
    use std::collections::{BTreeMap, BTreeSet};

    /// (referrer host, url) → (views, distinct visitors) of the speed layer's sources.
    type Sources = BTreeMap<(String, String), (u64, BTreeSet<u32>)>;

    fn sources_of(m: &Mirror, host: &str) -> Sources {
        let mut out = Sources::new();
        let all = (i64::MIN, i64::MAX);
        let keys = m.sources(host, None, Seq(0), all, true).unwrap();
        let ids: Vec<_> = keys.iter().map(|s| s.key.clone()).collect();
        let visitors = m.source_visitors(&ids, Seq(0), all, 14).unwrap();
        for (s, v) in keys.iter().zip(visitors) {
            let item = out
                .entry((s.referrer().to_string(), s.url().to_string()))
                .or_default();
            item.0 += s.views;
            for v in v.into_values() {
                item.1.extend(v.hashes);
            }
        }
        out.retain(|_, v| v.0 > 0);
        out
    }

    /// A batch that panics half-way into the mirror (counts in, applied seq not) is not
    /// retried onto that mirror: the applier reloads it, and every event counts once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_mid_apply_reloads_the_mirror_instead_of_adding_twice() {
        use tally_core::Event;
        let redis = tally_e2e::TestRedis::start();
        let dir = tempfile::tempdir().unwrap();
        let master = Master::open(tally_master::MasterConfig {
            data_dir: dir.path().to_path_buf(),
            seal_interval: Duration::from_secs(3600),
            seal_max_events: 1000,
            fsync: false,
            tail_capacity: 1000,
        })
        .unwrap();
        let speed = crate::SpeedLayer::start(
            crate::SpeedConfig {
                redis_url: redis.url(),
                key_prefix: "tally:".into(),
                gc_grace: Duration::from_millis(50),
                apply_batch_max: 64,
                applier_nice: 0,
                sketch_precision: 14,
            },
            master.clone(),
        )
        .await;
        let events = |n: usize| -> Vec<Event> {
            (0..n)
                .map(|i| Event {
                    ts: 1_795_000_000_000 + i as i64 * 1000,
                    url: format!("https://a.test/p{}", i % 7),
                    visitor: Some(format!("v{i}")),
                    referrer: None,
                    id: None,
                    received_at: 1_795_000_000_000,
                })
                .collect()
        };
        let caught_up = || speed.available() && speed.applied_seq() == master.acked_seq();
        let total = || {
            speed
                .range_totals(Seq(0), i64::MIN, i64::MAX, None)
                .unwrap()
                .map(|m| m.values().sum::<u64>())
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        master.append(events(40)).await.unwrap();
        while !caught_up() {
            assert!(Instant::now() < deadline, "never caught up");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let loads = speed.stats().loads;
        speed
            .inner
            .shared
            .panic_next_apply
            .store(true, Ordering::Release);
        master.append(events(30)).await.unwrap();
        while !caught_up() || speed.stats().loads == loads {
            assert!(Instant::now() < deadline, "never reloaded after the panic");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!speed.inner.shared.panic_next_apply.load(Ordering::Acquire));
        assert_eq!(total(), Some(70));
        speed.shutdown().await;
    }

    /// Direct views are counted apart only once a URL has referred ones (the first copies the
    /// views before it), in the mirror and in what is queued for Redis: applied in batches of
    /// any size, and reloaded from what Redis would hold, the sources (and the site's counts)
    /// are those of the events.
    #[test]
    fn direct_views_split_off_at_the_first_referred_one_in_the_mirror_and_in_redis() {
        let referrers = [
            None,
            None,
            Some("https://s.test/"),
            Some("https://a.test/o"),
        ];
        let events: Vec<SeqEvent> = (1..=300u64)
            .map(|s| {
                let mut e = ev(
                    s,
                    &format!("https://a.test/p{}", s % 5),
                    ((s * 7919) % 40) as i64 * 900_000,
                );
                // Page 0 is never referred; the others from some point on.
                if s % 5 != 0 && s > 40 * (s % 5) {
                    e.event.referrer = referrers[(s as usize * 31) % 4].map(String::from);
                }
                e.event.visitor = Some(format!("v{}", s % 17));
                e
            })
            .collect();
        let mut model = Sources::new();
        for e in &events {
            let site = tally_core::dims::referrer_site(e.event.referrer.as_deref());
            let site = tally_core::dims::unless_same_site(&e.event.url, &site);
            let item = model
                .entry((site.to_string(), e.event.url.clone()))
                .or_default();
            item.0 += 1;
            item.1.insert(tally_core::sketch::visitor_hash32(
                e.event.visitor.as_deref().unwrap().as_bytes(),
            ));
        }
        // The whole site: views per cell and every visitor.
        let mut site_model: (BTreeMap<i64, u64>, BTreeSet<u32>) = Default::default();
        for e in &events {
            *site_model
                .0
                .entry(e.event.ts.div_euclid(tally_core::CELL_MS))
                .or_default() += 1;
            (site_model.1).insert(tally_core::sketch::visitor_hash32(
                e.event.visitor.as_deref().unwrap().as_bytes(),
            ));
        }
        let site_of = |m: &Mirror| {
            let all = (i64::MIN, i64::MAX);
            let mut sites = m.sites(&["a.test"], Seq(0), all, all, 14).unwrap();
            let site = sites.remove("a.test").unwrap();
            let visitors = site.visitors.into_values().flat_map(|v| v.hashes).collect();
            (site.cells.into_iter().collect::<BTreeMap<_, _>>(), visitors)
        };
        let epochs = [Seq(1), Seq(150)];
        for chunk in [1, 7, 300] {
            let mut m = Mirror::empty(Seq(1), 14);
            let mut redis = Pending::new();
            for part in events.chunks(chunk) {
                for d in aggregate(part, &epochs) {
                    let mut urls = m.prepare(&d);
                    for u in &mut urls {
                        u.complete(14, None);
                    }
                    let deltas: Vec<(u32, UrlDelta)> =
                        urls.iter().map(|u| (u.id, u.delta.clone())).collect();
                    let (names, direct) = m.apply_urls(d.epoch, urls, None).unwrap();
                    m.apply_sites(d.epoch, &d.sites);
                    m.set_applied(d.epoch, d.last);
                    let mut pe = PendingEpoch {
                        last: d.last,
                        ..Default::default()
                    };
                    for ((id, ud), (fresh, name, now)) in deltas.iter().zip(names) {
                        pe.add(*id, &name, fresh, ud, &now);
                    }
                    for (id, name, fresh, ud) in &direct {
                        pe.add(*id, name, *fresh, ud, &ud.cells);
                    }
                    replica::merge(&mut redis, Pending::from([(d.epoch, pe)]));
                }
            }
            assert_eq!(sources_of(&m, "a.test"), model, "batches of {chunk}");
            assert_eq!(site_of(&m), site_model, "site, batches of {chunk}");
            // Page 0 never had a referred view: no second set of counts.
            let p0 = m.dict.id("https://a.test/p0").unwrap();
            assert!(m.epochs.values().all(|e| e.direct.get(&p0).is_none()));
            // What Redis holds, loaded back.
            let loaded = redis
                .into_iter()
                .map(|(e, pe)| {
                    let urls = pe
                        .urls
                        .into_iter()
                        .map(|(id, u)| {
                            let mut c = UrlCounts::default();
                            for (h, n) in u.cells {
                                c.add(h, n);
                            }
                            c.visitors.extend(u.visitors, None);
                            (id, u.url.to_string(), c)
                        })
                        .collect();
                    let state = LoadedEpoch {
                        applied: pe.last,
                        urls,
                    };
                    (e, Some(state))
                })
                .collect();
            let reloaded = mirror_from(Seq(1), 14, loaded).unwrap();
            assert_eq!(sources_of(&reloaded, "a.test"), model, "reloaded, {chunk}");
            assert_eq!(site_of(&reloaded), site_model, "site reloaded, {chunk}");
        }
    }
}
