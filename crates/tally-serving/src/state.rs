//! What every handler shares: the master dataset, the serving batch view, the speed layer and
//! the batch runner.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwapOption;
use tally_batch::{BatchRunner, BatchView, ViewStore};
use tally_core::event::IngestLimits;
use tally_core::Seq;
use tally_master::Master;
use tally_speed::SpeedLayer;

/// Request limits from the `ingest` config section.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub ingest: IngestLimits,
    pub max_body_bytes: usize,
    pub request_timeout: std::time::Duration,
    pub max_concurrency: usize,
}

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub master: Master,
    pub speed: SpeedLayer,
    pub views: Arc<ViewManager>,
    pub runner: BatchRunner,
    pub limits: Limits,
    pub admin_token: Option<String>,
    pub started: Instant,
    pub schedule: String,
    /// HyperLogLog precision for unique visitors (`uniques.precision`).
    pub sketch_precision: u8,
    /// Next scheduled batch run, epoch ms (0: unknown).
    pub next_run_ms: AtomicI64,
    /// Daily salt of Plausible-compatible visitor ids.
    pub salt: crate::plausible::DailySalt,
    /// Renders the Prometheus text of every recorded metric.
    pub render_metrics: Box<dyn Fn() -> String + Send + Sync>,
    /// Recent `/v1/top` rankings, keyed by what they depend on.
    pub top_cache: crate::query::TopCache,
    /// Recent `/v1/uniques` answers, keyed by what they depend on.
    pub uniques_cache: crate::query::UniquesCache,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(inner: Inner) -> AppState {
        AppState(Arc::new(inner))
    }
}

/// What `CURRENT` names, as seen by [`ViewManager::load_current`].
enum Loaded {
    Nothing,
    Serving,
    View(Box<BatchView>),
}

/// Owns the batch view being served, swapped in one step; queries keep the snapshot they
/// started with.
pub struct ViewManager {
    runner: BatchRunner,
    current: ArcSwapOption<BatchView>,
    speed: SpeedLayer,
    /// Serialises loads so that two reloads never race each other's swap.
    loading: tokio::sync::Mutex<()>,
    /// Set when a discard left no good view: the speed layer may no longer hold the epochs a
    /// query would need, so queries answer 503 until a rerun publishes a view.
    blocked: AtomicBool,
    /// Serialises discards: two at once would both rewrite `CURRENT` from the same state.
    discarding: tokio::sync::Mutex<()>,
}

impl ViewManager {
    pub fn new(runner: BatchRunner, speed: SpeedLayer) -> ViewManager {
        ViewManager {
            runner,
            current: ArcSwapOption::empty(),
            speed,
            loading: tokio::sync::Mutex::new(()),
            blocked: AtomicBool::new(false),
            discarding: tokio::sync::Mutex::new(()),
        }
    }

    pub fn store(&self) -> &ViewStore {
        self.runner.store()
    }

    pub fn current(&self) -> Option<Arc<BatchView>> {
        self.current.load_full()
    }

    pub fn blocked(&self) -> bool {
        self.blocked.load(Ordering::Acquire)
    }

    /// Cutoff of the serving view, `Seq(0)` without one: the speed layer covers what is after.
    pub fn cutoff(view: Option<&Arc<BatchView>>) -> Seq {
        view.map_or(Seq::ZERO, |v| v.cutoff_seq)
    }

