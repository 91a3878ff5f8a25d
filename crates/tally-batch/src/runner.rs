//! Batch run orchestration: one run at a time, shared by the server (scheduler, admin API) and
//! the CLI.
//!
//! A run: `cutoff = master.cut_epoch()`, `master.seal()` (every `seq <= cutoff` is then in a
//! sealed file), `master.snapshot()`, the kernel on `spawn_blocking` (reusing the cached
//! partial aggregates of files earlier runs read, unless the run is full), `store.write`,
//! `store.set_current`, `store.gc`, and the partials no master file uses any more deleted. The caller then loads the new version
//! (`ViewStore::load`) and swaps it in. Every run leaves an entry in
//! `views/batch/history.json` (newest first, capped).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tally_core::Seq;
use tally_master::Master;
use thiserror::Error;

use crate::error::Error;
use crate::kernel::{self, ComputeStats, Progress, ProgressSnapshot};
use crate::partials::PartialCache;
use crate::store::ViewStore;

pub const HISTORY_FILE: &str = "history.json";

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Good versions kept by gc after each run (`batch.keep_versions`, default 5).
    pub keep_versions: usize,
    /// Retries after a failed attempt in [`BatchRunner::run_with_retries`].
    pub max_retries: u32,
    /// `Some(p)`: compute visitor sketches of precision `p`; `None`: no sketches.
    pub sketch_precision: Option<u8>,
    /// First retry delay; doubles per attempt up to `max_backoff`.
    pub retry_backoff: Duration,
    pub max_backoff: Duration,
    /// Entries kept in `history.json`.
    pub history_cap: usize,
    /// Where the cached partial aggregates of master files live; `None`: `partials/` next to
    /// the view store's directory (`data_dir/views/partials`).
    pub partials_dir: Option<PathBuf>,
    /// `batch.partials`: keep and reuse them. `false`: every run is full and writes none (and
    /// deletes those an earlier run left).
    pub reuse_partials: bool,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            keep_versions: 5,
            max_retries: 3,
            sketch_precision: Some(14),
            retry_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            history_cap: 100,
            partials_dir: None,
            reuse_partials: true,
        }
    }
}

/// Who asked for a run (logged and kept in history).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    Schedule,
    Admin,
    Cli,
    Discard,
    Startup,
    Recovery,
    /// Cluster mode: a cut marker another node's run published; this node computes its own view
    /// to that cut (`BatchRunner::run_at`).
    Log,
}

impl Trigger {
    /// Whether a run for this reason ignores every cached partial: a rerun after a discard or
    /// a recovery must not reuse what the bad view may have been built from.
    pub fn forces_full(self) -> bool {
        matches!(self, Trigger::Discard | Trigger::Recovery)
    }
}

/// Time per stage of a run, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StageTimings {
    /// `cut_epoch` + `seal` + `snapshot`.
    pub prepare_ms: f64,
    /// Whole kernel (wall).
    pub compute_ms: f64,
    /// Kernel details: read+decode and aggregation (CPU over threads), scan and merge (wall).
    pub kernel: ComputeStats,
    /// Writing the view files and manifest (wall).
    pub write_ms: f64,
    /// `set_current` + gc.
    pub publish_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunOutcome {
    pub run_id: String,
    pub version: String,
    pub cutoff_seq: Seq,
    pub events: u64,
    pub urls: u64,
    pub duration_ms: u64,
    pub files: usize,
    /// Master files whose cached partial aggregates were merged without reading the file.
    pub files_reused: usize,
    /// Master files read (every file on a full run).
    pub files_computed: usize,
    /// Whether the run ignored every cached partial.
    pub full: bool,
    pub timings: StageTimings,
}

