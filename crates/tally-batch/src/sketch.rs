//! Mergeable distinct-visitor sketches (HyperLogLog++ style), one per (URL, UTC day).
//!
//! A [`VisitorSketch`] is what the batch view stores, what the speed layer can build the same
//! way, and what the serving layer merges across days and layers:
//!
//! - every visitor id is hashed with [`visitor_hash`]: the high 32 bits of SipHash-1-3 with the
//!   fixed keys [`SKETCH_KEYS`] over the UTF-8 bytes of the id, so sketches built by any process
//!   merge (32 bits are plenty for per-URL-day cardinalities and halve the stored size);
//! - **sparse** while small: the sorted distinct hashes (exact count up to 32-bit collisions),
//!   until it would be larger than the dense form (`2^p / 4` hashes);
//! - **dense** after that: `2^p` one-byte registers (index = top `p` bits of the hash, value =
//!   leading zeros of the remaining bits + 1), estimated like HyperLogLog++ (linear counting
//!   below the empirical threshold of the HLL++ paper, raw estimate above). Standard error
//!   `1.04 / sqrt(2^p)`.
//!
//! Why not `hyperloglogplus::HyperLogLogPlus` itself: its serde form needs a serialisable
//! `BuildHasher`, and is large (JSON of private fields); merge semantics are the same (union of
//! hashes / max of registers), and the registers here are stored compactly
//! ([`VisitorSketch::to_bytes`]).

use crate::error::{Error, Result};

pub use tally_core::sketch::SKETCH_KEYS;
use tally_core::sketch::{set_register, sparse_limit};

pub const MIN_PRECISION: u8 = 4;
pub const MAX_PRECISION: u8 = 18;

const FORMAT_V1: u8 = 1;
const KIND_SPARSE: u8 = 0;
const KIND_DENSE: u8 = 1;

/// The 32-bit hash of a visitor id that every sketch is built from (see
/// [`tally_core::sketch`]: the high 32 bits of SipHash-1-3 under [`SKETCH_KEYS`]).
pub fn visitor_hash(visitor: &str) -> u32 {
    tally_core::sketch::visitor_hash32(visitor.as_bytes())
}

/// [`visitor_hash`] over raw bytes.
pub fn visitor_hash_bytes(bytes: &[u8]) -> u32 {
    tally_core::sketch::visitor_hash32(bytes)
}

/// `1.04 / sqrt(2^p)`: the relative standard error of a sketch of precision `p`.
pub fn relative_error(precision: u8) -> f64 {
    1.04 / ((1u64 << precision) as f64).sqrt()
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Repr {
    /// Sorted, distinct hashes.
    Sparse(Vec<u32>),
    /// `2^p` registers.
    Dense(Box<[u8]>),
}

/// A distinct-count sketch of visitor hashes. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VisitorSketch {
    precision: u8,
    repr: Repr,
}

impl VisitorSketch {
    /// An empty sketch. `precision` must be in `4..=18`.
    pub fn new(precision: u8) -> Result<VisitorSketch> {
        check_precision(precision)?;
        Ok(VisitorSketch {
            precision,
            repr: Repr::Sparse(Vec::new()),
        })
    }

    /// Builds a sketch from hashes in any order (duplicates allowed).
    pub fn from_hashes(precision: u8, mut hashes: Vec<u32>) -> Result<VisitorSketch> {
        check_precision(precision)?;
        hashes.sort_unstable();
        hashes.dedup();
        Ok(Self::from_sorted_distinct(precision, hashes))
    }

    /// Builds a sketch from sorted distinct hashes (caller guarantees it).
    pub(crate) fn from_sorted_distinct(precision: u8, hashes: Vec<u32>) -> VisitorSketch {
        let mut s = VisitorSketch {
            precision,
            repr: Repr::Sparse(hashes),
        };
        s.maybe_densify();
        s
    }

