//! Our visitor sketch (`tally_batch::VisitorSketch`) against the `hyperloglogplus` crate's
//! `HyperLogLogPlus`, on the batch layer's workload: one sketch per (URL, day), built from a
//! stream of visits, then each URL's 30 days merged and estimated (what `/v1/uniques` over 30
//! days does). Same precision for both; `hyperloglogplus` gets a fixed-key, serialisable hasher
//! (SipHash-1-3 with zero keys, as std's `DefaultHasher::new()`), the setup its use would need.
//!
//! ```text
//! cargo run --release -p tally-batch --example sketch_eval -- [--urls 20000] [--days 30] [--events 10000000] [--precision 14]
//! ```
//! Prints one JSON object per implementation: build time, heap held by the sketches (a counting
//! allocator), serialised bytes (ours: its byte form; theirs: serde JSON, the only serde format in
//! the tree), merge + estimate time for every URL's 30 days, and the mean relative error of those
//! estimates against the exact distinct counts for URLs with at least 1 000 visitors.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::hash_map::DefaultHasher;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use hyperloglogplus::{HyperLogLog, HyperLogLogPlus};
use tally_batch::VisitorSketch;
use tally_core::sketch::visitor_hash32;

/// Counts the bytes currently allocated.
struct Counting;
static HELD: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed through to `System` unchanged; only a counter is updated.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        HELD.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: as the caller's contract for `GlobalAlloc::alloc`.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        HELD.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: as the caller's contract for `GlobalAlloc::dealloc`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        HELD.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: as the caller's contract for `GlobalAlloc::realloc`.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// A fixed-key hasher that serde can store (a unit struct): what `hyperloglogplus` needs for
/// sketches that merge across processes and runs.
#[derive(Clone, Copy, serde::Serialize, serde::Deserialize)]
struct FixedSip;

impl BuildHasher for FixedSip {
    type Hasher = DefaultHasher;
    fn build_hasher(&self) -> DefaultHasher {
        DefaultHasher::new()
    }
}

type Theirs = HyperLogLogPlus<u32, FixedSip>;

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

/// xorshift64*.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let urls = arg(&args, "--urls", 20_000) as usize;
    let days = arg(&args, "--days", 30) as usize;
    let events = arg(&args, "--events", 10_000_000) as usize;
    let p = arg(&args, "--precision", 14) as u8;

    // Visits: URL by Zipf(1), day uniform, visitor from a pool that grows with the URL's
    // popularity (popular pages have many distinct visitors), hashed as the batch layer does.
    let hn = (urls as f64).ln() + 0.5772;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let visits: Vec<(u32, u32)> = (0..events)
        .map(|_| {
            let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
            let url = ((u * hn).exp() - 0.5).clamp(0.0, urls as f64 - 1.0) as usize;
            let day = (rng.next() % days as u64) as usize;
            let pool = 1 + 2_000_000 / (url as u64 + 1);
            let visitor = rng.next() % pool;
            let h = visitor_hash32(format!("v{visitor}").as_bytes());
            ((url * days + day) as u32, h)
        })
        .collect();
    // The truth: distinct visitors per URL over all days.
    let mut exact: Vec<Vec<u32>> = vec![Vec::new(); urls];
    for &(slot, h) in &visits {
        exact[slot as usize / days].push(h);
    }
    for v in &mut exact {
        v.sort_unstable();
        v.dedup();
    }
    let judged: Vec<usize> = (0..urls).filter(|&u| exact[u].len() >= 1000).collect();

    // ----- ours ---------------------------------------------------------------------------------
    let before = HELD.load(Ordering::Relaxed);
    let t = Instant::now();
    let mut ours: Vec<Option<VisitorSketch>> = (0..urls * days).map(|_| None).collect();
    for &(slot, h) in &visits {
        ours[slot as usize]
            .get_or_insert_with(|| VisitorSketch::new(p).expect("precision"))
            .insert_hash(h);
    }
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let heap = HELD.load(Ordering::Relaxed) - before;
    let ser: usize = ours.iter().flatten().map(|s| s.to_bytes().len()).sum();
    let t = Instant::now();
    let mut estimates = vec![0.0; urls];
    for (u, e) in estimates.iter_mut().enumerate() {
        let mut acc = VisitorSketch::new(p).expect("precision");
        for s in ours[u * days..(u + 1) * days].iter().flatten() {
            acc.merge(s).expect("same precision");
        }
        *e = acc.estimate();
    }
    let merge_ms = t.elapsed().as_secs_f64() * 1e3;
    let err = mean_relative_error(&estimates, &exact, &judged);
    report(
        "tally VisitorSketch",
        p,
        build_ms,
        heap,
        ser,
        merge_ms,
        err,
        judged.len(),
    );
    drop(ours);

    // ----- hyperloglogplus ------------------------------------------------------------------------
    let before = HELD.load(Ordering::Relaxed);
    let t = Instant::now();
    let mut theirs: Vec<Option<Theirs>> = (0..urls * days).map(|_| None).collect();
    for &(slot, h) in &visits {
        theirs[slot as usize]
            .get_or_insert_with(|| Theirs::new(p, FixedSip).expect("precision"))
            .insert(&h);
    }
    // Their inserts buffer in a hash set until a count or merge; flush every sketch so that what
    // is held is what would be stored.
    for s in theirs.iter_mut().flatten() {
        s.count();
    }
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let heap = HELD.load(Ordering::Relaxed) - before;
    let ser: usize = theirs
        .iter()
        .flatten()
        .map(|s| serde_json::to_vec(s).expect("serialise").len())
        .sum();
    let t = Instant::now();
    for (u, e) in estimates.iter_mut().enumerate() {
        let mut acc = Theirs::new(p, FixedSip).expect("precision");
        for s in theirs[u * days..(u + 1) * days].iter().flatten() {
            acc.merge(s).expect("same precision");
        }
        *e = acc.count();
    }
    let merge_ms = t.elapsed().as_secs_f64() * 1e3;
    let err = mean_relative_error(&estimates, &exact, &judged);
    report(
        "hyperloglogplus 0.4 HyperLogLogPlus",
        p,
        build_ms,
        heap,
        ser,
        merge_ms,
        err,
        judged.len(),
    );
}

/// The mean of |estimate − exact| / exact over the URLs `judged`.
fn mean_relative_error(estimates: &[f64], exact: &[Vec<u32>], judged: &[usize]) -> f64 {
    let sum: f64 = judged
        .iter()
        .map(|&u| (estimates[u] - exact[u].len() as f64).abs() / exact[u].len() as f64)
        .sum();
    sum / judged.len() as f64
}

#[allow(clippy::too_many_arguments)]
fn report(
    name: &str,
    p: u8,
    build_ms: f64,
    heap: isize,
    ser: usize,
    merge_ms: f64,
    err: f64,
    judged: usize,
) {
    println!(
        "{}",
        serde_json::json!({
            "sketch": name,
            "precision": p,
            "build_ms": build_ms.round(),
            "heap_bytes": heap,
            "serialised_bytes": ser,
            "merge_30_days_all_urls_ms": merge_ms.round(),
            "mean_relative_error": (err * 1e4).round() / 1e4,
            "urls_judged": judged,
        })
    );
}
