//! The hasher of the in-memory maps on the hot paths (the speed mirror, the rankings, the batch
//! view's URL index): aHash, keyed once per process with random keys.
//!
//! Those maps are keyed by URLs and visitor hashes that clients choose, so the hash must be
//! keyed (a fixed hash lets crafted keys collide into one bucket); std's `RandomState`
//! (SipHash-1-3) is keyed but was a tenth of the applier's time on URL keys. aHash is keyed as
//! well, and several times faster on short keys. One key per process rather than per map: a
//! visitor set per (URL, day) would otherwise carry 32 bytes of keys each.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::OnceLock;

/// Builds aHash hashers with this process's random keys. A zero-sized type: maps and sets
/// that use it are no larger than with no state at all.
#[derive(Debug, Clone, Copy, Default)]
pub struct FastState;

impl BuildHasher for FastState {
    type Hasher = ahash::AHasher;

    fn build_hasher(&self) -> ahash::AHasher {
        static KEYS: OnceLock<ahash::RandomState> = OnceLock::new();
        KEYS.get_or_init(ahash::RandomState::new).build_hasher()
    }
}

pub type FastMap<K, V> = HashMap<K, V, FastState>;
pub type FastSet<T> = HashSet<T, FastState>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_per_process() {
        // Equal keys hash equally across maps (shards of one map rely on it) ...
        assert_eq!(FastState.hash_one("a/b"), FastState.hash_one("a/b"));
        assert_ne!(FastState.hash_one("a/b"), FastState.hash_one("a/c"));
        // ... and the maps behave like maps.
        let mut m: FastMap<String, u32> = FastMap::default();
        m.insert("x".into(), 1);
        *m.entry("x".into()).or_default() += 1;
        assert_eq!(m.get("x"), Some(&2));
    }
}
