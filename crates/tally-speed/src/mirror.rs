//! The in-process mirror of the speed state in Redis. The applier changes it only after the
//! corresponding Redis script committed (or after loading it from Redis), so it always equals
//! what Redis holds; queries read it without a Redis round trip.
//!
//! Exactness: a query that uses a batch view with cutoff `C` sums exactly the epochs whose start
//! is `> C`. Epoch starts are always `cutoff + 1` of some batch run, so the epochs summed hold
//! exactly the events with `seq > C` (up to the applied seq): none missed, none counted twice.

use std::collections::{BTreeMap, HashMap, HashSet};

use tally_core::Seq;

use crate::aggregate::EpochDelta;

/// Counts of one URL in one epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UrlCounts {
    /// hour number → views (no zero entries).
    pub(crate) hours: BTreeMap<i64, u64>,
    pub(crate) total: u64,
    /// UTC day number → distinct visitor hashes.
    pub(crate) visitors: BTreeMap<i64, HashSet<u64>>,
}

impl UrlCounts {
    /// Views in the hours `[from_hour, to_hour)`.
    pub(crate) fn range(&self, from_hour: i64, to_hour: i64) -> u64 {
        if from_hour >= to_hour {
            return 0;
        }
        match (self.hours.first_key_value(), self.hours.last_key_value()) {
            (Some((first, _)), Some((last, _))) if from_hour <= *first && to_hour > *last => {
                self.total
            }
            (Some(_), Some(_)) => self.hours.range(from_hour..to_hour).map(|(_, v)| v).sum(),
            _ => 0,
        }
    }
}

/// State of one epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct EpochState {
    /// Last seq of this epoch applied (0: none).
    pub(crate) applied: Seq,
    pub(crate) urls: HashMap<String, UrlCounts>,
}

/// epoch start → state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Mirror {
    pub(crate) epochs: BTreeMap<Seq, EpochState>,
}

impl Mirror {
    /// Adds a committed delta.
    pub(crate) fn apply(&mut self, d: &EpochDelta) {
        let e = self.epochs.entry(d.epoch).or_default();
        for (url, ud) in &d.urls {
            let c = match e.urls.get_mut(url.as_str()) {
                Some(c) => c,
                None => e.urls.entry(url.clone()).or_default(),
            };
            for (h, n) in &ud.hours {
                *c.hours.entry(*h).or_insert(0) += n;
            }
            c.total += ud.total;
            for (day, hashes) in &ud.days {
                c.visitors
                    .entry(*day)
                    .or_default()
                    .extend(hashes.iter().copied());
            }
        }
        e.applied = e.applied.max(d.last);
    }

    pub(crate) fn applied_in(&self, epoch: Seq) -> Seq {
        self.epochs.get(&epoch).map_or(Seq::ZERO, |e| e.applied)
    }

    /// The epochs a query with batch cutoff `after_cutoff` sums: those starting after it.
    fn live_after(&self, after_cutoff: Seq) -> impl Iterator<Item = &EpochState> {
        self.epochs.range(after_cutoff.next()..).map(|(_, e)| e)
    }

    pub(crate) fn views(&self, url: &str, after_cutoff: Seq, from_hour: i64, to_hour: i64) -> u64 {
        self.live_after(after_cutoff)
            .filter_map(|e| e.urls.get(url))
            .map(|c| c.range(from_hour, to_hour))
            .sum()
    }

    /// Non-zero hours of `url` in `[from_hour, to_hour)`, ascending.
    pub(crate) fn hour_counts(
        &self,
        url: &str,
        after_cutoff: Seq,
        from_hour: i64,
        to_hour: i64,
    ) -> Vec<(i64, u64)> {
        if from_hour >= to_hour {
            return Vec::new();
        }
        let mut out: BTreeMap<i64, u64> = BTreeMap::new();
        for c in self
            .live_after(after_cutoff)
            .filter_map(|e| e.urls.get(url))
        {
            for (h, n) in c.hours.range(from_hour..to_hour) {
                *out.entry(*h).or_insert(0) += n;
            }
        }
        out.into_iter().filter(|(_, n)| *n > 0).collect()
    }

