//! The shape of a metric catalogue. Each crate lists the metrics it emits in one `CATALOGUE`,
//! with their kind and help text; the binary describes them to the Prometheus exporter (the
//! `# HELP` lines, and buckets for histograms that are not durations), and a test checks that
//! the README lists every one.

/// What a metric is, in Prometheus terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    /// A histogram of seconds (`_seconds` suffix) or of sizes (counts per operation).
    Histogram,
}

/// One metric a crate emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: MetricKind,
    pub help: &'static str,
}

impl MetricDef {
    pub const fn counter(name: &'static str, help: &'static str) -> MetricDef {
        MetricDef {
            name,
            kind: MetricKind::Counter,
            help,
        }
    }

    pub const fn gauge(name: &'static str, help: &'static str) -> MetricDef {
        MetricDef {
            name,
            kind: MetricKind::Gauge,
            help,
        }
    }

    pub const fn histogram(name: &'static str, help: &'static str) -> MetricDef {
        MetricDef {
            name,
            kind: MetricKind::Histogram,
            help,
        }
    }

    /// Whether the histogram measures durations (seconds) rather than sizes.
    pub fn is_duration(&self) -> bool {
        self.name.ends_with("_seconds")
    }
}
