//! The merge: pure functions that combine the batch view and the speed layer. They know
//! nothing of how either is computed.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use tally_core::{month_start, DAY_MS, HOUR_MS};

/// Bucket size of a `series`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Total,
    Hour,
    Day,
    Month,
}

impl Granularity {
    pub fn parse(s: &str) -> Option<Granularity> {
        match s {
            "total" => Some(Granularity::Total),
            "hour" => Some(Granularity::Hour),
            "day" => Some(Granularity::Day),
            "month" => Some(Granularity::Month),
            _ => None,
        }
    }

    /// Start (epoch ms) of the bucket holding the hour `hour`.
    pub fn bucket_start(self, hour: i64) -> i64 {
        let ms = hour * HOUR_MS;
        match self {
            Granularity::Total | Granularity::Hour => ms,
            Granularity::Day => ms.div_euclid(DAY_MS) * DAY_MS,
            Granularity::Month => month_start(ms),
        }
    }
}

/// Sums hourly counts from any number of sources into calendar buckets, keeping only buckets
/// with views, ordered by start.
pub fn bucket_series<I>(hours: I, granularity: Granularity) -> Vec<(i64, u64)>
where
    I: IntoIterator<Item = (i64, u64)>,
{
    let mut buckets: BTreeMap<i64, u64> = BTreeMap::new();
    for (hour, views) in hours {
        if views > 0 {
            *buckets.entry(granularity.bucket_start(hour)).or_default() += views;
        }
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
        let h1 = 1_769_900_400_000 / HOUR_MS;
        let s = bucket_series(vec![(h1, 2), (h1 + 1, 3), (h1 + 2, 0)], Granularity::Month);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].1, 2);
        assert_eq!(s[1].1, 3);
        let d = bucket_series(vec![(h1 + 1, 1), (h1 + 2, 1)], Granularity::Day);
        assert_eq!(d, vec![((h1 + 1) * HOUR_MS, 2)]);
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
