//! The in-process mirror of the speed state in Redis. The applier changes it only after the
//! corresponding Redis script committed (or after loading it from Redis), so it always equals
//! what Redis holds; queries read it without a Redis round trip.
//!
//! Exactness: a query that uses a batch view with cutoff `C` sums exactly the epochs whose start
//! is `> C`. Epoch starts are always `cutoff + 1` of some batch run, so the epochs summed hold
//! exactly the events with `seq > C` (up to the applied seq): none missed, none counted twice —
//! provided none of those epochs was collected. The mirror keeps the start of the oldest epoch
//! it holds whole (`floor`), changed only under its write lock together with the epochs it
//! removes, and every read checks `C + 1 >= floor` under the same read lock: a read for a view
//! whose following epochs were collected is refused ([`NotCovered`]), never answered short.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use tally_core::Seq;

use crate::aggregate::EpochDelta;
use crate::keys::split_visitor_member;
use crate::NotCovered;

/// Counts of one URL in one epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UrlCounts {
    /// `(hour, views)` ascending by hour, no zero entries.
    pub(crate) hours: Vec<(i64, u64)>,
    pub(crate) total: u64,
    /// Distinct (UTC day, visitor) pairs ([`crate::keys::visitor_member`]).
    pub(crate) visitors: HashSet<i64>,
}

impl UrlCounts {
    /// Adds `n` views in `hour`.
    pub(crate) fn add(&mut self, hour: i64, n: u64) {
        if n == 0 {
            return;
        }
        match self.hours.binary_search_by_key(&hour, |c| c.0) {
            Ok(i) => self.hours[i].1 += n,
            Err(i) => self.hours.insert(i, (hour, n)),
        }
        self.total += n;
    }

    /// Views in the hours `[from_hour, to_hour)`.
    pub(crate) fn range(&self, from_hour: i64, to_hour: i64) -> u64 {
        let (Some(first), Some(last)) = (self.hours.first(), self.hours.last()) else {
            return 0;
        };
        if from_hour >= to_hour {
            return 0;
        }
        if from_hour <= first.0 && to_hour > last.0 {
            return self.total;
        }
        let a = self.hours.partition_point(|c| c.0 < from_hour);
        let b = a + self.hours[a..].partition_point(|c| c.0 < to_hour);
        self.hours[a..b].iter().map(|c| c.1).sum()
    }
}

/// State of one epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct EpochState {
    /// Last seq of this epoch applied (0: none).
    pub(crate) applied: Seq,
    /// URL id → counts.
    pub(crate) urls: HashMap<u32, UrlCounts>,
}

/// The URL ids of the live epochs ([`crate::keys`]: ids, not hashes, name Redis keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UrlDict {
    ids: HashMap<Arc<str>, u32>,
    names: HashMap<u32, Arc<str>>,
    /// Ids below this may be taken.
    next: u32,
}

impl UrlDict {
    pub(crate) fn id(&self, url: &str) -> Option<u32> {
        self.ids.get(url).copied()
    }

    pub(crate) fn name(&self, id: u32) -> Option<&Arc<str>> {
        self.names.get(&id)
    }

    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Records `url` under `id`. Refuses (returns the URL it has) when `id` names another URL
    /// or `url` has another id: two URLs never share an id.
    pub(crate) fn insert(&mut self, id: u32, url: &str) -> Result<(), String> {
        match (self.names.get(&id), self.ids.get(url)) {
            (Some(u), Some(i)) if **u == *url && *i == id => Ok(()),
            (Some(u), _) if **u != *url => Err(format!("id {id} names {u} and {url}")),
            (_, Some(i)) if *i != id => Err(format!("{url} has ids {i} and {id}")),
            _ => {
                let name: Arc<str> = Arc::from(url);
                self.ids.insert(name.clone(), id);
                self.names.insert(id, name);
                self.next = self.next.max(id.saturating_add(1));
                Ok(())
            }
        }
    }

    /// Keeps only the ids in `keep`.
    fn retain(&mut self, keep: &HashSet<u32>) {
        self.names.retain(|id, _| keep.contains(id));
        self.ids.retain(|_, id| keep.contains(id));
    }
}

/// epoch start → state, plus the URL dictionary and the coverage floor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mirror {
    pub(crate) dict: UrlDict,
    pub(crate) epochs: BTreeMap<Seq, EpochState>,
    /// Every epoch that starts at or after `floor` is held whole (up to its applied seq).
    pub(crate) floor: Seq,
}

impl Default for Mirror {
    fn default() -> Self {
        Mirror::empty(Seq(1))
    }
}

impl Mirror {
    /// A mirror that holds every epoch from `floor` on, all empty.
    pub(crate) fn empty(floor: Seq) -> Mirror {
        Mirror {
            dict: UrlDict::default(),
            epochs: BTreeMap::new(),
            floor,
        }
    }

    /// The id each URL of `d` is written under, in `d.urls` order: its id when the dictionary
    /// has it, else a new one.
    pub(crate) fn assign_ids(&self, d: &EpochDelta) -> Vec<u32> {
        let mut next = self.dict.next;
        d.urls
            .keys()
            .map(|url| {
                self.dict.id(url).unwrap_or_else(|| {
                    next += 1;
                    next - 1
                })
            })
            .collect()
    }

