//! The applier: the one task that writes speed state. It waits for acknowledged events (notified
//! by the master dataset's watch channel), reads them from the in-memory tail (or from storage
//! when the tail no longer has them, and always while rebuilding), pre-aggregates them, applies
//! each epoch's delta with one compare-and-set script, and then updates the mirror.
//!
//! States: `Sync` (check the instance marker and the applied seqs; load the mirror from Redis
//! when it differs) → `Run` (apply); `Rebuild` when Redis lost our state. Any error goes back to
//! `Sync` after a backoff (50 ms doubling to 1 s).

/// Seconds from reading a batch of acknowledged events to having it committed in Redis and the
/// mirror (what ingest-to-visible costs beyond the notification).
const APPLY_SECONDS: &str = "tally_speed_apply_seconds";
/// Events per apply batch.
const APPLY_BATCH_EVENTS: &str = "tally_speed_apply_batch_events";

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tally_core::Seq;
use tally_master::{Master, Tail};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::aggregate::{aggregate, epoch_of, EpochDelta};
use crate::keys::{instance_marker, marker_is_ours, Keys};
use crate::mirror::Mirror;
use crate::store::{ApplyOutcome, LoadedEpoch, Store};
use crate::{Counters, Error, Result, Shared, SpeedConfig};

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// While idle, check Redis (reachable, still holding our state) this often.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Events read per `read_range` call while rebuilding.
const REBUILD_CHUNK: usize = 100_000;
/// Batches larger than this are aggregated off the runtime.
const INLINE_AGGREGATE_MAX: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Sync,
    Rebuild,
    Run,
}

struct Applier {
    cfg: SpeedConfig,
    master: Master,
    shared: Arc<Shared>,
    store: Store,
    acked: watch::Receiver<Seq>,
    /// Our instance marker, as written in `{prefix}instance` (`keys::instance_marker`).
    instance: Option<String>,
    /// The mirror holds what Redis holds (set by a load or a rebuild).
    loaded: bool,
    /// Every event with `seq <= pos` has been applied (or skipped as belonging to a forgotten
    /// epoch).
    pos: Seq,
    /// While rebuilding: reads stay unavailable until `pos` reaches this.
    rebuild_target: Option<Seq>,
    /// Epochs starting before this are garbage.
    floor: Seq,
}

