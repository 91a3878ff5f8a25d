//! Metric names of cluster mode's log (Prometheus, `tally_` prefix), and their catalogue.

use tally_core::metrics::MetricDef;

pub const LOG_PUBLISH_SECONDS: &str = "tally_log_publish_seconds";
pub const LOG_PUBLISH_ERRORS: &str = "tally_log_publish_errors_total";
pub const LOG_FOLLOWED_SEQ: &str = "tally_log_followed_seq";
pub const LOG_LAST_SEQ: &str = "tally_log_last_seq";
pub const LOG_VOID_MESSAGES: &str = "tally_log_void_messages_total";
pub const LEASE_HELD: &str = "tally_lease_held";

/// Every metric the log emits (only in cluster mode).
pub const CATALOGUE: &[MetricDef] = &[
    MetricDef::histogram(
        LOG_PUBLISH_SECONDS,
        "Seconds from publishing a request's events to JetStream's acknowledgement.",
    ),
    MetricDef::counter(
        LOG_PUBLISH_ERRORS,
        "Publishes to the log that failed or timed out; their requests were answered 503.",
    ),
    MetricDef::gauge(
        LOG_FOLLOWED_SEQ,
        "The last stream sequence this node has written to its master dataset.",
    ),
    MetricDef::gauge(
        LOG_LAST_SEQ,
        "The stream's last sequence as this node's follower last saw it (log lag: this minus tally_log_followed_seq).",
    ),
    MetricDef::gauge(
        LEASE_HELD,
        "1 while this node holds the lease named by the `lease` label (`batch`: it runs the cluster's batch run), else 0.",
    ),
    MetricDef::counter(
        LOG_VOID_MESSAGES,
        "Log messages skipped because JetStream stored them after their deadline (answered 503).",
    ),
];