    /// Loads the version `CURRENT` names, verifying every file against its manifest. A view
    /// that fails is never served: it is discarded (kept on disk, recorded in the history) and
    /// the newest earlier good one is tried. Returns `true` when something was discarded, so
    /// that the caller starts a rerun.
    pub async fn load_current(&self) -> bool {
        let _guard = self.loading.lock().await;
        let mut discarded_any = false;
        loop {
            let store = self.store().clone();
            let serving = self.current().map(|v| v.version.clone());
            let loaded =
                tokio::task::spawn_blocking(move || -> Result<Loaded, (Option<String>, String)> {
                    let version = store.current().map_err(|e| (None, e.to_string()))?;
                    let Some(version) = version else {
                        return Ok(Loaded::Nothing);
                    };
                    if serving.as_deref() == Some(version.as_str()) {
                        // Already verified and serving (e.g. the watcher got there first).
                        return Ok(Loaded::Serving);
                    }
                    store
                        .load(&version)
                        .map(|v| Loaded::View(Box::new(v)))
                        .map_err(|e| (Some(version), e.to_string()))
                })
                .await;
            match loaded {
                Ok(Ok(Loaded::Serving)) => return discarded_any,
                Ok(Ok(Loaded::View(view))) => {
                    self.swap(Some(Arc::from(view)));
                    return discarded_any;
                }
                Ok(Ok(Loaded::Nothing)) => {
                    if discarded_any {
                        self.blocked.store(true, Ordering::Release);
                    }
                    self.swap(None);
                    return discarded_any;
                }
                Ok(Err((Some(version), error))) => {
                    tracing::error!(%version, %error, "batch view failed verification; discarding it");
                    discarded_any = true;
                    let reason = format!("failed verification: {error}");
                    if let Err(e) = self.runner.discard_version(&version, &reason).await {
                        tracing::error!(%version, error = %e, "cannot mark the view discarded");
                        self.swap(None);
                        self.blocked.store(true, Ordering::Release);
                        return true;
                    }
                }
                Ok(Err((None, error))) => {
                    tracing::error!(%error, "cannot read views/batch/CURRENT");
                    return discarded_any;
                }
                Err(join) => {
                    tracing::error!(error = %join, "view loading task failed");
                    return discarded_any;
                }
            }
        }
    }

    /// Declares the serving view bad: marks it discarded and serves the newest earlier good
    /// view (or, without one, answers 503 until a rerun publishes a view). Returns the
    /// discarded version.
    pub async fn discard_current(
        &self,
        reason: &str,
    ) -> Result<Option<String>, tally_batch::Error> {
        let _one_at_a_time = self.discarding.lock().await;
        let discarded = self.runner.discard_current(reason).await?;
        if discarded.is_some() {
            self.load_current().await;
            if self.current().is_none() {
                self.blocked.store(true, Ordering::Release);
            }
        }
        Ok(discarded.map(|(v, _)| v))
    }

    /// Reloads when `CURRENT` names another version than the one serving (e.g. a CLI run). A
    /// missing `CURRENT` is not a reason to stop serving: only a discard removes the view.
    pub async fn refresh_if_changed(&self) -> bool {
        let store = self.store().clone();
        let on_disk = tokio::task::spawn_blocking(move || store.current().ok().flatten())
            .await
            .ok()
            .flatten();
        let serving = self.current().map(|v| v.version.clone());
        if on_disk.is_some() && on_disk != serving {
            return self.load_current().await;
        }
        false
    }

    fn swap(&self, view: Option<Arc<BatchView>>) {
        if let Some(v) = &view {
            let previous_good = self
                .store()
                .newest_good_before(&v.version)
                .ok()
                .flatten()
                .and_then(|p| tally_batch::store::parse_version(&p))
                .map(|(cutoff, _)| cutoff);
            tracing::info!(version = %v.version, cutoff_seq = v.cutoff_seq.get(), "serving batch view");
            // The speed layer must hold an epoch starting right after the view's cutoff. A
            // fallback past a discarded view may be older than that: the epochs after it were
            // collected once newer views covered them. Merging would then miss those events,
            // so answer 503 until a rerun publishes a view.
            let epochs = self.speed.epochs();
            let exact = epochs.is_empty() || epochs.iter().any(|e| e.start == v.cutoff_seq.next());
            if !exact {
                tracing::error!(version = %v.version, cutoff_seq = v.cutoff_seq.get(),
                    "the speed epochs after this view were collected; queries answer 503 until a rerun");
            }
            // Register the new view before the speed layer may collect what it covers.
            self.current.store(view.clone());
            self.blocked.store(!exact, Ordering::Release);
            self.speed.view_published(v.cutoff_seq, previous_good);
        } else {
            self.current.store(None);
        }
    }
}