#[derive(Debug, Error)]
pub enum RunError {
    /// Another run is going (HTTP 409 with its `run_id`).
    #[error("a batch run is already going: {run_id}")]
    AlreadyRunning { run_id: String },
    /// Cluster mode: another node holds the batch lease for its run (HTTP 409).
    #[error("node {node} is running batch run {run_id} (it holds the batch lease)")]
    HeldElsewhere { node: String, run_id: String },
    /// Cluster mode: whether another node is running cannot be known now (HTTP 503).
    #[error("cannot take the batch lease now: {0}")]
    Unavailable(String),
    #[error("batch run {run_id} failed: {source}")]
    Failed {
        run_id: String,
        #[source]
        source: Error,
    },
}

/// The run going now.
#[derive(Debug, Clone)]
pub struct RunningInfo {
    pub run_id: String,
    pub trigger: Trigger,
    /// Whether this run ignores every cached partial.
    pub full: bool,
    pub started_at_ms: i64,
    pub progress: Arc<Progress>,
    /// The cutoff this run computes to when it was given one ([`BatchRunner::run_at`]) instead
    /// of cutting the epoch itself.
    pub given_cut: Option<Seq>,
}

impl RunningInfo {
    pub fn progress(&self) -> ProgressSnapshot {
        self.progress.snapshot()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Ok,
    Failed,
    Discarded,
}

/// One line of `GET /v1/admin/batch` `history` (times are RFC 3339, UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub run_id: String,
    pub started_at: String,
    pub finished_at: String,
    pub status: RunStatus,
    pub version: Option<String>,
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<Trigger>,
    /// Files whose cached partials a successful run reused, and files it read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_reused: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_computed: Option<usize>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full: bool,
}

/// A run started in the background by [`BatchRunner::start`].
#[derive(Debug)]
pub struct StartedRun {
    pub run_id: String,
    pub handle: tokio::task::JoinHandle<Result<RunOutcome, RunError>>,
}

/// Where a run's cutoff comes from. One node: the WAL writer cuts at the last `seq` it gave
/// ([`Master::cut_epoch`]). Cluster mode: a cut marker published to the log, whose position is
/// the cutoff every node sees (tally-log).
pub trait EpochCut: Send + Sync {
    /// Cuts the open epoch and returns the cutoff `C`: every event at or below it is in the
    /// master dataset's WAL or files when this returns, and none above it ever will be.
    fn cut<'a>(
        &'a self,
        master: &'a Master,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = crate::Result<Seq>> + Send + 'a>>;

    /// Admits run `run_id`, which will cut, before it starts: one node admits every run; in
    /// cluster mode, the node that takes the batch lease ([`RunError::HeldElsewhere`]
    /// elsewhere). The run holds what this returns until it ends.
    fn admit<'a>(
        &'a self,
        run_id: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Admission, RunError>> + Send + 'a>>
    {
        let _ = run_id;
        Box::pin(async { Ok(Box::new(()) as Admission) })
    }
}

/// What admits a run (a lease in cluster mode), held until the run ends.
pub type Admission = Box<dyn std::any::Any + Send + Sync>;

/// The single node's cut: the WAL writer's.
struct WalCut;

impl EpochCut for WalCut {
    fn cut<'a>(
        &'a self,
        master: &'a Master,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = crate::Result<Seq>> + Send + 'a>> {
        Box::pin(async move { Ok(master.cut_epoch().await?) })
    }
}

struct Inner {
    store: ViewStore,
    master: Master,
    cut: Box<dyn EpochCut>,
    cfg: RunnerConfig,
    running: Mutex<Option<RunningInfo>>,
    history: Mutex<Vec<HistoryEntry>>,
    counter: AtomicU64,
    /// The cutoff of the last view a run of this process made `CURRENT`.
    published: AtomicU64,
    /// A view was discarded since the last full run: the next run is full, whatever started
    /// it (in cluster mode the replacement may come from a run to another node's cut).
    full_due: std::sync::atomic::AtomicBool,
}

