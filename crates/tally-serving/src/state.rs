//! What every handler shares: the master dataset, the serving batch view, the speed layer and
//! the batch runner.

use std::path::PathBuf;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Instant;

use tally_batch::BatchRunner;
use tally_core::event::IngestLimits;
use tally_master::Master;
use tally_speed::SpeedLayer;

use crate::cache::{TopCache, UniquesCache};
use crate::client_ip::TrustedProxies;
use crate::salt::DailySalt;
use crate::views::ViewManager;

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
    /// Cluster mode's log; `None`: one node, events go to the WAL.
    pub log: Option<tally_log::Log>,
    pub speed: SpeedLayer,
    pub views: Arc<ViewManager>,
    pub runner: BatchRunner,
    pub limits: Limits,
    pub admin_token: Option<String>,
    /// `auth.read_token`: when set, query endpoints need it (or the admin token).
    pub read_token: Option<String>,
    /// `auth.api_keys`: the keys `POST /api/v2/query` accepts.
    pub api_keys: Vec<String>,
    /// Whether `POST /api/v2/query` is open without a key (no keys, loopback bind).
    pub api_open: bool,
    pub started: Instant,
    pub schedule: String,
    /// HyperLogLog precision for unique visitors (`uniques.precision`).
    pub sketch_precision: u8,
    /// Next scheduled batch run, epoch ms (0: unknown).
    pub next_run_ms: AtomicI64,
    /// Daily salt of Plausible-compatible visitor ids.
    pub salt: DailySalt,
    /// Reverse proxies whose `X-Forwarded-For` names the client (`http.trusted_proxies`).
    pub trusted_proxies: TrustedProxies,
    /// Renders the Prometheus text of every recorded metric.
    pub render_metrics: Box<dyn Fn() -> String + Send + Sync>,
    /// Recent `/v1/top` rankings, keyed by what they depend on.
    pub top_cache: TopCache,
    /// Recent `/v1/uniques` answers, keyed by what they depend on.
    pub uniques_cache: UniquesCache,
}

/// What the serving layer is configured with (from the `http`, `ingest`, `auth`, `batch`,
/// `uniques`, `speed` and `query` config sections).
pub struct ServingConfig {
    pub limits: Limits,
    pub admin_token: Option<String>,
    /// `auth.read_token`; `None` leaves the query endpoints open.
    pub read_token: Option<String>,
    /// `auth.api_keys`; empty leaves `POST /api/v2/query` open on a loopback bind only.
    pub api_keys: Vec<String>,
    /// Whether the server listens on a loopback address only.
    pub loopback: bool,
    /// The batch schedule, as shown by `GET /v1/admin/batch`.
    pub schedule: String,
    pub sketch_precision: u8,
    /// Good views before the serving one kept exactly servable (`speed.fallback_views`).
    pub fallback_views: usize,
    pub trusted_proxies: TrustedProxies,
    /// Where the daily salt of visitor ids is kept (`data_dir/plausible_salt.json`).
    pub salt_path: PathBuf,
    /// `query.result_cache`.
    pub result_cache: bool,
    /// Cluster mode's log (`queue.url`): events are published there, not appended to the WAL.
    pub log: Option<tally_log::Log>,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    /// Makes a request's events durable, all or nothing: in the local WAL, or (cluster mode) as
    /// one message in the log. Resolves once they are; then the request is answered `202`.
    pub async fn append(&self, events: Vec<tally_core::Event>) -> crate::error::ApiResult<()> {
        match &self.log {
            None => {
                self.master.append(events).await?;
            }
            Some(log) => {
                log.publish(&events).await?;
            }
        }
        Ok(())
    }

    /// The one way to build the state, for the server and the tests alike. Call
    /// [`ViewManager::refresh`] (`state.views.refresh()`) before serving, to load the view.
    pub fn new(
        master: Master,
        speed: SpeedLayer,
        runner: BatchRunner,
        cfg: ServingConfig,
        render_metrics: Box<dyn Fn() -> String + Send + Sync>,
    ) -> AppState {
        let views = Arc::new(ViewManager::new(
            runner.clone(),
            speed.clone(),
            cfg.fallback_views,
        ));
        AppState(Arc::new(Inner {
            master,
            log: cfg.log,
            speed,
            views,
            runner,
            limits: cfg.limits,
            admin_token: cfg.admin_token,
            read_token: cfg.read_token,
            api_open: cfg.api_keys.is_empty() && cfg.loopback,
            api_keys: cfg.api_keys,
            started: Instant::now(),
            schedule: cfg.schedule,
            sketch_precision: cfg.sketch_precision,
            next_run_ms: AtomicI64::new(0),
            salt: DailySalt::new(cfg.salt_path),
            trusted_proxies: cfg.trusted_proxies,
            render_metrics,
            top_cache: TopCache::new(cfg.result_cache),
            uniques_cache: UniquesCache::new(cfg.result_cache),
        }))
    }
}
