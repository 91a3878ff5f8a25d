//! `tally serve`: wiring, the batch scheduler, and ordered graceful shutdown.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tally_batch::{BatchRunner, RunnerConfig, ViewStore};
use tally_core::event::IngestLimits;
use tally_core::metrics::{MetricDef, MetricKind};
use tally_master::{CompactConfig, Master, MasterConfig};
use tally_serving::{AppState, Limits, ServingConfig, ViewManager};
use tally_speed::SpeedLayer;
use tokio::net::TcpListener;
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::config::Config;
use crate::lock::DataDirLock;

/// How long sealing the WAL into the master dataset may take at shutdown (the WAL keeps what
/// it could not seal); the process exits 5 s after this deadline, counted from the first
/// signal, whatever is still running (in-flight requests included).
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

pub(crate) fn master_config(cfg: &Config) -> MasterConfig {
    MasterConfig {
        data_dir: cfg.storage.data_dir.clone(),
        seal_interval: cfg.ingest.seal_interval,
        seal_max_events: cfg.ingest.seal_max_events,
        fsync: cfg.ingest.fsync,
        tail_capacity: cfg.speed.tail_capacity,
    }
}

pub(crate) fn runner_config(cfg: &Config) -> RunnerConfig {
    RunnerConfig {
        keep_versions: cfg.batch.keep_versions,
        max_retries: cfg.batch.max_retries,
        retry_backoff: cfg.batch.retry_backoff,
        sketch_precision: Some(cfg.uniques.precision),
        reuse_partials: cfg.batch.partials,
        ..RunnerConfig::default()
    }
}

pub(crate) fn view_store(cfg: &Config) -> anyhow::Result<ViewStore> {
    let dir = cfg.storage.data_dir.join("views").join("batch");
    ViewStore::open(&dir)
        .with_context(|| format!("cannot open the view store at {}", dir.display()))
}

/// Every metric tally emits, by crate.
pub(crate) fn catalogue() -> impl Iterator<Item = &'static MetricDef> {
    tally_master::metrics::CATALOGUE
        .iter()
        .chain(tally_speed::metrics::CATALOGUE)
        .chain(tally_serving::metrics::CATALOGUE)
        .chain(tally_log::metrics::CATALOGUE)
}

/// Installs the Prometheus recorder and describes every metric of the catalogue. Histograms
/// are Prometheus histograms (aggregatable across replicas), not summaries: durations with
/// buckets from 0.5 ms to 30 min, sizes (events or requests per operation) from 1 to 1M.
fn install_metrics() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    const SECONDS: &[f64] = &[
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 300.0, 1800.0,
    ];
    const SIZES: &[f64] = &[
        1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5,
        2e5, 5e5, 1e6,
    ];
    let mut builder = PrometheusBuilder::new();
    for m in catalogue().filter(|m| m.kind == MetricKind::Histogram) {
        let buckets = if m.is_duration() { SECONDS } else { SIZES };
        builder = builder
            .set_buckets_for_metric(Matcher::Full(m.name.to_string()), buckets)
            .context("invalid histogram buckets")?;
    }
    let handle = builder
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    for m in catalogue() {
        match m.kind {
            MetricKind::Counter => metrics::describe_counter!(m.name, m.help),
            MetricKind::Gauge => metrics::describe_gauge!(m.name, m.help),
            MetricKind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
    Ok(handle)
}

pub(crate) fn run(cfg: Config) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tally")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(cfg))
}

