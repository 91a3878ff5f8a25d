//! Metric names of the master dataset (Prometheus, `tally_` prefix; no per-URL labels).

/// Seconds one group commit spent in `fdatasync`.
pub const WAL_FSYNC_SECONDS: &str = "tally_wal_fsync_seconds";
/// Events written by one group commit (how well concurrent requests share an fsync).
pub const WAL_GROUP_EVENTS: &str = "tally_wal_group_events";
/// Requests written by one group commit.
pub const WAL_GROUP_REQUESTS: &str = "tally_wal_group_requests";
/// WAL writes that failed (disk full, I/O error); their requests got 503.
pub const WAL_WRITE_ERRORS: &str = "tally_wal_write_errors_total";
/// Seconds to seal one WAL segment into a Parquet file.
pub const SEAL_SECONDS: &str = "tally_seal_duration_seconds";
/// Events sealed into the master dataset.
pub const SEALED_EVENTS: &str = "tally_sealed_events_total";
