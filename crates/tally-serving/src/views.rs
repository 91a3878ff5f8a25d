//! The one owner of the serving batch view's lifecycle: which version serves, loading and
//! verifying it, discarding it, falling back, telling the speed layer what to keep, and rerunning
//! the batch layer until an exact view serves again.
//!
//! - **Which version serves.** `views/batch/CURRENT` names it. A `CURRENT` that is missing,
//!   empty, or names a version that is not good (missing, discarded, no valid manifest) is
//!   replaced by the newest good version — never "no view", which would answer speed-only
//!   counts — and rewritten so. The watcher calls [`ViewManager::refresh`] every second, so a
//!   `CURRENT` changed, deleted or garbled on disk is noticed.
//! - **Only corruption discards.** A version that fails verification or decoding
//!   ([`tally_batch::ErrorKind::Corrupt`]) is discarded (kept on disk, marked, in the history)
//!   and the next good one is tried; a transient failure (`EIO`, `EMFILE`) keeps the serving view
//!   and is retried by the next refresh.
//! - **Discard names the serving version** (or the one the caller names), never whatever
//!   `CURRENT` says at that instant: between a run's publish and its swap those differ.
//! - **What the speed layer keeps.** After every change the manager tells the speed layer the
//!   smallest cutoff among the serving view and the `fallback_views` good views before it
//!   ([`SpeedLayer::retain_after`]): their epochs stay, so a discard falls back exactly. A view
//!   further back can still be served after more discards, but its epochs may be gone: reads then
//!   answer 503 ([`tally_speed::NotCovered`]), never a short count.
//! - **Recovery.** Whenever a version was discarded, or the serving view is not exact (its
//!   epochs were collected), a recovery loop reruns the batch layer — waiting for a run already
//!   going, retrying failures with backoff — until a newer view serves exactly.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use tally_batch::store::parse_version;
use tally_batch::{
    BatchRunner, BatchView, ErrorKind, RunError, StartedRun, Trigger, ViewStatus, ViewStore,
};
use tally_core::Seq;
use tally_speed::SpeedLayer;

/// Why a discard was refused.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    #[error("There is no batch view version {0:?}.")]
    NoSuchVersion(String),
    #[error("Batch view version {0} is already discarded.")]
    AlreadyDiscarded(String),
    #[error("cannot discard the batch view: {0}")]
    Store(#[from] tally_batch::Error),
}

/// What a discard did.
#[derive(Debug)]
pub struct Discarded {
    /// The version marked discarded (`None`: no view was serving and none was named).
    pub version: Option<String>,
    /// The version serving afterwards.
    pub serving: Option<String>,
    /// The rerun started for it (`Err`: a run was already going; it publishes the new view).
    pub rerun: Result<StartedRun, RunError>,
}

pub struct ViewManager {
    runner: BatchRunner,
    speed: SpeedLayer,
    current: ArcSwapOption<BatchView>,
    /// Good views before the serving one whose speed epochs are kept (`speed.fallback_views`).
    fallback_views: usize,
    /// Serialises every change of the serving view (refreshes, discards).
    lifecycle: tokio::sync::Mutex<()>,
    /// While set, a recovery loop runs until a view newer than this version serves exactly.
    recovering: Mutex<Option<String>>,
    /// The version `CURRENT` names while it is not good and no good one exists (warned once,
    /// not at every refresh of the watcher).
    stuck_current: Mutex<Option<String>>,
}

/// How many times one refresh follows `CURRENT` past corrupt versions before giving up.
const MAX_FALLBACKS_PER_REFRESH: usize = 64;

impl ViewManager {
    pub fn new(runner: BatchRunner, speed: SpeedLayer, fallback_views: usize) -> ViewManager {
        ViewManager {
            runner,
            speed,
            current: ArcSwapOption::empty(),
            stuck_current: Mutex::new(None),
            fallback_views,
            lifecycle: tokio::sync::Mutex::new(()),
            recovering: Mutex::new(None),
        }
    }

    pub fn store(&self) -> &ViewStore {
        self.runner.store()
    }

    /// The serving view.
    pub fn current(&self) -> Option<Arc<BatchView>> {
        self.current.load_full()
    }

