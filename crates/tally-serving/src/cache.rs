//! Recent answers of the costly queries, keyed by everything they depend on.
//!
//! An answer is a pure function of the serving view, the speed state (which changes only when
//! the applied seq does) and the parameters, so a hit is exact. Under continuous ingest the
//! applied seq moves every few milliseconds and nearly every query misses: the uncached paths
//! must be fast on their own. `query.result_cache = false` turns the caches off (benchmarks and
//! the tests that check the uncached paths do).

use std::collections::HashMap;
use std::sync::Arc;

/// What a top-N ranking depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopKey {
    pub(crate) version: Option<String>,
    pub(crate) applied: tally_core::Seq,
    pub(crate) limit: usize,
    pub(crate) host: Option<String>,
    pub(crate) from_cell: i64,
    pub(crate) to_cell: i64,
}

/// What a unique-visitor estimate depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UniquesKey {
    pub(crate) version: Option<String>,
    pub(crate) applied: tally_core::Seq,
    pub(crate) url: String,
    /// The uniques' cells `[from, to)`.
    pub(crate) cells: (i64, i64),
}

/// A key that names the speed-layer state it was computed from.
pub trait AtApplied: Eq + std::hash::Hash {
    fn applied(&self) -> tally_core::Seq;
}

impl AtApplied for TopKey {
    fn applied(&self) -> tally_core::Seq {
        self.applied
    }
}

impl AtApplied for UniquesKey {
    fn applied(&self) -> tally_core::Seq {
        self.applied
    }
}

/// Recent answers that are pure functions of the serving view, the speed state (which changes
/// only when the applied seq does) and the parameters. Entries for an older applied seq are
/// never hit again and are dropped when the cache is full.
pub struct ResultCache<K, V> {
    enabled: bool,
    map: std::sync::Mutex<HashMap<K, Arc<V>>>,
}

impl<K, V> ResultCache<K, V> {
    /// A cache; a disabled one never hits and keeps nothing.
    pub fn new(enabled: bool) -> Self {
        ResultCache {
            enabled,
            map: std::sync::Mutex::new(HashMap::new()),
        }
    }
}

/// Recent `/v1/top` rankings (`(url, views)`, best first).
pub type TopCache = ResultCache<TopKey, Vec<(String, u64)>>;
/// Recent `/v1/uniques` answers: `(uniques, exact)`.
pub type UniquesCache = ResultCache<UniquesKey, (u64, bool)>;

const RESULT_CACHE_ENTRIES: usize = 1024;

impl<K: AtApplied, V> ResultCache<K, V> {
    pub(crate) fn get(&self, key: &K) -> Option<Arc<V>> {
        if !self.enabled {
            return None;
        }
        tally_core::sync::lock(&self.map).get(key).cloned()
    }

    pub(crate) fn put(&self, key: K, value: Arc<V>) {
        if !self.enabled {
            return;
        }
        let mut map = tally_core::sync::lock(&self.map);
        if map.len() >= RESULT_CACHE_ENTRIES {
            let applied = key.applied();
            map.retain(|k, _| k.applied() == applied);
            if map.len() >= RESULT_CACHE_ENTRIES {
                map.clear();
            }
        }
        map.insert(key, value);
    }
}
