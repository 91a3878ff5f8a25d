//! Metric names (Prometheus, `tally_` prefix) with their help text, and counting batch runs.
//! Labels are bounded: route templates and status codes, never a URL. The request middleware
//! and `GET /metrics` are in `observe.rs`.

use tally_core::metrics::MetricDef;

pub const HTTP_REQUESTS: &str = "tally_http_requests_total";
pub const HTTP_DURATION: &str = "tally_http_request_duration_seconds";
pub const EVENTS_ACCEPTED: &str = "tally_events_accepted_total";
pub const EVENTS_REJECTED: &str = "tally_events_rejected_total";
pub const ACKED_SEQ: &str = "tally_acked_seq";
pub const SEALED_SEQ: &str = "tally_sealed_seq";
pub const SEAL_LAG_SECONDS: &str = "tally_seal_lag_seconds";
pub const WAL_BYTES: &str = "tally_wal_bytes";
pub const SPEED_APPLIED_SEQ: &str = "tally_speed_applied_seq";
pub const SPEED_LAG_EVENTS: &str = "tally_speed_apply_lag_events";
pub const REDIS_UP: &str = "tally_redis_up";
pub const VIEW_CUTOFF_SEQ: &str = "tally_batch_view_cutoff_seq";
pub const VIEW_AGE_SECONDS: &str = "tally_batch_view_age_seconds";
pub const BATCH_RUNS: &str = "tally_batch_runs_total";
pub const BATCH_DURATION: &str = "tally_batch_run_duration_seconds";
pub const BATCH_FILES_REUSED: &str = "tally_batch_files_reused_total";
pub const BATCH_FILES_COMPUTED: &str = "tally_batch_files_computed_total";
pub const MASTER_FILES: &str = "tally_master_files";
pub const REDIS_ERRORS: &str = "tally_redis_errors_total";
pub const SPEED_APPLIES: &str = "tally_speed_applies_total";
pub const SPEED_EVENTS_APPLIED: &str = "tally_speed_events_applied_total";
pub const SPEED_REBUILDS: &str = "tally_speed_rebuilds_total";
pub const SPEED_COLLECTIONS: &str = "tally_speed_epoch_collections_total";
pub const SPEED_RESYNCS: &str = "tally_speed_redis_rewrites_total";
pub const REDIS_LAG_EVENTS: &str = "tally_speed_redis_lag_events";
pub const VIEW_EXACT: &str = "tally_batch_view_exact";
pub const STOPPED_THREADS: &str = "tally_master_threads_stopped";

/// Every metric the serving layer emits (including the gauges and counters it reads from the
/// master dataset and the speed layer at each scrape).
pub const CATALOGUE: &[MetricDef] = &[
    MetricDef::counter(HTTP_REQUESTS, "HTTP requests by route template, method and status."),
    MetricDef::histogram(HTTP_DURATION, "Seconds to answer an HTTP request, by route template."),
    MetricDef::counter(EVENTS_ACCEPTED, "Events acknowledged (durable in the WAL)."),
    MetricDef::counter(EVENTS_REJECTED, "Ingest requests refused as invalid (nothing stored)."),
    MetricDef::gauge(ACKED_SEQ, "Highest seq acknowledged to a client."),
    MetricDef::gauge(SEALED_SEQ, "Highest seq sealed into the Parquet master dataset."),
    MetricDef::gauge(
        SEAL_LAG_SECONDS,
        "Age of the oldest acknowledged event not yet in a master file (0 when all are): sealing's lag in time, cluster mode's archiver lag.",
    ),
    MetricDef::gauge(WAL_BYTES, "Bytes in WAL segments not yet sealed."),
    MetricDef::gauge(SPEED_APPLIED_SEQ, "Highest seq the speed layer answers queries with."),
    MetricDef::gauge(SPEED_LAG_EVENTS, "Acknowledged events the speed layer has not applied yet."),
    MetricDef::gauge(REDIS_UP, "1 when Redis answers the speed layer, else 0."),
    MetricDef::gauge(VIEW_CUTOFF_SEQ, "Cutoff seq of the serving batch view (0: none)."),
    MetricDef::gauge(VIEW_AGE_SECONDS, "Seconds since the serving batch view was computed."),
    MetricDef::counter(BATCH_RUNS, "Batch runs by status (ok, failed), whatever started them."),
    MetricDef::histogram(BATCH_DURATION, "Seconds per successful batch run."),
    MetricDef::counter(BATCH_FILES_REUSED, "Master files whose cached partial aggregates successful batch runs merged without reading the file."),
    MetricDef::counter(BATCH_FILES_COMPUTED, "Master files successful batch runs read (every file on a full run)."),
    MetricDef::gauge(MASTER_FILES, "Parquet files in the master dataset."),
    MetricDef::counter(REDIS_ERRORS, "Failed speed-layer attempts (Redis unreachable, timeouts), each followed by a backoff."),
    MetricDef::counter(SPEED_APPLIES, "Speed-layer applies committed."),
    MetricDef::counter(SPEED_EVENTS_APPLIED, "Events the speed layer applied (each once)."),
    MetricDef::counter(SPEED_REBUILDS, "Speed-layer rebuilds from the master dataset (Redis held no usable state: a first start, a lost Redis, another dataset or layout)."),
    MetricDef::counter(SPEED_COLLECTIONS, "Speed-layer epoch collections considered."),
    MetricDef::counter(SPEED_RESYNCS, "Times Redis was rewritten from the mirror (it had lost or changed what tally wrote)."),
    MetricDef::gauge(REDIS_LAG_EVENTS, "Events in the mirror not yet written to Redis."),
    MetricDef::gauge(VIEW_EXACT, "1 when the speed layer covers the serving view (answers are exact), else 0."),
    MetricDef::gauge(STOPPED_THREADS, "Threads of the master dataset (WAL writer, sealer) that stopped while it is open; anything but 0 needs a restart."),
];

/// Counts a finished batch run, whatever started it (an admin request with or without
/// `?wait=true`, the schedule, a recovery rerun); a run skipped because another was going is
/// not a run.
pub(crate) fn record_run(result: &Result<tally_batch::RunOutcome, tally_batch::RunError>) {
    match result {
        Ok(outcome) => {
            metrics::counter!(BATCH_RUNS, "status" => "ok").increment(1);
            metrics::histogram!(BATCH_DURATION).record(outcome.duration_ms as f64 / 1000.0);
            metrics::counter!(BATCH_FILES_REUSED).increment(outcome.files_reused as u64);
            metrics::counter!(BATCH_FILES_COMPUTED).increment(outcome.files_computed as u64);
        }
        // Runs that did not start are not failed runs.
        Err(
            tally_batch::RunError::AlreadyRunning { .. }
            | tally_batch::RunError::HeldElsewhere { .. }
            | tally_batch::RunError::Unavailable(_),
        ) => {}
        Err(_) => metrics::counter!(BATCH_RUNS, "status" => "failed").increment(1),
    }
}