    /// A dense sketch from `2^precision` registers built elsewhere with
    /// [`tally_core::sketch::set_register`] (the speed layer keeps them for busy URL-days).
    /// The caller guarantees they hold more than the sparse limit of distinct hashes, as a
    /// sketch built from those hashes would be dense too.
    pub fn from_registers(precision: u8, regs: Box<[u8]>) -> Result<VisitorSketch> {
        check_precision(precision)?;
        if regs.len() != 1usize << precision {
            return Err(Error::Invalid(format!(
                "{} registers for precision {precision}, not {}",
                regs.len(),
                1usize << precision
            )));
        }
        Ok(VisitorSketch {
            precision,
            repr: Repr::Dense(regs),
        })
    }

    pub fn precision(&self) -> u8 {
        self.precision
    }

    pub fn is_sparse(&self) -> bool {
        matches!(self.repr, Repr::Sparse(_))
    }

    fn sparse_limit(&self) -> usize {
        sparse_limit(self.precision)
    }

    fn maybe_densify(&mut self) {
        if let Repr::Sparse(h) = &self.repr {
            if h.len() > self.sparse_limit() {
                let mut regs = vec![0u8; 1 << self.precision].into_boxed_slice();
                for &x in h {
                    set_register(&mut regs, self.precision, x);
                }
                self.repr = Repr::Dense(regs);
            }
        }
    }

    /// Adds a visitor id.
    pub fn insert(&mut self, visitor: &str) {
        self.insert_hash(visitor_hash(visitor));
    }

    /// Adds a visitor hash (see [`visitor_hash`]).
    pub fn insert_hash(&mut self, hash: u32) {
        match &mut self.repr {
            Repr::Sparse(h) => {
                if let Err(i) = h.binary_search(&hash) {
                    h.insert(i, hash);
                    self.maybe_densify();
                }
            }
            Repr::Dense(regs) => set_register(regs, self.precision, hash),
        }
    }

    /// Merges `other` into `self` (set union). Precisions must be equal.
    pub fn merge(&mut self, other: &VisitorSketch) -> Result<()> {
        if self.precision != other.precision {
            return Err(Error::Invalid(format!(
                "cannot merge sketches of precision {} and {}",
                self.precision, other.precision
            )));
        }
        match (&mut self.repr, &other.repr) {
            (Repr::Sparse(a), Repr::Sparse(b)) => {
                let mut out = Vec::with_capacity(a.len() + b.len());
                let (mut i, mut j) = (0, 0);
                while i < a.len() && j < b.len() {
                    match a[i].cmp(&b[j]) {
                        std::cmp::Ordering::Less => {
                            out.push(a[i]);
                            i += 1;
                        }
                        std::cmp::Ordering::Greater => {
                            out.push(b[j]);
                            j += 1;
                        }
                        std::cmp::Ordering::Equal => {
                            out.push(a[i]);
                            i += 1;
                            j += 1;
                        }
                    }
                }
                out.extend_from_slice(&a[i..]);
                out.extend_from_slice(&b[j..]);
                *a = out;
                self.maybe_densify();
            }
            (Repr::Dense(a), Repr::Sparse(b)) => {
                for &x in b {
                    set_register(a, self.precision, x);
                }
            }
            (Repr::Sparse(a), Repr::Dense(b)) => {
                let mut regs = b.clone();
                for &x in a.iter() {
                    set_register(&mut regs, self.precision, x);
                }
                self.repr = Repr::Dense(regs);
            }
            (Repr::Dense(a), Repr::Dense(b)) => {
                for (x, y) in a.iter_mut().zip(b.iter()) {
                    *x = (*x).max(*y);
                }
            }
        }
        Ok(())
    }

