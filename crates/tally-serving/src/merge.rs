//! The merge: pure functions that combine the batch view and the speed layer. They know
//! nothing of how either is computed.

use std::collections::{BTreeMap, HashMap, HashSet};

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

/// Orders by views descending, then URL ascending, and keeps `limit`.
pub fn rank(mut items: Vec<(String, u64)>, limit: usize) -> Vec<(String, u64)> {
    items.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    items.truncate(limit);
    items
}

/// Exact top-N of `batch + speed` where `batch_desc` lists the batch counts already ordered by
/// views descending then URL ascending, and `speed` holds the speed-layer counts (usually few
/// URLs). A URL absent from `speed` keeps its batch count, so among those the batch order is
/// the merged order: it is enough to take the first `limit` of them plus every URL in `speed`.
pub fn top_merge<'a, I>(
    batch_desc: I,
    speed: &HashMap<String, u64>,
    limit: usize,
) -> Vec<(String, u64)>
where
    I: IntoIterator<Item = (&'a str, u64)>,
{
    let mut out: Vec<(String, u64)> = Vec::with_capacity(limit + speed.len());
    let mut seen: HashSet<&str> = HashSet::with_capacity(speed.len());
    let mut others = 0usize;
    for (url, views) in batch_desc {
        if let Some(extra) = speed.get(url) {
            seen.insert(url);
            out.push((url.to_string(), views + extra));
        } else if others < limit {
            others += 1;
            out.push((url.to_string(), views));
        } else if seen.len() == speed.len() {
            break;
        }
    }
    for (url, views) in speed {
        if !seen.contains(url.as_str()) {
            out.push((url.clone(), *views));
        }
    }
    rank(out.into_iter().filter(|(_, v)| *v > 0).collect(), limit)
}

/// Exact top-N from two complete per-URL maps of the range.
pub fn top_from_maps(
    mut batch: HashMap<String, u64>,
    speed: HashMap<String, u64>,
    limit: usize,
) -> Vec<(String, u64)> {
    for (url, v) in speed {
        *batch.entry(url).or_default() += v;
    }
    rank(batch.into_iter().filter(|(_, v)| *v > 0).collect(), limit)
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

    proptest! {
        #[test]
        fn top_merge_equals_full_merge(
            batch in proptest::collection::hash_map("[a-f]{1,2}", 0u64..20, 0..30),
            speed in proptest::collection::hash_map("[a-h]{1,2}", 1u64..20, 0..10),
            limit in 1usize..12,
        ) {
            let mut desc: Vec<(String, u64)> = batch.clone().into_iter().filter(|x| x.1 > 0).collect();
            desc.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            let fast = top_merge(desc.iter().map(|(u, v)| (u.as_str(), *v)), &speed, limit);
            let full = top_from_maps(batch, speed, limit);
            prop_assert_eq!(fast, full);
        }
    }
}
