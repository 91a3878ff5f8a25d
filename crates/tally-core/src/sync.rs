//! One policy for poisoned locks: carry on. A `std::sync` lock is poisoned when a thread panics
//! while holding it. The panic is already reported (logged, and for the threads that matter
//! supervised: a dead WAL writer or sealer shows in `/readyz` and turns ingestion into `503`s;
//! the applier reloads its mirror after a panic mid-apply), and every structure behind these
//! locks is changed in steps that each leave it usable — a run's state, the run history, the
//! epoch list, the in-memory tail (events enter it after the WAL made them durable), caches. So
//! the next holder takes the data as it is, rather than panicking in turn and turning one bug
//! into a process that can no longer answer. Every lock in the workspace goes through these.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `m`, also when a panic poisoned it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Read-locks `l`, also when a panic poisoned it.
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// Write-locks `l`, also when a panic poisoned it.
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_gives_its_data() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let l = std::sync::Arc::new(RwLock::new(2));
        let (m2, l2) = (m.clone(), l.clone());
        let _ = std::thread::spawn(move || {
            let _g = m2.lock();
            let _w = l2.write();
            panic!("poison both");
        })
        .join();
        assert!(m.is_poisoned() && l.is_poisoned());
        *lock(&m) += 1;
        *write(&l) += 1;
        assert_eq!((*lock(&m), *read(&l)), (2, 3));
    }
}