    /// The union of `sketches` (all of precision `precision`) and `extra` hashes (sorted,
    /// distinct), in one pass: a k-way merge of the sparse lists, or max of registers, where
    /// merging one by one copies the growing sparse list at every step (30 day sketches of a
    /// busy URL cost 30 copies).
    pub fn union<'a>(
        precision: u8,
        sketches: impl IntoIterator<Item = &'a VisitorSketch> + Clone,
        extra: &[u32],
    ) -> Result<VisitorSketch> {
        Self::union_lists(precision, sketches, &[extra])
    }

    /// [`VisitorSketch::union`] with several lists of hashes (each sorted and distinct; the
    /// same hash may be in several).
    pub fn union_lists<'a>(
        precision: u8,
        sketches: impl IntoIterator<Item = &'a VisitorSketch> + Clone,
        extra: &[&[u32]],
    ) -> Result<VisitorSketch> {
        check_precision(precision)?;
        let mut sparse_len: usize = extra.iter().map(|l| l.len()).sum();
        let mut any_dense = false;
        for s in sketches.clone() {
            if s.precision != precision {
                return Err(Error::Invalid(format!(
                    "cannot merge sketches of precision {} and {precision}",
                    s.precision
                )));
            }
            match &s.repr {
                Repr::Sparse(h) => sparse_len += h.len(),
                Repr::Dense(_) => any_dense = true,
            }
        }
        let mut lists: Vec<&[u32]> = sketches
            .clone()
            .into_iter()
            .filter_map(|s| match &s.repr {
                Repr::Sparse(h) => Some(h.as_slice()),
                Repr::Dense(_) => None,
            })
            .collect();
        lists.extend_from_slice(extra);
        if !any_dense {
            // A k-way merge of the sorted lists: distinct hashes in order, exact while they stay
            // under the sparse limit, registers from the moment they pass it.
            let limit = sparse_limit(precision);
            let mut heap: std::collections::BinaryHeap<std::cmp::Reverse<(u32, usize, usize)>> =
                lists
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| !l.is_empty())
                    .map(|(i, l)| std::cmp::Reverse((l[0], i, 0)))
                    .collect();
            let mut out: Vec<u32> = Vec::with_capacity(sparse_len.min(limit + 1));
            while let Some(std::cmp::Reverse((x, i, j))) = heap.pop() {
                if out.last() != Some(&x) {
                    out.push(x);
                    if out.len() > limit {
                        // Dense from here: every remaining hash sets its register.
                        let mut regs = vec![0u8; 1 << precision].into_boxed_slice();
                        for &h in &out {
                            set_register(&mut regs, precision, h);
                        }
                        for std::cmp::Reverse((_, i, j)) in heap.drain() {
                            for &h in &lists[i][j..] {
                                set_register(&mut regs, precision, h);
                            }
                        }
                        for &h in &lists[i][j + 1..] {
                            set_register(&mut regs, precision, h);
                        }
                        return Ok(VisitorSketch {
                            precision,
                            repr: Repr::Dense(regs),
                        });
                    }
                }
                if let Some(&next) = lists[i].get(j + 1) {
                    heap.push(std::cmp::Reverse((next, i, j + 1)));
                }
            }
            return Ok(Self::from_sorted_distinct(precision, out));
        }
        let mut regs = vec![0u8; 1 << precision].into_boxed_slice();
        for s in sketches {
            match &s.repr {
                Repr::Dense(b) => {
                    for (x, y) in regs.iter_mut().zip(b.iter()) {
                        *x = (*x).max(*y);
                    }
                }
                Repr::Sparse(h) => {
                    for &x in h {
                        set_register(&mut regs, precision, x);
                    }
                }
            }
        }
        for &x in extra.iter().copied().flatten() {
            set_register(&mut regs, precision, x);
        }
        Ok(VisitorSketch {
            precision,
            repr: Repr::Dense(regs),
        })
    }

    /// Estimated number of distinct visitors (exact while sparse).
    pub fn estimate(&self) -> f64 {
        match &self.repr {
            Repr::Sparse(h) => h.len() as f64,
            Repr::Dense(regs) => dense_estimate(regs, self.precision),
        }
    }

    /// Compact binary form: `[1, precision, kind]` then either the sparse hashes as u32 LE or
    /// the `2^p` dense registers.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![FORMAT_V1, self.precision];
        match &self.repr {
            Repr::Sparse(h) => {
                out.push(KIND_SPARSE);
                out.reserve(h.len() * 4);
                for x in h {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
            Repr::Dense(r) => {
                out.push(KIND_DENSE);
                out.extend_from_slice(r);
            }
        }
        out
    }

    /// Parses [`VisitorSketch::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Result<VisitorSketch> {
        let bad = |why: &str| Error::Invalid(format!("invalid sketch bytes: {why}"));
        if b.len() < 3 || b[0] != FORMAT_V1 {
            return Err(bad("header"));
        }
        let precision = b[1];
        check_precision(precision)?;
        let body = &b[3..];
        match b[2] {
            KIND_SPARSE => {
                if body.len() % 4 != 0 {
                    return Err(bad("sparse length"));
                }
                let h: Vec<u32> = body
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect();
                if h.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(bad("sparse hashes not sorted"));
                }
                Ok(VisitorSketch {
                    precision,
                    repr: Repr::Sparse(h),
                })
            }
            KIND_DENSE => {
                if body.len() != 1 << precision {
                    return Err(bad("dense length"));
                }
                Ok(VisitorSketch {
                    precision,
                    repr: Repr::Dense(body.into()),
                })
            }
            _ => Err(bad("kind")),
        }
    }
}

