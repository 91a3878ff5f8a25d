//! The merge: pure functions that combine the batch view and the speed layer. They know
//! nothing of how either is computed.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use tally_core::{Granularity, Zone, CELL_MS, DAY_MS};

/// Sums per-cell counts from any number of sources into the local buckets of `zone`, keeping
/// only buckets with views, ordered by start (epoch ms). Cells arrive from each source in
/// ascending order, so the bucket of the previous cell is reused while it lasts.
pub fn bucket_series<I>(cells: I, granularity: Granularity, zone: Zone) -> Vec<(i64, u64)>
where
    I: IntoIterator<Item = (i64, u64)>,
{
    let mut buckets: BTreeMap<i64, u64> = BTreeMap::new();
    // The last bucket computed: cells in [lo, hi) start at `start`.
    let (mut lo, mut hi, mut start) = (0i64, 0i64, 0i64);
    for (cell, views) in cells {
        if views == 0 {
            continue;
        }
        let t = cell * CELL_MS;
        if !(lo..hi).contains(&t) {
            start = zone.bucket_start(t, granularity);
            lo = start;
            hi = match granularity {
                Granularity::Day => zone.next_day_start(t),
                // Any instant 32 days after a month's start is in the next month.
                Granularity::Month => zone.month_start(start + 32 * DAY_MS),
                Granularity::Hour | Granularity::Total => t + CELL_MS,
            };
        }
        *buckets.entry(start).or_default() += views;
    }
    buckets.into_iter().collect()
}

/// One candidate of a top-N, ordered so that the *worse* entry is the greater: fewer views,
/// then (on a tie) the larger URL. A max-heap of these then has the worst kept entry on top.
#[derive(Debug, PartialEq, Eq)]
struct Ranked<'a> {
    views: u64,
    url: &'a str,
}

impl Ord for Ranked<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .views
            .cmp(&self.views)
            .then_with(|| self.url.cmp(other.url))
    }
}

impl PartialOrd for Ranked<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Keeps the `limit` best `(url, views)` seen — views descending, then URL ascending — in
/// `O(n log limit)` without copying URLs until the end.
pub struct TopN<'a> {
    limit: usize,
    heap: BinaryHeap<Ranked<'a>>,
}

impl<'a> TopN<'a> {
    pub fn new(limit: usize) -> TopN<'a> {
        TopN {
            limit,
            heap: BinaryHeap::with_capacity(limit + 1),
        }
    }

    pub fn push(&mut self, url: &'a str, views: u64) {
        if views == 0 || self.limit == 0 {
            return;
        }
        let entry = Ranked { views, url };
        if self.heap.len() < self.limit {
            self.heap.push(entry);
        } else if self.heap.peek().is_some_and(|worst| entry < *worst) {
            self.heap.pop();
            self.heap.push(entry);
        }
    }

    /// Best first.
    pub fn into_vec(self) -> Vec<(String, u64)> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|r| (r.url.to_string(), r.views))
            .collect()
    }
}

/// Exact top-N of a range from two per-URL maps of it.
pub fn top_from_maps<'a>(
    batch: impl IntoIterator<Item = (&'a str, u64)>,
    speed: &HashMap<&'a str, u64>,
    limit: usize,
) -> Vec<(String, u64)> {
    let mut merged: HashMap<&'a str, u64> = speed.clone();
    for (url, n) in batch {
        *merged.entry(url).or_default() += n;
    }
    let mut top = TopN::new(limit);
    for (url, n) in merged {
        top.push(url, n);
    }
    top.into_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn buckets_by_calendar() {
        // 2026-01-31T23:00 and 2026-02-01T00:00 fall in different days and months.
        let c = 1_769_900_400_000 / CELL_MS;
        let h = tally_core::CELLS_PER_HOUR;
        let s = bucket_series(
            vec![(c, 2), (c + h, 3), (c + 2 * h, 0)],
            Granularity::Month,
            Zone::UTC,
        );
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].1, 2);
        assert_eq!(s[1].1, 3);
        let d = bucket_series(
            vec![(c + h, 1), (c + 2 * h + 3, 1)],
            Granularity::Day,
            Zone::UTC,
        );
        assert_eq!(d, vec![((c + h) * CELL_MS, 2)]);
        let hours = bucket_series(
            vec![(c, 1), (c + 3, 1), (c + 4, 1)],
            Granularity::Hour,
            Zone::UTC,
        );
        assert_eq!(hours, vec![(c * CELL_MS, 2), ((c + 4) * CELL_MS, 1)]);
    }

    #[test]
    fn buckets_are_local_in_a_zone() {
        // In Asia/Kathmandu (+5:45), 2026-01-31T18:00Z is 23:45 local on the 31st and
        // 18:15Z is 00:00 local on 1 February.
        let zone = Zone::parse("Asia/Kathmandu").unwrap();
        let c = 1_769_882_400_000 / CELL_MS; // 2026-01-31T18:00:00Z
        let d = bucket_series(
            vec![(c, 1), (c + 1, 2), (c + 96, 4)],
            Granularity::Day,
            zone,
        );
        assert_eq!(
            d.iter()
                .map(|(s, v)| (zone.format(*s), *v))
                .collect::<Vec<_>>(),
            vec![
                ("2026-01-31T00:00:00+05:45".to_string(), 1),
                ("2026-02-01T00:00:00+05:45".to_string(), 6)
            ]
        );
        let m = bucket_series(vec![(c, 1), (c + 1, 2)], Granularity::Month, zone);
        assert_eq!(m.len(), 2);
    }

    /// The obvious answer: sum both maps, sort everything.
    fn reference(
        batch: &HashMap<String, u64>,
        speed: &HashMap<String, u64>,
        limit: usize,
    ) -> Vec<(String, u64)> {
        let mut all = batch.clone();
        for (u, v) in speed {
            *all.entry(u.clone()).or_default() += v;
        }
        let mut v: Vec<(String, u64)> = all.into_iter().filter(|x| x.1 > 0).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(limit);
        v
    }

    proptest! {
        #[test]
        fn top_from_maps_equals_the_full_sort(
            batch in proptest::collection::hash_map("[a-f]{1,2}", 0u64..20, 0..30),
            speed in proptest::collection::hash_map("[a-h]{1,2}", 1u64..20, 0..10),
            limit in 1usize..12,
        ) {
            let speed_ref: HashMap<&str, u64> = speed.iter().map(|(u, v)| (u.as_str(), *v)).collect();
            let expected = reference(&batch, &speed, limit);
            let maps = top_from_maps(batch.iter().map(|(u, v)| (u.as_str(), *v)), &speed_ref, limit);
            prop_assert_eq!(&maps, &expected);
        }
    }
}
