//! Metric names of the speed layer's applier (Prometheus, `tally_` prefix), and their
//! catalogue. The speed layer's counters and gauges (`SpeedStats`, applied seqs) are read by
//! the serving layer and exported under its catalogue.

use tally_core::metrics::MetricDef;

pub const APPLY_SECONDS: &str = "tally_speed_apply_seconds";
pub const APPLY_BATCH_EVENTS: &str = "tally_speed_apply_batch_events";
pub const REDIS_WRITE_SECONDS: &str = "tally_speed_redis_write_seconds";
pub const REDIS_WRITE_EVENTS: &str = "tally_speed_redis_write_events";
pub const MIRROR_WRITE_SECONDS: &str = "tally_speed_mirror_write_seconds";

/// Every metric the speed layer emits itself.
pub const CATALOGUE: &[MetricDef] = &[
    MetricDef::histogram(
        APPLY_SECONDS,
        "Seconds from reading a batch of acknowledged events to having it in the in-process mirror (ingest-to-visible beyond the notification).",
    ),
    MetricDef::histogram(APPLY_BATCH_EVENTS, "Events per apply batch of the speed layer."),
    MetricDef::histogram(
        REDIS_WRITE_SECONDS,
        "Seconds per Redis transaction of the write-behind replica.",
    ),
    MetricDef::histogram(
        MIRROR_WRITE_SECONDS,
        "Seconds the applier held the mirror's write lock for one part of an apply (queries wait that long at most).",
    ),
    MetricDef::histogram(
        REDIS_WRITE_EVENTS,
        "Events per Redis transaction of the write-behind replica (coalesced deltas).",
    ),
];
