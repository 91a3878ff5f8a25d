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
//! runs at the process's priority and a warning says so once. Linux only (the nice value is
//! per thread there); elsewhere nothing.

use std::sync::atomic::{AtomicBool, Ordering};

/// The calling thread runs `by` nice steps away from where it was until this is dropped.
pub(crate) struct Priority {
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    restore: Option<i32>,
}

static REFUSED: AtomicBool = AtomicBool::new(false);

impl Priority {
    /// Moves the calling thread's nice value by `by` (negative: more CPU under contention).
    pub(crate) fn adjust(by: i32) -> Priority {
        #[cfg(target_os = "linux")]
        if by != 0 {
            // SAFETY: `getpriority` and `setpriority` read their integer arguments and touch
            // no memory of ours; `who = 0` names the calling thread on Linux, so `getpriority`
            // cannot fail and its result is the nice value (which may be −1).
            #[allow(unsafe_code)]
            let (before, r) = unsafe {
                let before = libc::getpriority(libc::PRIO_PROCESS, 0);
                (
                    before,
                    libc::setpriority(libc::PRIO_PROCESS, 0, before + by),
                )
            };
            if r == 0 {
                return Priority {
                    restore: Some(before),
                };
            }
            if !REFUSED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    nice = by,
                    error = %std::io::Error::last_os_error(),
                    "the speed applier runs at the process's priority: raising it needs \
                     CAP_SYS_NICE (speed.applier_nice; docs/OPERATIONS.md)"
                );
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (by, &REFUSED, Ordering::Relaxed);
        Priority { restore: None }
    }
}

impl Drop for Priority {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Some(nice) = self.restore {
            // SAFETY: as in `adjust`. Going back up is always allowed.
            #[allow(unsafe_code)]
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, 0, nice);
            }
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn nice() -> i32 {
        #[allow(unsafe_code)]
        // SAFETY: as in `adjust`.
        unsafe {
            libc::getpriority(libc::PRIO_PROCESS, 0)
        }
    }

    /// Lowering is always allowed, so this runs anywhere: the thread moves while the guard
    /// lives and comes back after.
    #[test]
    fn the_thread_moves_while_held_and_comes_back() {
        std::thread::spawn(|| {
            let before = nice();
            {
                let _p = Priority::adjust(3);
                assert_eq!(nice(), before + 3);
            }
            assert_eq!(nice(), before);
            let _none = Priority::adjust(0);
            assert_eq!(nice(), before);
        })
        .join()
        .unwrap();
    }
}
