//! Per-thread scheduling priority: the one place tally changes a thread's nice value (the
//! speed applier raises its threads' while they apply, the sealer lowers its own).
//!
//! Linux only, where the nice value is per thread; elsewhere [`Priority::adjust`] does nothing.

/// The calling thread runs `by` nice steps away from where it was until this is dropped.
#[must_use = "the thread's priority goes back when this is dropped"]
pub struct Priority {
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    restore: Option<i32>,
}

impl Priority {
    /// Moves the calling thread's nice value by `by` (negative: more CPU under contention,
    /// which needs `CAP_SYS_NICE`, root or `RLIMIT_NICE`; positive: always allowed). An error
    /// leaves the thread where it was; `by = 0` and other systems change nothing.
    pub fn adjust(by: i32) -> std::io::Result<Priority> {
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
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
            return Ok(Priority {
                restore: Some(before),
            });
        }
        #[cfg(not(target_os = "linux"))]
        let _ = by;
        Ok(Priority { restore: None })
    }
}

impl Drop for Priority {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Some(nice) = self.restore {
            // SAFETY: as in `adjust`. Going back is allowed: to a higher nice value always, to
            // the one the thread had before raising it because raising it was allowed.
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
                let _p = Priority::adjust(3).unwrap();
                assert_eq!(nice(), before + 3);
            }
            assert_eq!(nice(), before);
            let _none = Priority::adjust(0).unwrap();
            assert_eq!(nice(), before);
        })
        .join()
        .unwrap();
    }
}