    /// Cutoff of the serving view, `Seq(0)` without one: the speed layer covers what is after.
    pub fn cutoff(view: Option<&Arc<BatchView>>) -> Seq {
        view.map_or(Seq::ZERO, |v| v.cutoff_seq)
    }

    /// Whether a recovery rerun is going (a view was discarded or the serving one is not exact).
    pub fn recovering(&self) -> bool {
        tally_core::sync::lock(&self.recovering).is_some()
    }

    /// Serves the version `CURRENT` names (or the newest good one), loading and verifying it
    /// when it is not the one serving already. Called at start-up, after every run and every
    /// second by the watcher.
    pub async fn refresh(self: &Arc<Self>) {
        let _one_at_a_time = self.lifecycle.lock().await;
        self.refresh_locked().await;
    }

    /// Warns once each time `CURRENT` becomes stuck on a version that is not good while no good
    /// version exists (until a run publishes one), instead of at every refresh.
    fn warn_stuck(&self, stuck: Option<String>) {
        let mut last = tally_core::sync::lock(&self.stuck_current);
        if *last != stuck {
            if let Some(bad) = &stuck {
                tracing::warn!(named = %bad, "views/batch/CURRENT names a version that is not good and no good version exists");
            }
            *last = stuck;
        }
    }

    async fn refresh_locked(self: &Arc<Self>) {
        for _ in 0..MAX_FALLBACKS_PER_REFRESH {
            let store = self.store().clone();
            let target = match blocking(move || resolve(&store)).await {
                Ok(Resolved {
                    target,
                    bad_current,
                    stuck,
                }) => {
                    self.warn_stuck(stuck);
                    if let Some(bad) = bad_current {
                        // Its manifest fails verification (corrupt, or written by a release
                        // whose format this one does not serve): discard it and rerun, as for
                        // a view whose files fail verification.
                        tracing::error!(version = %bad, "views/batch/CURRENT names a view whose manifest fails verification; discarding it");
                        let reason =
                            "its manifest failed verification (corrupt, or an older format)";
                        match self.runner.discard_version(&bad, reason).await {
                            Ok(_) => self.start_recovery(&bad),
                            Err(e) => {
                                tracing::error!(version = %bad, error = %e, "cannot mark the view discarded");
                            }
                        }
                    }
                    target
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the batch view store; the serving view stays");
                    return;
                }
            };
            let serving = self.current().map(|v| v.version.clone());
            let Some(version) = target else {
                if serving.is_some() {
                    tracing::error!("no good batch view is left on disk; serving none");
                    self.swap(None).await;
                }
                return self.check_exact();
            };
            if serving.as_deref() == Some(version.as_str()) {
                return self.check_exact();
            }
            let store = self.store().clone();
            let v = version.clone();
            match blocking(move || store.load(&v)).await {
                Ok(view) => {
                    self.swap(Some(Arc::new(view))).await;
                    return self.check_exact();
                }
                Err(e) if e.kind() == ErrorKind::Corrupt => {
                    tracing::error!(%version, error = %e, "batch view failed verification; discarding it");
                    let reason = format!("failed verification: {e}");
                    if let Err(e) = self.runner.discard_version(&version, &reason).await {
                        tracing::error!(%version, error = %e, "cannot mark the view discarded; the serving view stays");
                        return;
                    }
                    self.start_recovery(&version);
                }
                // Gone or discarded since it was resolved: resolve again.
                Err(e) if e.kind() == ErrorKind::Invalid => {
                    tracing::warn!(%version, error = %e, "batch view vanished while loading it");
                }
                Err(e) => {
                    tracing::error!(%version, error = %e,
                        "cannot load the batch view now (not corruption: it is kept); the serving view stays and the load is retried");
                    return;
                }
            }
        }
        tracing::error!("gave up following CURRENT past corrupt batch views for now");
    }