fn check_precision(p: u8) -> Result<()> {
    if (MIN_PRECISION..=MAX_PRECISION).contains(&p) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "sketch precision must be in {MIN_PRECISION}..={MAX_PRECISION}, not {p}"
        )))
    }
}

/// Linear-counting thresholds from the HLL++ paper (Heule et al. 2013), indexed by `p - 4`.
const THRESHOLDS: [f64; 15] = [
    10.0, 20.0, 40.0, 80.0, 220.0, 400.0, 900.0, 1800.0, 3100.0, 6500.0, 11500.0, 20000.0, 50000.0,
    120000.0, 350000.0,
];

fn dense_estimate(regs: &[u8], p: u8) -> f64 {
    let m = regs.len() as f64;
    let alpha = match regs.len() {
        16 => 0.673,
        32 => 0.697,
        64 => 0.709,
        _ => 0.7213 / (1.0 + 1.079 / m),
    };
    let mut sum = 0.0f64;
    let mut zeros = 0usize;
    for &r in regs {
        sum += f64::from_bits((1023u64 - u64::from(r)) << 52); // 2^-r
        zeros += usize::from(r == 0);
    }
    let raw = alpha * m * m / sum;
    if zeros > 0 {
        let lc = m * (m / zeros as f64).ln();
        if lc <= THRESHOLDS[usize::from(p - MIN_PRECISION)] || raw <= 2.5 * m {
            return lc;
        }
    }
    raw
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The one-pass union equals merging one by one, for any mix of sparse and dense
        /// sketches (precision 6: dense from 16 distinct hashes) and extra hashes.
        #[test]
        fn union_equals_merging_one_by_one(
            sets in proptest::collection::vec(proptest::collection::vec(0u32..200, 0..40), 0..6),
            extra in proptest::collection::vec(0u32..200, 0..30),
        ) {
            let sketches: Vec<VisitorSketch> = sets
                .iter()
                .map(|h| VisitorSketch::from_hashes(6, h.iter().map(|x| x.wrapping_mul(0x9e37_79b9)).collect()).unwrap())
                .collect();
            let mut extra: Vec<u32> = extra.iter().map(|x| x.wrapping_mul(0x9e37_79b9)).collect();
            extra.sort_unstable();
            extra.dedup();
            let mut one_by_one = VisitorSketch::new(6).unwrap();
            for s in &sketches {
                one_by_one.merge(s).unwrap();
            }
            one_by_one.merge(&VisitorSketch::from_hashes(6, extra.clone()).unwrap()).unwrap();
            let union = VisitorSketch::union(6, &sketches, &extra).unwrap();
            proptest::prop_assert_eq!(union.estimate(), one_by_one.estimate());
            proptest::prop_assert_eq!(union.is_sparse(), one_by_one.is_sparse());
        }
    }

    /// The visitor hash and the byte form are stored (batch views, Redis visitor sets) and merged
    /// across versions: a change to either must fail here, and then needs a new `FORMAT_*`, view
    /// format and Redis layout, not a silent edit.
    #[test]
    fn visitor_hash_and_byte_form_are_pinned() {
        let hashes: Vec<u32> = ["v-1", "visitor", ""]
            .iter()
            .map(|v| visitor_hash(v))
            .collect();
        assert_eq!(hashes, GOLDEN_HASHES, "{hashes:#010x?}");
        let mut sparse = VisitorSketch::new(4).unwrap();
        sparse.insert("a");
        sparse.insert("b");
        assert_eq!(sparse.to_bytes(), GOLDEN_SPARSE, "{:?}", sparse.to_bytes());
        let mut dense = VisitorSketch::new(4).unwrap();
        for i in 0..100 {
            dense.insert(&format!("v{i}"));
        }
        assert!(!dense.is_sparse());
        assert_eq!(dense.to_bytes(), GOLDEN_DENSE, "{:?}", dense.to_bytes());
    }

    const GOLDEN_HASHES: [u32; 3] = [0xb325_b88f, 0x08bc_c8cd, 0x9db4_9a02];
    const GOLDEN_SPARSE: &[u8] = &[1, 4, 0, 19, 173, 86, 175, 116, 224, 44, 255];
    const GOLDEN_DENSE: &[u8] = &[1, 4, 1, 7, 6, 7, 4, 3, 2, 5, 11, 5, 2, 3, 2, 3, 3, 3, 5];

    #[test]
    fn sparse_is_exact_and_merges() {
        let mut a = VisitorSketch::new(14).unwrap();
        let mut b = VisitorSketch::new(14).unwrap();
        for i in 0..100 {
            a.insert(&format!("v{i}"));
        }
        for i in 50..150 {
            b.insert(&format!("v{i}"));
        }
        a.merge(&b).unwrap();
        assert!(a.is_sparse());
        assert_eq!(a.estimate(), 150.0);
        let back = VisitorSketch::from_bytes(&a.to_bytes()).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn dense_estimates_within_error_and_round_trips() {
        for &n in &[3_000usize, 20_000, 200_000] {
            let mut s = VisitorSketch::new(12).unwrap();
            for i in 0..n {
                s.insert(&format!("visitor-{i}"));
            }
            assert!(!s.is_sparse());
            let e = s.estimate();
            let rel = (e - n as f64).abs() / n as f64;
            assert!(rel < 5.0 * relative_error(12), "n={n} e={e}");
            assert_eq!(VisitorSketch::from_bytes(&s.to_bytes()).unwrap(), s);
        }
    }

    #[test]
    fn merge_sparse_into_dense_equals_union() {
        let mut all = VisitorSketch::new(10).unwrap();
        let mut a = VisitorSketch::new(10).unwrap();
        let mut b = VisitorSketch::new(10).unwrap();
        for i in 0..5000 {
            let v = format!("x{i}");
            all.insert(&v);
            if i % 3 == 0 {
                b.insert(&v)
            } else {
                a.insert(&v)
            }
        }
        let mut ab = a.clone();
        ab.merge(&b).unwrap();
        let mut ba = b.clone();
        ba.merge(&a).unwrap();
        assert_eq!(ab, all);
        assert_eq!(ba, all);
        assert!(VisitorSketch::new(11).unwrap().merge(&a).is_err());
    }
}
