//! Hash maps split into shards, so that growing one never moves more than a fraction of its
//! entries at once. The mirror's maps hold one entry per live URL (hundreds of thousands under
//! live traffic) and grow under its write lock; a single map doubling then moved every entry
//! while every query waited (BENCHMARKS.md, "Reading the mixed numbers"). With [`SHARDS`]
//! shards, a growth moves 1/[`SHARDS`] of them.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

use tally_core::hash::FastState;

/// Shards per map: enough that one growth is short, few enough that an empty map is small.
pub(crate) const SHARDS: usize = 64;

/// A `HashMap<K, V>` in [`SHARDS`] shards, chosen by the process-wide hash of the key (so two maps with
/// the same entries have them in the same shards, and compare equal).
#[derive(Debug, Clone)]
pub(crate) struct Sharded<K, V> {
    shards: Vec<HashMap<K, V, FastState>>,
}

impl<K: Hash + Eq, V: PartialEq> PartialEq for Sharded<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.shards == other.shards
    }
}

impl<K: Hash + Eq, V: Eq> Eq for Sharded<K, V> {}

impl<'a, K: Hash + Eq, V> IntoIterator for &'a Sharded<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = std::iter::Flatten<std::slice::Iter<'a, HashMap<K, V, FastState>>>;

    fn into_iter(self) -> Self::IntoIter {
        self.shards.iter().flatten()
    }
}

impl<K, V> Default for Sharded<K, V> {
    fn default() -> Self {
        Sharded {
            shards: (0..SHARDS).map(|_| HashMap::default()).collect(),
        }
    }
}

/// The shard of a key: bits of its hash that the shard's own table does not use for much
/// (hashbrown takes the bucket from the low bits and a tag from the top 7).
fn shard_of<Q: Hash + ?Sized>(key: &Q) -> usize {
    ((FastState.hash_one(key) >> 32) as usize) % SHARDS
}

impl<K: Hash + Eq, V> Sharded<K, V> {
    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[shard_of(key)].get(key)
    }

    pub(crate) fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[shard_of(key)].get_mut(key)
    }

    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.shards[shard_of(&key)].insert(key, value)
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> + '_ {
        self.shards.iter().flat_map(|s| s.iter())
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> + '_ {
        self.shards.iter().flat_map(|s| s.keys())
    }

    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        for s in &mut self.shards {
            s.retain(|k, v| keep(k, v));
        }
    }
}

impl<K, V> IntoIterator for Sharded<K, V> {
    type Item = (K, V);
    type IntoIter = std::iter::Flatten<std::vec::IntoIter<HashMap<K, V, FastState>>>;

    fn into_iter(self) -> Self::IntoIter {
        self.shards.into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn behaves_like_one_map() {
        let mut m: Sharded<Arc<str>, u32> = Sharded::default();
        for i in 0..1000u32 {
            assert_eq!(m.insert(Arc::from(format!("u{i}")), i), None);
        }
        assert_eq!(m.len(), 1000);
        assert_eq!(m.get("u7"), Some(&7));
        *m.get_mut("u7").unwrap() += 1;
        assert_eq!(m.get("u7"), Some(&8));
        assert_eq!(m.get("nope"), None);
        assert_eq!(m.insert(Arc::from("new"), 5), None);
        assert_eq!(m.get("new"), Some(&5));
        m.retain(|_, v| *v % 2 == 0);
        assert_eq!(m.len(), 501);
        let mut same: Sharded<Arc<str>, u32> = Sharded::default();
        for (k, v) in m.iter() {
            same.insert(k.clone(), *v);
        }
        assert_eq!(same, m);
        assert_eq!(m.keys().count(), 501);
        assert_eq!(m.into_iter().count(), 501);
    }
}
