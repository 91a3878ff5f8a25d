//! Metric names of the master dataset (Prometheus, `tally_` prefix; no per-URL labels), and
//! their catalogue.

use tally_core::metrics::MetricDef;

pub const WAL_FSYNC_SECONDS: &str = "tally_wal_fsync_seconds";
pub const WAL_GROUP_EVENTS: &str = "tally_wal_group_events";
pub const WAL_GROUP_REQUESTS: &str = "tally_wal_group_requests";
pub const WAL_WRITE_ERRORS: &str = "tally_wal_write_errors_total";
pub const SEAL_SECONDS: &str = "tally_seal_duration_seconds";
pub const SEALED_EVENTS: &str = "tally_sealed_events_total";
pub const COMPACTIONS: &str = "tally_master_compactions_total";
pub const COMPACTED_FILES: &str = "tally_master_compacted_files_total";
pub const EVENTS_DROPPED: &str = "tally_master_events_dropped_total";

/// Every metric the master dataset emits.
pub const CATALOGUE: &[MetricDef] = &[
    MetricDef::histogram(
        WAL_FSYNC_SECONDS,
        "Seconds one WAL group commit spent in fdatasync.",
    ),
    MetricDef::histogram(
        WAL_GROUP_EVENTS,
        "Events written by one WAL group commit (how well concurrent requests share an fsync).",
    ),
    MetricDef::histogram(
        WAL_GROUP_REQUESTS,
        "Requests written by one WAL group commit.",
    ),
    MetricDef::counter(
        WAL_WRITE_ERRORS,
        "WAL writes that failed (disk full, I/O error); their requests were answered 503.",
    ),
    MetricDef::histogram(
        SEAL_SECONDS,
        "Seconds to seal one closed WAL segment into a Parquet file of the master dataset.",
    ),
    MetricDef::counter(SEALED_EVENTS, "Events sealed into the master dataset."),
    MetricDef::counter(
        COMPACTIONS,
        "Merged master files written by compaction (each replacing a run of small files).",
    ),
    MetricDef::counter(
        COMPACTED_FILES,
        "Small master files compaction merged into larger ones and deleted.",
    ),
    MetricDef::counter(
        EVENTS_DROPPED,
        "Events removed from the master dataset on purpose, by reason (retention, forget).",
    ),
];