/// Runs the batch layer, one run at a time. Cheap to clone.
#[derive(Clone)]
pub struct BatchRunner {
    inner: Arc<Inner>,
}

/// Frees the running slot when a run ends, also if its future is dropped.
struct SlotGuard {
    inner: Arc<Inner>,
    run_id: String,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut r = tally_core::sync::lock(&self.inner.running);
        if r.as_ref().is_some_and(|i| i.run_id == self.run_id) {
            *r = None;
        }
    }
}

impl BatchRunner {
    /// A runner over `store` and `master`. Loads the persisted history (an unreadable history
    /// is logged and started afresh).
    pub fn new(store: ViewStore, master: Master, cfg: RunnerConfig) -> BatchRunner {
        Self::with_cut(store, master, cfg, Box::new(WalCut))
    }

    /// A runner whose runs take their cutoff from `cut` (cluster mode: a marker in the log).
    pub fn with_cut(
        store: ViewStore,
        master: Master,
        cfg: RunnerConfig,
        cut: Box<dyn EpochCut>,
    ) -> BatchRunner {
        let history = load_history(&store.root().join(HISTORY_FILE));
        BatchRunner {
            inner: Arc::new(Inner {
                store,
                master,
                cut,
                cfg,
                running: Mutex::new(None),
                history: Mutex::new(history),
                counter: AtomicU64::new(0),
                published: AtomicU64::new(0),
                full_due: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    pub fn store(&self) -> &ViewStore {
        &self.inner.store
    }

    pub fn config(&self) -> &RunnerConfig {
        &self.inner.cfg
    }

    /// Where the cached partial aggregates of master files live.
    pub fn partials_dir(&self) -> PathBuf {
        match &self.inner.cfg.partials_dir {
            Some(d) => d.clone(),
            None => self.inner.store.root().with_file_name("partials"),
        }
    }

    /// The run going now, if any.
    pub fn running(&self) -> Option<RunningInfo> {
        tally_core::sync::lock(&self.inner.running).clone()
    }

    /// The cutoff of the last view a run of this process made `CURRENT` (`Seq(0)` before the
    /// first): known as soon as the run ends, before anyone swaps the view in.
    pub fn published_cutoff(&self) -> Seq {
        Seq(self.inner.published.load(Ordering::SeqCst))
    }

    /// Waits while a run is going (whoever started it); whether it waited.
    pub async fn wait_idle(&self) -> bool {
        let mut waited = false;
        while self.running().is_some() {
            waited = true;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        waited
    }

    /// Run history, newest first.
    pub fn history(&self) -> Vec<HistoryEntry> {
        tally_core::sync::lock(&self.inner.history).clone()
    }

    fn claim(
        &self,
        trigger: Trigger,
        full: bool,
        given_cut: Option<Seq>,
    ) -> Result<(SlotGuard, RunningInfo), RunError> {
        let mut r = tally_core::sync::lock(&self.inner.running);
        if let Some(cur) = r.as_ref() {
            return Err(RunError::AlreadyRunning {
                run_id: cur.run_id.clone(),
            });
        }
        let now = tally_core::now_ms();
        let n = self.inner.counter.fetch_add(1, Ordering::Relaxed);
        let info = RunningInfo {
            run_id: format!("run-{now:013}-{n}"),
            trigger,
            full: full
                || trigger.forces_full()
                || !self.inner.cfg.reuse_partials
                || self.inner.full_due.load(Ordering::SeqCst),
            started_at_ms: now,
            progress: Arc::new(Progress::new()),
            given_cut,
        };
        *r = Some(info.clone());
        Ok((
            SlotGuard {
                inner: self.inner.clone(),
                run_id: info.run_id.clone(),
            },
            info,
        ))
    }

    /// Runs the batch layer now and waits for the new version to be `CURRENT`.
    /// `Err(AlreadyRunning)` at once if a run is going. Incremental unless the trigger
    /// [forces a full run](Trigger::forces_full).
    pub async fn run(&self, trigger: Trigger) -> Result<RunOutcome, RunError> {
        self.run_with(trigger, false).await
    }

    /// [`run`](Self::run); `full`: ignore every cached partial and read every master file
    /// (`tally batch run --full`). Same result, the cure for a damaged cache.
    pub async fn run_with(&self, trigger: Trigger, full: bool) -> Result<RunOutcome, RunError> {
        let (guard, info) = self.claim(trigger, full, None)?;
        let admission = self.inner.cut.admit(&info.run_id).await?;
        let r = self.execute(&info).await;
        drop(admission);
        drop(guard);
        r
    }

    /// Computes a view to `cutoff`, an epoch cut this node's master dataset already has (cluster
    /// mode: a marker another node's run published, which this node has followed), without
    /// cutting or asking for admission.
    pub async fn run_at(&self, trigger: Trigger, cutoff: Seq) -> Result<RunOutcome, RunError> {
        let (guard, info) = self.claim(trigger, false, Some(cutoff))?;
        let r = self.execute(&info).await;
        drop(guard);
        r
    }

    /// Starts a run in the background and returns its id once it is admitted
    /// (`POST /v1/admin/batch`); `Err(AlreadyRunning)` if a run is going here,
    /// `Err(HeldElsewhere)` if on another node. Await `handle` for the outcome.
    pub async fn start(&self, trigger: Trigger) -> Result<StartedRun, RunError> {
        self.start_with(trigger, false).await
    }

    /// [`start`](Self::start); `full` as in [`run_with`](Self::run_with).
    pub async fn start_with(&self, trigger: Trigger, full: bool) -> Result<StartedRun, RunError> {
        let (guard, info) = self.claim(trigger, full, None)?;
        let admission = self.inner.cut.admit(&info.run_id).await?;
        let this = self.clone();
        let run_id = info.run_id.clone();
        let handle = tokio::spawn(async move {
            let r = this.execute(&info).await;
            drop(admission);
            drop(guard);
            r
        });
        Ok(StartedRun { run_id, handle })
    }

    /// [`run`](Self::run), retried with exponential backoff up to `max_retries` times after a
    /// failure (each failed attempt is its own history entry). Returns the last result; gives up
    /// at once on `AlreadyRunning`.
    pub async fn run_with_retries(&self, trigger: Trigger) -> Result<RunOutcome, RunError> {
        let mut delay = self.inner.cfg.retry_backoff;
        let mut attempt = 0u32;
        loop {
            match self.run(trigger).await {
                Ok(o) => return Ok(o),
                Err(e @ (RunError::AlreadyRunning { .. } | RunError::HeldElsewhere { .. })) => {
                    return Err(e)
                }
                Err(e) if attempt >= self.inner.cfg.max_retries => return Err(e),
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, delay_ms = delay.as_millis() as u64, "batch run failed, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.inner.cfg.max_backoff);
                }
            }
        }
    }

    async fn execute(&self, info: &RunningInfo) -> Result<RunOutcome, RunError> {
        let run_id = info.run_id.clone();
        tracing::info!(run_id = %run_id, trigger = ?info.trigger, "batch run started");
        let r = self.stages(info).await;
        let finished = tally_core::now_ms();
        let entry = HistoryEntry {
            run_id: run_id.clone(),
            started_at: tally_core::format_rfc3339(info.started_at_ms),
            finished_at: tally_core::format_rfc3339(finished),
            status: if r.is_ok() {
                RunStatus::Ok
            } else {
                RunStatus::Failed
            },
            version: r.as_ref().ok().map(|o| o.version.clone()),
            error: r.as_ref().err().map(|e| e.to_string()),
            trigger: Some(info.trigger),
            files_reused: r.as_ref().ok().map(|o| o.files_reused),
            files_computed: r.as_ref().ok().map(|o| o.files_computed),
            full: info.full,
        };
        self.record(entry).await;
        match r {
            Ok(o) => {
                tracing::info!(
                    run_id = %run_id, version = %o.version, cutoff_seq = o.cutoff_seq.get(),
                    events = o.events, urls = o.urls, duration_ms = o.duration_ms,
                    files_reused = o.files_reused, files_computed = o.files_computed, full = o.full,
                    prepare_ms = o.timings.prepare_ms, compute_ms = o.timings.compute_ms,
                    read_decode_cpu_ms = o.timings.kernel.read_decode_cpu_ms,
                    aggregate_cpu_ms = o.timings.kernel.aggregate_cpu_ms,
                    merge_ms = o.timings.kernel.merge_wall_ms, write_ms = o.timings.write_ms,
                    "batch run finished"
                );
                Ok(o)
            }
            Err(source) => {
                tracing::error!(run_id = %run_id, error = %source, "batch run failed");
                Err(RunError::Failed { run_id, source })
            }
        }
    }

    async fn stages(&self, info: &RunningInfo) -> Result<RunOutcome, Error> {
        let t0 = Instant::now();
        let master = &self.inner.master;
        let cutoff = match info.given_cut {
            Some(c) => c,
            None => self.inner.cut.cut(master).await?,
        };
        let sealed = master.seal().await?;
        if sealed < cutoff {
            return Err(Error::Snapshot(format!(
                "sealed through {sealed}, below the cutoff {cutoff}"
            )));
        }
        // Compaction deletes no master file while the run reads them.
        let pin = master.pin_files().await;
        let m = master.clone();
        let files = blocking(move || m.snapshot().map_err(Error::from)).await?;
        let prepare_ms = t0.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(run_id = %info.run_id, cutoff_seq = cutoff.get(), files = files.len(), "batch snapshot taken");

        let t1 = Instant::now();
        let progress = info.progress.clone();
        let precision = self.inner.cfg.sketch_precision;
        let nfiles = files.iter().filter(|f| f.first <= cutoff).count();
        let partials_dir = self.partials_dir();
        let full = info.full;
        let reuse = self.inner.cfg.reuse_partials;
        let (data, cache) = blocking(move || {
            // Without partials the cache only serves to delete what an earlier run left.
            let cache = PartialCache::open(&partials_dir, full)?;
            let used = reuse.then_some(&cache);
            let mut data = kernel::compute_cached(&files, cutoff, precision, &progress, used)?;
            let t = Instant::now();
            let sources = kernel::compute_sources_cached(
                &files,
                cutoff,
                precision,
                &kernel::Progress::new(),
                used,
            )?;
            tracing::debug!(
                keys = sources.urls.len(),
                cells = sources.cells(),
                ms = t.elapsed().as_millis() as u64,
                "batch sources computed"
            );
            data.sources = Some(Box::new(sources));
            Ok((data, cache))
        })
        .await?;
        drop(pin);
        let compute_ms = t1.elapsed().as_secs_f64() * 1000.0;

        let t2 = Instant::now();
        let store = self.inner.store.clone();
        let (info_v, data) = blocking(move || {
            let v = store.write(&data, cutoff, tally_core::now_ms())?;
            Ok((v, data))
        })
        .await?;
        let write_ms = t2.elapsed().as_secs_f64() * 1000.0;

        let t3 = Instant::now();
        let store = self.inner.store.clone();
        let version = info_v.version.clone();
        let keep = self.inner.cfg.keep_versions.max(1);
        blocking(move || {
            store.set_current(&version)?;
            if let Err(e) = store.gc(keep) {
                tracing::warn!(error = %e, "batch view gc failed");
            }
            match cache.retain_used() {
                Ok(n) if n > 0 => tracing::info!(deleted = n, "unused partials deleted"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot delete unused partials"),
            }
            Ok(())
        })
        .await?;
        let publish_ms = t3.elapsed().as_secs_f64() * 1000.0;
        self.inner
            .published
            .fetch_max(cutoff.get(), Ordering::SeqCst);
        if info.full {
            self.inner.full_due.store(false, Ordering::SeqCst);
        }

        // A file is read when either keying had no partial for it.
        let read: std::collections::BTreeSet<Seq> = (data.stats.computed_files.iter())
            .chain(data.sources.iter().flat_map(|s| &s.stats.computed_files))
            .copied()
            .collect();
        let files_computed = read.len();
        Ok(RunOutcome {
            run_id: info.run_id.clone(),
            files_reused: nfiles - files_computed.min(nfiles),
            files_computed,
            full: info.full,
            version: info_v.version,
            cutoff_seq: cutoff,
            events: data.events,
            urls: data.urls.len() as u64,
            duration_ms: t0.elapsed().as_millis() as u64,
            files: nfiles,
            timings: StageTimings {
                prepare_ms,
                compute_ms,
                kernel: data.stats.clone(),
                write_ms,
                publish_ms,
            },
        })
    }

    /// Declares `version` bad: marks it discarded (files kept), moves `CURRENT` back to the
    /// newest earlier good version if it was current, and records a `discarded` history entry.
    /// Returns the version `CURRENT` names afterwards. The caller reruns the batch layer.
    pub async fn discard_version(
        &self,
        version: &str,
        reason: &str,
    ) -> Result<Option<String>, Error> {
        let store = self.inner.store.clone();
        let (v, why) = (version.to_string(), reason.to_string());
        let now_current = blocking(move || store.discard(&v, &why)).await?;
        // Whatever run replaces it must not reuse what the bad view may have been built from.
        self.inner.full_due.store(true, Ordering::SeqCst);
        let now = tally_core::format_rfc3339(tally_core::now_ms());
        let n = self.inner.counter.fetch_add(1, Ordering::Relaxed);
        self.record(HistoryEntry {
            run_id: format!("discard-{:013}-{n}", tally_core::now_ms()),
            started_at: now.clone(),
            finished_at: now,
            status: RunStatus::Discarded,
            version: Some(version.to_string()),
            error: Some(reason.to_string()),
            trigger: None,
            files_reused: None,
            files_computed: None,
            full: false,
        })
        .await;
        Ok(now_current)
    }

    /// Discards the current version (see [`discard_version`](Self::discard_version)). Returns
    /// `(discarded, now_current)`; `Ok(None)` when there is no current version.
    pub async fn discard_current(
        &self,
        reason: &str,
    ) -> Result<Option<(String, Option<String>)>, Error> {
        let Some(cur) = self.inner.store.current()? else {
            return Ok(None);
        };
        let now = self.discard_version(&cur, reason).await?;
        Ok(Some((cur, now)))
    }

    async fn record(&self, entry: HistoryEntry) {
        let snapshot = {
            let mut h = tally_core::sync::lock(&self.inner.history);
            h.insert(0, entry);
            h.truncate(self.inner.cfg.history_cap.max(1));
            h.clone()
        };
        let path = self.inner.store.root().join(HISTORY_FILE);
        let r = blocking(move || save_history(&path, &snapshot)).await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot persist batch history");
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}

fn load_history(path: &PathBuf) -> Vec<HistoryEntry> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "batch history is unreadable, starting afresh");
            Vec::new()
        }),
        Err(_) => Vec::new(),
    }
}

fn save_history(path: &std::path::Path, h: &[HistoryEntry]) -> Result<(), Error> {
    use std::io::Write;
    let dir = path.parent().expect("history has a parent");
    let mut tmp = tempfile::NamedTempFile::with_prefix_in(".tmp-history-", dir)
        .map_err(|e| Error::io(dir, e))?;
    let bytes = serde_json::to_vec_pretty(h).map_err(|e| Error::Internal(e.to_string()))?;
    tmp.write_all(&bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}