pub(crate) async fn run(
    cfg: SpeedConfig,
    master: Master,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let client = match redis::Client::open(cfg.redis_url.as_str()) {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "speed layer disabled: invalid redis url");
            return;
        }
    };
    let mgr_cfg = ConnectionManagerConfig::new()
        .set_number_of_retries(1)
        .set_min_delay(BACKOFF_MIN)
        .set_max_delay(BACKOFF_MAX)
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    let conn = match ConnectionManager::new_lazy_with_config(client, mgr_cfg) {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "speed layer disabled: cannot create the redis connection manager");
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
                phase = Phase::Sync;
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
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

    fn mirror_write(&self) -> std::sync::RwLockWriteGuard<'_, Mirror> {
        self.shared
            .mirror
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn mirror_applied(&self, epoch: Seq) -> Seq {
        self.shared
            .mirror
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .applied_in(epoch)
    }

    /// Checks that Redis still holds our state; reloads the mirror from Redis when it differs.
    async fn sync(&mut self) -> Result<Phase> {
        let inst = self.store.instance().await?;
        self.shared.redis_up.store(true, Ordering::Release);
        let inst = match inst {
            None => {
                self.shared.ready.store(false, Ordering::Release);
                if self.loaded {
                    warn!("redis no longer holds the speed state (restarted empty?); rebuilding it from the master dataset");
                } else {
                    info!("redis holds no speed state yet; building it from the master dataset");
                }
                return Ok(Phase::Rebuild);
            }
            Some(m) if !marker_is_ours(&m, self.master.dataset_id()) => {
                self.shared.ready.store(false, Ordering::Release);
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
        if self.loaded && self.instance.as_deref() == Some(inst.as_str()) {
            let in_redis = self.store.applied_of(&live).await?;
            let same = live
                .iter()
                .zip(&in_redis)
                .all(|(e, r)| self.mirror_applied(*e) == *r);
            if same {
                self.set_ready();
                return Ok(Phase::Run);
            }
            info!("speed state in redis differs from the mirror; reloading");
        }
        self.load(inst, live).await
    }

    /// Replaces the mirror with what Redis holds for the live epochs and resumes after it.
    /// State that cannot be the result of in-order applies — an epoch missing before one that
    /// has state, a URL id naming two URLs — is rebuilt rather than trusted.
    async fn load(&mut self, inst: String, live: Vec<Seq>) -> Result<Phase> {
        self.shared.ready.store(false, Ordering::Release);
        for e in self.store.listed_epochs().await? {
            if !live.contains(&e) {
                info!(
                    epoch = e.0,
                    "deleting a speed epoch the master dataset no longer lists"
                );
                self.store.delete_epoch(e).await?;
            }
        }
        let mut loaded: Vec<(Seq, Option<LoadedEpoch>)> = Vec::with_capacity(live.len());
        for e in &live {
            loaded.push((*e, self.store.load_epoch(*e).await?));
        }
        let m = match mirror_from(live[0], loaded) {
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
        Counters::bump(&self.shared.counters.loads, 1);
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

    /// Deletes every epoch's keys and reapplies the live epochs from the master dataset.
    async fn rebuild(&mut self) -> Result<Phase> {
        self.shared.ready.store(false, Ordering::Release);
        let live = live_epochs(&self.master, self.floor);
        let mut doomed: BTreeSet<Seq> = self.store.listed_epochs().await?.into_iter().collect();
        doomed.extend(live.iter().copied());
        for e in doomed {
            self.store.delete_epoch(e).await?;
        }
        let marker = instance_marker(self.master.dataset_id(), &new_incarnation());
        self.store.set_instance(&marker).await?;
        *self.mirror_write() = Mirror::empty(live[0]);
        self.instance = Some(marker);
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
        let acked = *self.acked.borrow_and_update();
        if acked <= self.pos {
            self.set_ready();
            tokio::select! {
                r = self.acked.changed() => {
                    if r.is_err() {
                        // The master dataset is closed: nothing more will come.
                        tokio::time::sleep(HEARTBEAT).await;
                    }
                }
                _ = self.shared.gc_wake.notified() => {}
                _ = tokio::time::sleep(HEARTBEAT) => {
                    let inst = self.store.instance().await?;
                    self.shared.redis_up.store(true, Ordering::Release);
                    if inst != self.instance {
                        return Ok(Phase::Sync);
                    }
                }
            }
            return Ok(Phase::Run);
        }
        let started = std::time::Instant::now();
        let (through, deltas) = self.read_batch(acked).await?;
        let instance = self.instance.clone().unwrap_or_default();
        let events: u64 = deltas.iter().map(EpochDelta::events).sum();
        debug!(
            after = self.pos.0,
            through = through.0,
            events,
            "speed applier batch"
        );
        for d in deltas {
            let (expected, ids) = {
                let m = self.shared.mirror.read().unwrap_or_else(|p| p.into_inner());
                (m.applied_in(d.epoch), m.assign_ids(&d))
            };
            match self.store.apply(&instance, expected, &d, &ids).await? {
                ApplyOutcome::Applied => {}
                // An earlier attempt of this very batch committed but its reply was lost.
                ApplyOutcome::Mismatch(cur) if cur == d.last => {
                    info!(
                        epoch = d.epoch.0,
                        applied_seq = cur.0,
                        "apply had committed before; not applying again"
                    );
                }
                ApplyOutcome::Mismatch(cur) => {
                    warn!(
                        epoch = d.epoch.0,
                        expected = expected.0,
                        in_redis = cur.0,
                        "speed applied seq mismatch; resyncing"
                    );
                    return Ok(Phase::Sync);
                }
                ApplyOutcome::InstanceLost => {
                    warn!("redis lost the speed state; resyncing");
                    return Ok(Phase::Sync);
                }
                ApplyOutcome::IdConflict(id) => {
                    error!(
                        epoch = d.epoch.0,
                        id, "redis maps a URL id to another URL than the mirror; reloading"
                    );
                    self.loaded = false;
                    return Ok(Phase::Sync);
                }
            }
            let applied = self.mirror_write().apply(&d, &ids);
            if let Err(reason) = applied {
                error!(%reason, "the mirror refused a committed apply; reloading it from redis");
                self.loaded = false;
                return Ok(Phase::Sync);
            }
            self.set_pos(d.last);
            Counters::bump(&self.shared.counters.applies, 1);
            Counters::bump(&self.shared.counters.events_applied, d.events());
        }
        self.shared.redis_up.store(true, Ordering::Release);
        self.set_pos(self.pos.max(through));
        self.set_ready();
        metrics::histogram!(APPLY_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(APPLY_BATCH_EVENTS).record(events as f64);
        Ok(Phase::Run)
    }

    /// The next events after `pos`, aggregated: `(through, deltas)` where every event with
    /// `pos < seq <= through` is in `deltas` (or in a forgotten epoch).
    async fn read_batch(&mut self, acked: Seq) -> Result<(Seq, Vec<EpochDelta>)> {
        // With a backlog (a burst of batched ingest), catch up in batches as large as a
        // rebuild's: each batch costs one script whose fixed part grows with the URLs it touches,
        // not with its events. Measured with 1000-event bodies at ~1M events/s: 20 000-event
        // batches fell further and further behind (past the tail, onto storage reads); 100 000
        // kept up. Without a backlog batches stay small, so ingest-to-visible latency is unchanged.
        let backlog = acked.0.saturating_sub(self.pos.0);
        let configured = self.cfg.apply_batch_max.max(1);
        let max = if backlog > configured as u64 {
            configured.max(REBUILD_CHUNK)
        } else {
            configured
        };
        let floor = self.floor;
        if self.rebuild_target.is_none() {
            if let Tail::Events(v) = self.master.tail_after(self.pos, max) {
                if let Some(last) = v.last() {
                    let through = last.seq;
                    // Read after the events, so the list holds the epoch of each of them.
                    let epochs = live_epochs(&self.master, floor);
                    let deltas = if v.len() <= INLINE_AGGREGATE_MAX {
                        aggregate(v.iter().map(|e| &**e), &epochs)
                    } else {
                        tokio::task::spawn_blocking(move || {
                            aggregate(v.iter().map(|e| &**e), &epochs)
                        })
                        .await
                        .map_err(|e| Error::Task(e.to_string()))?
                    };
                    return Ok((through, deltas));
                }
            }
        }
        let chunk = if self.rebuild_target.is_some() {
            max.max(REBUILD_CHUNK)
        } else {
            max
        };
        let after = self.pos;
        let through = Seq(acked.0.min(after.0.saturating_add(chunk as u64)));
        let master = self.master.clone();
        let deltas = tokio::task::spawn_blocking(move || -> Result<Vec<EpochDelta>> {
            let events = master.read_range(after, through)?;
            let epochs = live_epochs(&master, floor);
            Ok(aggregate(&events, &epochs))
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
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
    /// then Redis deletes their keys.
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
            .map_err(|e| Error::Task(e.to_string()))??;
        self.floor = self.floor.max(floor);
        self.mirror_write().collect_before(floor);
        let doomed: Vec<Seq> = self
            .store
            .listed_epochs()
            .await?
            .into_iter()
            .filter(|e| *e < floor)
            .collect();
        for e in doomed {
            self.store.delete_epoch(e).await?;
            info!(epoch = e.0, "speed epoch deleted");
        }
        Ok(())
    }
}

/// The mirror of the live epochs `loaded` (ascending; `None`: no state in Redis) whose first
/// epoch starts at `floor`. Refuses state that in-order applies cannot produce.
fn mirror_from(floor: Seq, loaded: Vec<(Seq, Option<LoadedEpoch>)>) -> Result<Mirror, String> {
    let mut m = Mirror::empty(floor);
    // Applies go in seq order: an epoch with state means every earlier epoch had its events
    // applied, and each closed epoch holds at least one event.
    if let Some(last_with_state) = loaded.iter().rposition(|(_, s)| s.is_some()) {
        if let Some((e, _)) = loaded[..last_with_state].iter().find(|(_, s)| s.is_none()) {
            return Err(format!(
                "epoch {e} has no state but a later one has (keys lost or evicted?)"
            ));
        }
    }
    for (start, state) in loaded {
        let Some(state) = state else { continue };
        let e = m.epochs.entry(start).or_default();
        e.applied = state.applied;
        for (id, url, counts) in state.urls {
            m.dict
                .insert(id, &url)
                .map_err(|r| format!("epoch {start}: {r}"))?;
            e.urls.insert(id, counts);
        }
    }
    Ok(m)
}