    /// Adds a committed delta whose URLs were written under `ids` (from [`Mirror::assign_ids`]).
    pub(crate) fn apply(&mut self, d: &EpochDelta, ids: &[u32]) -> Result<(), String> {
        for ((url, _), &id) in d.urls.iter().zip(ids) {
            self.dict.insert(id, url)?;
        }
        let e = self.epochs.entry(d.epoch).or_default();
        for ((_, ud), id) in d.urls.iter().zip(ids) {
            let c = e.urls.entry(*id).or_default();
            for (h, n) in &ud.hours {
                c.add(*h, *n);
            }
            c.visitors.extend(ud.visitors.iter().copied());
        }
        e.applied = e.applied.max(d.last);
        Ok(())
    }

    pub(crate) fn applied_in(&self, epoch: Seq) -> Seq {
        self.epochs.get(&epoch).map_or(Seq::ZERO, |e| e.applied)
    }

    /// Drops the epochs starting before `floor` (and the ids only they used); reads for a
    /// cutoff below `floor - 1` are refused from now on.
    pub(crate) fn collect_before(&mut self, floor: Seq) {
        if floor <= self.floor {
            return;
        }
        self.floor = floor;
        self.epochs = self.epochs.split_off(&floor);
        let keep: HashSet<u32> = self
            .epochs
            .values()
            .flat_map(|e| e.urls.keys().copied())
            .collect();
        self.dict.retain(&keep);
    }

    /// The epochs a query with batch cutoff `after_cutoff` sums: those starting after it;
    /// refused when some of them were collected.
    fn live_after(
        &self,
        after_cutoff: Seq,
    ) -> Result<impl Iterator<Item = &EpochState>, NotCovered> {
        if after_cutoff.next() < self.floor {
            return Err(NotCovered {
                cutoff: after_cutoff,
                floor: self.floor,
            });
        }
        Ok(self.epochs.range(after_cutoff.next()..).map(|(_, e)| e))
    }

    /// Whether reads for a batch view with this cutoff are answered.
    pub(crate) fn covers(&self, after_cutoff: Seq) -> bool {
        after_cutoff.next() >= self.floor
    }

    /// The counts of `url` in each epoch after the cutoff.
    fn url_counts(
        &self,
        url: &str,
        after_cutoff: Seq,
    ) -> Result<impl Iterator<Item = &UrlCounts>, NotCovered> {
        let id = self.dict.id(url);
        Ok(self
            .live_after(after_cutoff)?
            .filter_map(move |e| id.and_then(|id| e.urls.get(&id))))
    }

    pub(crate) fn views(
        &self,
        url: &str,
        after_cutoff: Seq,
        from_hour: i64,
        to_hour: i64,
    ) -> Result<u64, NotCovered> {
        Ok(self
            .url_counts(url, after_cutoff)?
            .map(|c| c.range(from_hour, to_hour))
            .sum())
    }