    /// Distinct visitor hashes of `url` on the UTC days `[from_day, to_day)`, ascending.
    pub(crate) fn visitor_hashes(
        &self,
        url: &str,
        after_cutoff: Seq,
        from_day: i64,
        to_day: i64,
    ) -> Vec<u64> {
        if from_day >= to_day {
            return Vec::new();
        }
        let mut out: Vec<u64> = Vec::new();
        for c in self
            .live_after(after_cutoff)
            .filter_map(|e| e.urls.get(url))
        {
            for (_, hashes) in c.visitors.range(from_day..to_day) {
                out.extend(hashes.iter().copied());
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// url → views in `[from_hour, to_hour)` for every URL with views there, optionally only
    /// URLs whose host is `host`.
    pub(crate) fn range_totals(
        &self,
        after_cutoff: Seq,
        from_hour: i64,
        to_hour: i64,
        host: Option<&str>,
    ) -> HashMap<String, u64> {
        self.range_totals_borrowed(after_cutoff, from_hour, to_hour, host)
            .into_iter()
            .map(|(u, n)| (u.to_string(), n))
            .collect()
    }

    /// [`range_totals`](Self::range_totals) without copying URLs: the keys borrow from the
    /// mirror (the caller holds its read lock).
    pub(crate) fn range_totals_borrowed(
        &self,
        after_cutoff: Seq,
        from_hour: i64,
        to_hour: i64,
        host: Option<&str>,
    ) -> HashMap<&str, u64> {
        let mut out: HashMap<&str, u64> = HashMap::new();
        for e in self.live_after(after_cutoff) {
            for (url, c) in &e.urls {
                if let Some(h) = host {
                    if tally_core::url::host_of(url) != Some(h) {
                        continue;
                    }
                }
                let n = c.range(from_hour, to_hour);
                if n > 0 {
                    *out.entry(url.as_str()).or_default() += n;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::aggregate;
    use crate::aggregate::tests::ev;
    use tally_core::HOUR_MS;

    fn mirror_of(events: &[tally_master::SeqEvent], epochs: &[Seq]) -> Mirror {
        let mut m = Mirror::default();
        for d in aggregate(events, epochs) {
            m.apply(&d);
        }
        m
    }

    #[test]
    fn range_is_half_open_and_uses_total_for_full_cover() {
        let c = UrlCounts {
            hours: BTreeMap::from([(1, 2), (3, 5), (7, 1)]),
            total: 8,
            visitors: BTreeMap::new(),
        };
        assert_eq!(c.range(i64::MIN, i64::MAX), 8);
        assert_eq!(c.range(1, 8), 8);
        assert_eq!(c.range(1, 7), 7);
        assert_eq!(c.range(2, 4), 5);
        assert_eq!(c.range(4, 4), 0);
        assert_eq!(c.range(5, 2), 0);
        assert_eq!(UrlCounts::default().range(0, 10), 0);
    }

    #[test]
    fn reads_sum_exactly_the_epochs_after_the_cutoff() {
        let h = HOUR_MS;
        let events = vec![
            ev(1, "http://a.com/x", 0),
            ev(2, "http://a.com/x", h),
            ev(3, "http://b.com/y", h),
            // cut at C = 3: epoch 4 starts
            ev(4, "http://a.com/x", h),
            ev(5, "http://a.com/x", 2 * h),
            // cut at C = 5: epoch 6 starts
            ev(6, "http://b.com/y", 2 * h),
        ];
        let m = mirror_of(&events, &[Seq(1), Seq(4), Seq(6)]);
        assert_eq!(m.applied_in(Seq(1)), Seq(3));
        assert_eq!(m.applied_in(Seq(4)), Seq(5));
        assert_eq!(m.applied_in(Seq(9)), Seq(0));
        let x = "http://a.com/x";
        assert_eq!(m.views(x, Seq(0), 0, 10), 4);
        assert_eq!(m.views(x, Seq(3), 0, 10), 2);
        assert_eq!(m.views(x, Seq(5), 0, 10), 0);
        assert_eq!(m.views(x, Seq(0), 1, 2), 2);
        assert_eq!(m.views("nope", Seq(0), 0, 10), 0);
        assert_eq!(
            m.hour_counts(x, Seq(0), 0, 10),
            vec![(0, 1), (1, 2), (2, 1)]
        );
        assert_eq!(m.hour_counts(x, Seq(3), 0, 2), vec![(1, 1)]);
        let all = m.range_totals(Seq(0), 0, 10, None);
        assert_eq!(all.len(), 2);
        assert_eq!(all["http://b.com/y"], 2);
        let after3 = m.range_totals(Seq(3), 2, 3, None);
        assert_eq!(
            after3,
            HashMap::from([("http://a.com/x".into(), 1), ("http://b.com/y".into(), 1)])
        );
        let host_b = m.range_totals(Seq(0), 0, 10, Some("b.com"));
        assert_eq!(host_b, HashMap::from([("http://b.com/y".into(), 2)]));
        assert!(m.range_totals(Seq(0), 5, 10, None).is_empty());
    }

    #[test]
    fn visitor_hashes_are_a_union_over_epochs_and_days() {
        use crate::sketch::visitor_hash;
        use tally_core::DAY_MS;
        let mut events = Vec::new();
        for (seq, v, day) in [
            (1, "x", 0),
            (2, "y", 0),
            (3, "x", 1),
            (4, "x", 0),
            (5, "z", 2),
        ] {
            let mut e = ev(seq, "u", day * DAY_MS);
            e.event.visitor = Some(v.to_string());
            events.push(e);
        }
        let m = mirror_of(&events, &[Seq(1), Seq(4)]);
        let mut want = vec![visitor_hash("x"), visitor_hash("y")];
        want.sort_unstable();
        assert_eq!(m.visitor_hashes("u", Seq(0), 0, 2), want);
        assert_eq!(m.visitor_hashes("u", Seq(3), 0, 2), vec![visitor_hash("x")]);
        assert_eq!(m.visitor_hashes("u", Seq(3), 2, 3), vec![visitor_hash("z")]);
        assert_eq!(m.visitor_hashes("u", Seq(0), 3, 9), Vec::<u64>::new());
        assert_eq!(m.visitor_hashes("nope", Seq(0), 0, 9), Vec::<u64>::new());
    }

    #[test]
    fn applying_in_several_batches_equals_applying_at_once() {
        let events: Vec<_> = (1..=200u64)
            .map(|s| {
                ev(
                    s,
                    &format!("u{}", s % 7),
                    ((s * 7919) % 13) as i64 * HOUR_MS,
                )
            })
            .collect();
        let epochs = [Seq(1), Seq(50), Seq(51), Seq(120)];
        let once = mirror_of(&events, &epochs);
        let mut parts = Mirror::default();
        for chunk in events.chunks(17) {
            for d in aggregate(chunk, &epochs) {
                parts.apply(&d);
            }
        }
        assert_eq!(once, parts);
    }
}