    /// Declares `version` (default: the serving one) bad: marks it discarded, serves the newest
    /// earlier good view, starts a rerun (returned, so the caller can wait for it) and keeps
    /// rerunning until a newer view serves exactly.
    pub async fn discard(
        self: &Arc<Self>,
        version: Option<String>,
        reason: &str,
    ) -> Result<Discarded, DiscardError> {
        let _one_at_a_time = self.lifecycle.lock().await;
        let serving = self.current().map(|v| v.version.clone());
        let Some(version) = version.or(serving) else {
            let rerun = self.runner.start(Trigger::Discard).await;
            self.start_recovery("");
            return Ok(Discarded {
                version: None,
                serving: None,
                rerun,
            });
        };
        let store = self.store().clone();
        let v = version.clone();
        let status = blocking(move || {
            if parse_version(&v).is_none() {
                return Ok(None);
            }
            Ok(store
                .list()?
                .into_iter()
                .find(|i| i.version == v)
                .map(|i| i.status))
        })
        .await?;
        match status {
            None => return Err(DiscardError::NoSuchVersion(version)),
            Some(ViewStatus::Discarded) => return Err(DiscardError::AlreadyDiscarded(version)),
            Some(_) => {}
        }
        self.runner.discard_version(&version, reason).await?;
        self.refresh_locked().await;
        // Claimed before the recovery loop starts, which first waits for it.
        let rerun = self.runner.start(Trigger::Discard).await;
        self.start_recovery(&version);
        Ok(Discarded {
            version: Some(version),
            serving: self.current().map(|v| v.version.clone()),
            rerun,
        })
    }

    /// Swaps `view` in, then tells the speed layer which epochs the views that may serve need
    /// and which view its all-time rankings are for.
    async fn swap(&self, view: Option<Arc<BatchView>>) {
        if let Some(v) = &view {
            tracing::info!(version = %v.version, cutoff_seq = v.cutoff_seq.get(), "serving batch view");
        }
        self.current.store(view.clone());
        let speed = self.speed.clone();
        let base = view
            .clone()
            .map(|v| Arc::new(ViewBase(v)) as Arc<dyn tally_speed::BaseTotals>);
        if let Err(e) = tokio::task::spawn_blocking(move || speed.set_base(base)).await {
            tracing::error!(error = %e, "building the speed layer's rankings failed");
        }
        let store = self.store().clone();
        let fallbacks = self.fallback_views;
        let retain = blocking(move || Ok(retain_after(&store, view.as_deref(), fallbacks)))
            .await
            .unwrap_or(Seq::ZERO);
        self.speed.retain_after(retain);
    }

    /// Starts a recovery when the serving view cannot answer exactly.
    fn check_exact(self: &Arc<Self>) {
        if let Some(v) = self.current() {
            if !self.speed.covers(v.cutoff_seq) {
                tracing::error!(version = %v.version, cutoff_seq = v.cutoff_seq.get(),
                    "the speed epochs after the serving view were collected; queries answer 503 until a rerun publishes a newer view");
                self.start_recovery(&v.version);
            }
        }
    }

    /// Reruns the batch layer until a view newer than `version` serves exactly.
    fn start_recovery(self: &Arc<Self>, version: &str) {
        let mut r = tally_core::sync::lock(&self.recovering);
        let start = r.is_none();
        if r.as_deref().is_none_or(|cur| cur < version) {
            *r = Some(version.to_string());
        }
        if start {
            tokio::spawn(self.clone().recover());
        }
    }

    /// Done once a view newer than every version recovery was started for serves exactly.
    fn recovered(&self) -> bool {
        let mut r = tally_core::sync::lock(&self.recovering);
        let done = match (r.as_deref(), self.current()) {
            (None, _) => true,
            (Some(target), Some(v)) => {
                v.version.as_str() > target && self.speed.covers(v.cutoff_seq)
            }
            (Some(_), None) => false,
        };
        if done {
            *r = None;
        }
        done
    }

    async fn recover(self: Arc<Self>) {
        let cfg = self.runner.config();
        let mut delay = cfg.retry_backoff;
        loop {
            // A run already going (the discard's own rerun, a scheduled one) may publish the
            // view recovery waits for.
            if self.runner.wait_idle().await {
                self.refresh().await;
            }
            if self.recovered() {
                break;
            }
            let result = self.runner.run(Trigger::Recovery).await;
            crate::metrics::record_run(&result);
            match result {
                Ok(o) => {
                    tracing::info!(version = %o.version, "recovery run published a view");
                    self.refresh().await;
                }
                Err(RunError::AlreadyRunning { .. }) => continue,
                // Its cut reaches this node through the log, which then computes to it.
                Err(e @ RunError::HeldElsewhere { .. }) => {
                    tracing::info!(reason = %e, "recovery waits for another node's batch run");
                }
                Err(e) => {
                    tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "recovery run failed");
                }
            }
            if self.recovered() {
                break;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(cfg.max_backoff);
        }
        tracing::info!("batch view recovered");
    }
}

