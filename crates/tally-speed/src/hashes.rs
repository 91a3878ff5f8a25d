//! The distinct visitor hashes of one key in one cell ([`crate::mirror`]): a sorted vector
//! while there are few, a hash set beyond.
//!
//! Most URL-cells of the live epochs hold one to a handful of visitors, and the applier adds
//! to hundreds of thousands of them per second: a hash set per cell cost an allocation of its
//! table, a hash per insert and a cache miss into the table, which made visitor inserts ~45 %
//! of the mirror's apply time (`mirror::bench::apply_throughput`). A sorted vector of up to
//! [`FEW`] hashes is one small allocation searched in a cache line or two; past that, inserts
//! into a vector cost more than hashing, and the set takes over for good.

use tally_core::hash::FastSet;

/// Hashes kept in a sorted vector; one more makes the set a hash set.
pub(crate) const FEW: usize = 32;

#[derive(Debug, Clone)]
pub(crate) enum Hashes {
    /// Ascending, distinct, at most [`FEW`].
    Few(Vec<u32>),
    Many(FastSet<u32>),
}

impl Default for Hashes {
    fn default() -> Self {
        Hashes::Few(Vec::new())
    }
}

impl Hashes {
    /// Adds `h`; `true` when it was not there.
    #[inline]
    pub(crate) fn insert(&mut self, h: u32) -> bool {
        match self {
            Hashes::Few(v) => match v.binary_search(&h) {
                Ok(_) => false,
                Err(i) if v.len() < FEW => {
                    v.insert(i, h);
                    true
                }
                Err(_) => {
                    let mut s = FastSet::with_capacity_and_hasher(2 * FEW, Default::default());
                    s.extend(v.iter().copied());
                    s.insert(h);
                    *self = Hashes::Many(s);
                    true
                }
            },
            Hashes::Many(s) => s.insert(h),
        }
    }

    pub(crate) fn contains(&self, h: u32) -> bool {
        match self {
            Hashes::Few(v) => v.binary_search(&h).is_ok(),
            Hashes::Many(s) => s.contains(&h),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Hashes::Few(v) => v.len(),
            Hashes::Many(s) => s.len(),
        }
    }

    /// Every hash, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let (few, many) = match self {
            Hashes::Few(v) => (Some(v.iter()), None),
            Hashes::Many(s) => (None, Some(s.iter())),
        };
        few.into_iter()
            .flatten()
            .chain(many.into_iter().flatten())
            .copied()
    }
}

/// The same hashes, whichever form holds them.
impl PartialEq for Hashes {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|h| other.contains(h))
    }
}

impl Eq for Hashes {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn behaves_like_a_set_across_the_switch() {
        let mut x: u32 = 0x9e37_79b9;
        let mut h = Hashes::default();
        let mut model = BTreeSet::new();
        for i in 0..500 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            // Every third insert repeats an earlier hash.
            let v = if i % 3 == 2 {
                *model.iter().next().unwrap()
            } else {
                x
            };
            assert_eq!(h.insert(v), model.insert(v), "insert {i}");
            assert_eq!(h.len(), model.len());
            assert!(h.contains(v));
            let few = matches!(h, Hashes::Few(_));
            assert_eq!(few, model.len() <= FEW, "form at {} hashes", model.len());
        }
        assert_eq!(h.iter().collect::<BTreeSet<_>>(), model);
        assert!(!h.contains(0) || model.contains(&0));
    }

    #[test]
    fn equal_when_holding_the_same_hashes_in_either_form() {
        let few = Hashes::Few(vec![1, 2, 3]);
        let many = Hashes::Many([3, 1, 2].into_iter().collect());
        assert_eq!(few, many);
        assert_ne!(few, Hashes::Few(vec![1, 2]));
        assert_ne!(many, Hashes::Many([1, 2, 4].into_iter().collect()));
    }
}
