//! Core types of tally: events, their validation and URL normalisation, sequence numbers and
//! time buckets. No I/O of any kind lives here.

pub mod dims;
pub mod error;
pub mod event;
pub mod hash;
pub mod metrics;
pub mod priority;
pub mod seq;
pub mod sketch;
pub mod sync;
pub mod time;
pub mod url;
pub mod zone;

pub use event::{parse_body, BodyError, BodyFormat, Event, EventError, IngestLimits};
pub use seq::Seq;
pub use time::{
    cell_of, checked_ts, day_of, format_rfc3339, hour_of, month_start, now_ms, parse_ts_param,
    parse_ts_str, CELLS_PER_HOUR, CELL_MS, DAY_MS, HOUR_MS, MAX_TS_MS, MIN_TS_MS,
};
pub use url::{normalize_url, UrlError};
pub use zone::{Granularity, Zone};

/// Folds each run of equal keys of `v` (sorted by key) into its first entry, holding the sum of
/// the run's counts: cells read from several sources become one ascending list.
pub fn sum_runs<K: PartialEq>(v: &mut Vec<(K, u64)>) {
    v.dedup_by(|b, a| {
        if a.0 == b.0 {
            a.1 += b.1;
            true
        } else {
            false
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn sum_runs_adds_up_equal_neighbours() {
        let mut v = vec![(1, 2), (1, 3), (2, 1), (5, 1), (5, 1), (5, 1)];
        super::sum_runs(&mut v);
        assert_eq!(v, vec![(1, 5), (2, 1), (5, 3)]);
        let mut empty: Vec<(u8, u64)> = Vec::new();
        super::sum_runs(&mut empty);
        assert!(empty.is_empty());
    }
}