/// A batch view as the speed layer's rankings see it.
struct ViewBase(Arc<BatchView>);

impl tally_speed::BaseTotals for ViewBase {
    fn id(&self) -> &str {
        &self.0.version
    }
    fn cutoff(&self) -> Seq {
        self.0.cutoff_seq
    }
    fn total(&self, url: &str) -> u64 {
        self.0.total_views(url)
    }
    fn top(&self, host: Option<&str>, k: usize) -> Vec<(Arc<str>, u64)> {
        self.0.top(host, k)
    }
    fn hosts(&self) -> Vec<Arc<str>> {
        self.0.hosts().cloned().collect()
    }
    fn late(&self, from_cell: i64) -> Vec<Arc<str>> {
        self.0.late(from_cell)
    }
    fn views_before(&self, url: &str, to_cell: i64) -> u64 {
        self.0.range_views(url, i64::MIN, to_cell)
    }
}

/// What [`resolve`] found.
struct Resolved {
    /// The version to serve.
    target: Option<String>,
    /// The version `CURRENT` names when its manifest fails verification (and it is not marked
    /// discarded yet): to discard, with a rerun.
    bad_current: Option<String>,
    /// The version `CURRENT` names when it is not good and no good version exists.
    stuck: Option<String>,
}

/// The version to serve: the one `CURRENT` names when it is good, else the newest good one
/// (and `CURRENT` is rewritten to name it).
fn resolve(store: &ViewStore) -> tally_batch::Result<Resolved> {
    let named = store.current()?;
    let mut bad_current = None;
    if let Some(v) = named.as_ref().filter(|v| parse_version(v).is_some()) {
        if !store.is_discarded(v) {
            match store.read_manifest(v) {
                Ok(_) => {
                    return Ok(Resolved {
                        target: named,
                        bad_current: None,
                        stuck: None,
                    })
                }
                Err(e) if e.kind() == ErrorKind::Corrupt => bad_current = Some(v.clone()),
                Err(_) => {}
            }
        }
    }
    let newest = store.newest_good()?;
    match (&named, &newest) {
        (None, Some(n)) => {
            tracing::warn!(serving = %n, "views/batch/CURRENT is missing or empty; serving the newest good view and rewriting CURRENT")
        }
        (Some(bad), Some(n)) => {
            tracing::warn!(named = %bad, serving = %n, "views/batch/CURRENT names a version that is not good; serving the newest good view and rewriting CURRENT")
        }
        (Some(_), None) | (None, None) => {}
    }
    if let Some(n) = &newest {
        if let Err(e) = store.set_current(n) {
            tracing::warn!(error = %e, "cannot rewrite views/batch/CURRENT");
        }
    }
    let stuck = named.filter(|_| newest.is_none());
    Ok(Resolved {
        target: newest,
        bad_current,
        stuck,
    })
}

/// The smallest cutoff among `serving` and the `fallbacks` good views before it; `Seq(0)` (keep
/// every epoch) without a view or with fewer earlier good views: then a discard could fall back
/// to no view at all, which needs every epoch.
fn retain_after(store: &ViewStore, serving: Option<&BatchView>, fallbacks: usize) -> Seq {
    let Some(v) = serving else {
        return Seq::ZERO;
    };
    let earlier: Vec<Seq> = match store.list() {
        Ok(list) => list
            .into_iter()
            .rev()
            .filter(|i| i.status == ViewStatus::Good && i.version < v.version)
            .take(fallbacks)
            .map(|i| i.cutoff_seq)
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the batch views; keeping every speed epoch");
            return Seq::ZERO;
        }
    };
    if earlier.len() < fallbacks {
        return Seq::ZERO;
    }
    earlier.into_iter().fold(v.cutoff_seq, std::cmp::Ord::min)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> tally_batch::Result<T> + Send + 'static,
) -> tally_batch::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| tally_batch::Error::Internal(format!("blocking task failed: {e}")))?
}