async fn serve(cfg: Config) -> anyhow::Result<ExitCode> {
    let prometheus = install_metrics()?;
    let mut lock = DataDirLock::acquire(&cfg.storage.data_dir)?;
    let master = Master::open(master_config(&cfg)).context("cannot open the master dataset")?;
    let log = match cfg.queue.log(&cfg.cluster) {
        None => None,
        Some(mut log_cfg) => {
            log_cfg.node_id = match cfg.cluster.node_id.trim() {
                "" => master.dataset_id().to_string(),
                id => id.to_string(),
            };
            let log = tally_log::Log::connect(log_cfg)
                .await
                .context("cannot set up the NATS client of queue.url")?;
            tokio::spawn(
                tally_log::Follower::new(log.clone(), master.clone(), cfg.storage.data_dir.clone())
                    .run(),
            );
            Some(log)
        }
    };
    // Each node keeps its own speed state (it follows the log into its own master dataset), so
    // nodes sharing one Redis keep it under their own prefix. On a Redis Cluster that name is a
    // hash tag: one speed state is one slot, so its compare-and-set writes stay on one master
    // (tally_speed::conn).
    let owner = log.as_ref().map(|l| l.node_id().to_string());
    let key_prefix = match (owner, tally_speed::conn::cluster_nodes(&cfg.redis.url)) {
        (None, None) => cfg.redis.key_prefix.clone(),
        (Some(node), None) => format!("{}{node}:", cfg.redis.key_prefix),
        (owner, Some(_)) => {
            let tag = owner.unwrap_or_else(|| master.dataset_id().to_string());
            format!("{}{{{tag}}}:", cfg.redis.key_prefix)
        }
    };
    let speed = SpeedLayer::start(
        tally_speed::SpeedConfig {
            redis_url: cfg.redis.url.clone(),
            key_prefix,
            gc_grace: cfg.speed.gc_grace,
            apply_batch_max: cfg.speed.apply_batch_max,
            sketch_precision: cfg.uniques.precision,
            applier_nice: cfg.speed.applier_nice,
        },
        master.clone(),
    )
    .await;
    let store = view_store(&cfg)?;
    let runner = match &log {
        None => BatchRunner::new(store, master.clone(), runner_config(&cfg)),
        Some(log) => BatchRunner::with_cut(
            store,
            master.clone(),
            runner_config(&cfg),
            Box::new(tally_log::LogCut::new(log.clone())),
        ),
    };
    let state = AppState::new(
        master.clone(),
        speed.clone(),
        runner.clone(),
        ServingConfig {
            limits: Limits {
                ingest: IngestLimits {
                    max_future_ms: cfg.ingest.max_future.as_millis() as i64,
                    max_age_ms: cfg.ingest.max_age.as_millis() as i64,
                    max_batch_events: cfg.ingest.max_batch_events,
                },
                max_body_bytes: cfg.ingest.max_body_bytes,
                request_timeout: cfg.http.request_timeout,
                max_concurrency: cfg.http.max_concurrency,
            },
            admin_token: cfg.admin_token(),
            read_token: cfg.read_token(),
            api_keys: cfg.auth.api_keys.clone(),
            loopback: cfg.http.addr.ip().is_loopback(),
            schedule: cfg.batch.schedule.clone(),
            sketch_precision: cfg.uniques.precision,
            fallback_views: cfg.speed.fallback_views,
            trusted_proxies: cfg.trusted_proxies()?,
            salt_path: cfg.storage.data_dir.join("plausible_salt.json"),
            result_cache: cfg.query.result_cache,
            log,
        },
        Box::new(move || prometheus.render()),
    );
    let views = state.views.clone();
    views.refresh().await;
    if let Some(log) = &state.log {
        // Every node computes its own view to every cut the log carries, whoever published it.
        tokio::spawn(tally_serving::batch::follow_cuts(state.clone(), log.cuts()));
    }

    // The signal handlers are in place before `listening on` tells anyone to send one: a
    // SIGTERM right after it used to find the default action and kill the process.
    let signals = Signals::new()?;
    let listener = TcpListener::bind(cfg.http.addr)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.http.addr))?;
    let addr = listener.local_addr()?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
    }
    lock.write_address(&format!("http://{addr}"))?;
    tracing::info!(%addr, data_dir = %cfg.storage.data_dir.display(), "tally serving");

    let mut scheduler = start_scheduler(&cfg, state.clone()).await?;
    let watcher = tokio::spawn(watch_current(views.clone()));
    let compactor = tokio::spawn(compact_periodically(master.clone(), cfg.clone()));

    let app =
        tally_serving::router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown_signal(signals));
    server.await.context("http server failed")?;

    tracing::info!("shutting down: stopping the scheduler and sealing the WAL");
    watcher.abort();
    compactor.abort();
    if let Err(e) = scheduler.shutdown().await {
        tracing::warn!(error = %e, "scheduler did not stop cleanly");
    }
    match tokio::time::timeout(SHUTDOWN_DEADLINE, master.shutdown()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, "sealing at shutdown failed; the WAL keeps the events")
        }
        Err(_) => tracing::error!("sealing at shutdown timed out; the WAL keeps the events"),
    }
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Runs the batch layer on `batch.schedule` (UTC, 6 fields with seconds).
async fn start_scheduler(cfg: &Config, state: AppState) -> anyhow::Result<JobScheduler> {
    let sched = JobScheduler::new()
        .await
        .context("cannot create the scheduler")?;
    let job_state = state.clone();
    let job = Job::new_async(cfg.batch.schedule.as_str(), move |_id, _lock| {
        let state = job_state.clone();
        Box::pin(async move {
            tally_serving::batch::scheduled_run(state).await;
        })
    })
    .with_context(|| {
        format!(
            "batch.schedule {:?} is not a valid cron expression",
            cfg.batch.schedule
        )
    })?;
    let id = sched.add(job).await.context("cannot add the batch job")?;
    sched.start().await.context("cannot start the scheduler")?;
    let mut probe = sched.clone();
    tokio::spawn(async move {
        loop {
            if let Ok(Some(next)) = probe.next_tick_for_job(id).await {
                state
                    .next_run_ms
                    .store(next.timestamp_millis(), Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    Ok(sched)
}

/// Compacts runs of small master files every `storage.compact_interval` (never when it is 0),
/// starting at once (which also deletes files an interrupted pass left covered).
async fn compact_periodically(master: Master, cfg: Config) {
    let every = cfg.storage.compact_interval;
    if every.is_zero() {
        return;
    }
    let compact = CompactConfig {
        small_bytes: cfg.storage.compact_small_bytes,
        target_bytes: cfg.storage.compact_target_bytes,
        min_files: cfg.storage.compact_min_files,
        // Validated at start-up.
        retention: cfg.storage.retention().unwrap_or(None),
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = master.compact(&compact).await {
            tracing::warn!(error = %e, "compaction failed; retrying at the next interval");
        }
    }
}

/// Picks up a `CURRENT` changed, deleted or garbled by someone else within a second, and retries
/// a load that failed for a transient reason.
async fn watch_current(views: Arc<ViewManager>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        views.refresh().await;
    }
}

/// Resolves on the first SIGINT/SIGTERM; a second one exits at once.
async fn shutdown_signal(mut signals: Signals) {
    signals.recv().await;
    tracing::info!("signal received: finishing in-flight requests (send again to exit at once)");
    tokio::spawn(async move {
        signals.recv().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    tokio::spawn(async {
        tokio::time::sleep(SHUTDOWN_DEADLINE + Duration::from_secs(5)).await;
        tracing::error!("shutdown deadline passed: exiting");
        std::process::exit(1);
    });
}

/// SIGINT and SIGTERM, their handlers registered when this is created.
struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
                term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// The next SIGINT or SIGTERM.
    async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.int.recv() => {},
            _ = self.term.recv() => {},
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_lists_every_metric_once_in_the_catalogue() {
        let readme = include_str!("../../../README.md");
        let mut seen = std::collections::HashSet::new();
        for m in catalogue() {
            assert!(seen.insert(m.name), "{} is in two catalogues", m.name);
            assert!(m.name.starts_with("tally_"), "{}", m.name);
            assert!(!m.help.is_empty(), "{} has no help text", m.name);
            assert!(
                readme.contains(&format!("`{}`", m.name)),
                "README.md does not list the metric {}",
                m.name
            );
        }
    }
}