    /// Non-zero hours of `url` in `[from_hour, to_hour)`, ascending.
    pub(crate) fn hour_counts(
        &self,
        url: &str,
        after_cutoff: Seq,
        from_hour: i64,
        to_hour: i64,
    ) -> Result<Vec<(i64, u64)>, NotCovered> {
        let mut out: BTreeMap<i64, u64> = BTreeMap::new();
        for c in self.url_counts(url, after_cutoff)? {
            let a = c.hours.partition_point(|x| x.0 < from_hour);
            for (h, n) in c.hours[a..].iter().take_while(|x| x.0 < to_hour) {
                *out.entry(*h).or_insert(0) += n;
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Distinct 32-bit visitor hashes of `url` on the UTC days `[from_day, to_day)`, ascending.
    pub(crate) fn visitor_hashes(
        &self,
        url: &str,
        after_cutoff: Seq,
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<u32>, NotCovered> {
        let mut out: Vec<u32> = Vec::new();
        for c in self.url_counts(url, after_cutoff)? {
            out.extend(c.visitors.iter().filter_map(|m| {
                let (day, h) = split_visitor_member(*m);
                (from_day..to_day).contains(&day).then_some(h)
            }));
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// url → views in `[from_hour, to_hour)` for every URL with views there, optionally only
    /// URLs whose host is `host`. The keys borrow from the mirror (the caller holds its read
    /// lock).
    pub(crate) fn range_totals(
        &self,
        after_cutoff: Seq,
        from_hour: i64,
        to_hour: i64,
        host: Option<&str>,
    ) -> Result<HashMap<&str, u64>, NotCovered> {
        let mut out: HashMap<&str, u64> = HashMap::new();
        for e in self.live_after(after_cutoff)? {
            for (id, c) in &e.urls {
                let Some(url) = self.dict.name(*id) else {
                    continue;
                };
                if let Some(h) = host {
                    if tally_core::url::host_of(url) != Some(h) {
                        continue;
                    }
                }
                let n = c.range(from_hour, to_hour);
                if n > 0 {
                    *out.entry(&**url).or_default() += n;
                }
            }
        }
        Ok(out)
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
            let ids = m.assign_ids(&d);
            m.apply(&d, &ids).unwrap();
        }
        m
    }

    #[test]
    fn range_is_half_open_and_uses_total_for_full_cover() {
        let mut c = UrlCounts::default();
        c.add(3, 5);
        c.add(1, 2);
        c.add(7, 1);
        c.add(9, 0);
        assert_eq!(c.hours, vec![(1, 2), (3, 5), (7, 1)]);
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
        assert_eq!(m.views(x, Seq(0), 0, 10), Ok(4));
        assert_eq!(m.views(x, Seq(3), 0, 10), Ok(2));
        assert_eq!(m.views(x, Seq(5), 0, 10), Ok(0));
        assert_eq!(m.views(x, Seq(0), 1, 2), Ok(2));
        assert_eq!(m.views("nope", Seq(0), 0, 10), Ok(0));
        assert_eq!(
            m.hour_counts(x, Seq(0), 0, 10),
            Ok(vec![(0, 1), (1, 2), (2, 1)])
        );
        assert_eq!(m.hour_counts(x, Seq(3), 0, 2), Ok(vec![(1, 1)]));
        let all = m.range_totals(Seq(0), 0, 10, None).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all["http://b.com/y"], 2);
        let after3 = m.range_totals(Seq(3), 2, 3, None).unwrap();
        assert_eq!(
            after3,
            HashMap::from([("http://a.com/x", 1), ("http://b.com/y", 1)])
        );
        let host_b = m.range_totals(Seq(0), 0, 10, Some("b.com")).unwrap();
        assert_eq!(host_b, HashMap::from([("http://b.com/y", 2)]));
        assert!(m.range_totals(Seq(0), 5, 10, None).unwrap().is_empty());
    }

    #[test]
    fn collected_epochs_refuse_reads_for_older_cutoffs() {
        let events = vec![
            ev(1, "http://a.com/x", 0),
            ev(2, "http://a.com/y", 0),
            ev(3, "http://a.com/x", 0),
        ];
        let mut m = mirror_of(&events, &[Seq(1), Seq(3)]);
        assert_eq!(m.dict.len(), 2);
        m.collect_before(Seq(3));
        // A view with cutoff 2 still reads exactly; a view with cutoff 0 would miss 1 and 2.
        assert_eq!(m.views("http://a.com/x", Seq(2), 0, 1), Ok(1));
        assert!(m.covers(Seq(2)) && !m.covers(Seq(1)));
        let refused = NotCovered {
            cutoff: Seq(0),
            floor: Seq(3),
        };
        assert_eq!(m.views("http://a.com/x", Seq(0), 0, 1), Err(refused));
        assert_eq!(
            m.range_totals(Seq(1), 0, 1, None).unwrap_err().floor,
            Seq(3)
        );
        assert!(m.visitor_hashes("http://a.com/x", Seq(0), 0, 1).is_err());
        assert!(m.hour_counts("http://a.com/x", Seq(0), 0, 1).is_err());
        // Only x is left in a live epoch: y's id is free again.
        assert_eq!(m.dict.len(), 1);
        assert!(m.dict.id("http://a.com/y").is_none());
        // Collecting is monotonic.
        m.collect_before(Seq(2));
        assert_eq!(m.floor, Seq(3));
    }

    #[test]
    fn two_urls_never_share_an_id() {
        let mut d = UrlDict::default();
        d.insert(0, "http://a/").unwrap();
        d.insert(0, "http://a/").unwrap();
        assert!(d.insert(0, "http://b/").is_err());
        assert!(d.insert(1, "http://a/").is_err());
        d.insert(1, "http://b/").unwrap();
        assert_eq!((d.id("http://b/"), d.next), (Some(1), 2));
    }

    #[test]
    fn visitor_hashes_are_a_union_over_epochs_and_days() {
        use tally_core::sketch::visitor_hash32;
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
        let h = |v: &str| visitor_hash32(v.as_bytes());
        let mut want = vec![h("x"), h("y")];
        want.sort_unstable();
        assert_eq!(m.visitor_hashes("u", Seq(0), 0, 2), Ok(want));
        assert_eq!(m.visitor_hashes("u", Seq(3), 0, 2), Ok(vec![h("x")]));
        assert_eq!(m.visitor_hashes("u", Seq(3), 2, 3), Ok(vec![h("z")]));
        assert_eq!(m.visitor_hashes("u", Seq(0), 3, 9), Ok(vec![]));
        assert_eq!(m.visitor_hashes("nope", Seq(0), 0, 9), Ok(vec![]));
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
                let ids = parts.assign_ids(&d);
                parts.apply(&d, &ids).unwrap();
            }
        }
        for url in (0..7).map(|i| format!("u{i}")) {
            for after in [Seq(0), Seq(49), Seq(50), Seq(119)] {
                assert_eq!(
                    once.hour_counts(&url, after, i64::MIN, i64::MAX),
                    parts.hour_counts(&url, after, i64::MIN, i64::MAX)
                );
            }
        }
        assert_eq!(once.epochs.len(), parts.epochs.len());
    }
}
