//! The scheduling priority of the applier's work.
//!
//! Under more load than the cores can carry, the kernel shares them evenly among runnable
//! threads, and the applier — one thread against HTTP workers, load generators, Redis — fell
//! behind ingestion without bound: in `scripts/bench.sh mixed` (100 000 events/s while wrk
//! runs flat out on two cores) it applied ~60 000 events/s and its lag grew to 2 M events
//! (ingest-to-visible p99 10–20 s). Queries slowed by a backlog recover when the load passes;
//! a backlog of unapplied events only grows, and past the in-memory tail it is read from
//! storage, which is slower still. So the applier's threads run at a higher priority
//! (`speed.applier_nice`, default −10 relative to the process) for as long as they apply,
//! and queries take what is left: measured on that benchmark, the applier kept up (lag p99
//! 78 000 events, ingest-to-visible p99 0.69 s) while query throughput fell by a third to a half.
//!
//! Raising a priority needs `CAP_SYS_NICE` (or root, or `RLIMIT_NICE`); without it the applier
//! runs at the process's priority and a warning says so once. The mechanism is
//! [`tally_core::priority`].

use std::sync::atomic::{AtomicBool, Ordering};

use tally_core::priority::Priority;

static REFUSED: AtomicBool = AtomicBool::new(false);

/// Moves the calling thread by `by` nice steps until the result is dropped; when the system
/// refuses, warns once and leaves the thread where it is.
pub(crate) fn applier_priority(by: i32) -> Option<Priority> {
    match Priority::adjust(by) {
        Ok(p) => Some(p),
        Err(error) => {
            if !REFUSED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    nice = by,
                    %error,
                    "the speed applier runs at the process's priority: raising it needs \
                     CAP_SYS_NICE (speed.applier_nice; docs/OPERATIONS.md)"
                );
            }
            None
        }
    }
}
