//! Incremental all-time rankings: `/v1/top` without scanning every live URL.
//!
//! The ranking a query needs is of `batch_total(u) + speed_after_cutoff(u)` over every URL. Both
//! parts only grow while one batch view serves, so the exact top `cap` can be kept incrementally:
//! a URL outside the kept set can enter only by passing its last member, and a member only
//! moves up. The set is built once per serving view (from the view's own top lists and the speed
//! totals after its cutoff) and updated, under the mirror's write lock, by every apply into an
//! epoch after that cutoff. A query then reads the first `limit` members: `O(limit)`.
//!
//! Kept: the top [`OVERALL_CAP`] overall and the top [`HOST_CAP`] of every host. A query for
//! more (or for a range other than all time) scans instead.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use tally_core::hash::FastMap;
use tally_core::Seq;

/// Members of the overall ranking (the API's largest `limit`).
pub const OVERALL_CAP: usize = 1000;
/// Members of each host's ranking: dashboards ask for tens; more scans the host.
pub const HOST_CAP: usize = 100;

/// The batch view's side of a ranking: implemented by the serving layer for the view it serves.
pub trait BaseTotals: Send + Sync {
    /// Identifies the view (its version): a ranking answers only queries for the same view.
    fn id(&self) -> &str;
    /// Its cutoff: the speed epochs after it are added.
    fn cutoff(&self) -> Seq;
    /// All-time views of `url` in the view.
    fn total(&self, url: &str) -> u64;
    /// The view's top `k` URLs, views descending then URL ascending; of one host when given.
    fn top(&self, host: Option<&str>, k: usize) -> Vec<(Arc<str>, u64)>;
    /// Every host with URLs in the view.
    fn hosts(&self) -> Vec<Arc<str>>;
    /// URLs with views at cells `>= from_cell` (events that were ahead of the clock when the
    /// view was computed; empty for any hour past the view's computation).
    fn late(&self, from_cell: i64) -> Vec<Arc<str>>;
    /// Views of `url` in the cells before `to_cell`.
    fn views_before(&self, url: &str, to_cell: i64) -> u64;
}

/// The base when no batch view serves: the speed layer alone.
pub(crate) struct NoView;

impl BaseTotals for NoView {
    fn id(&self) -> &str {
        ""
    }
    fn cutoff(&self) -> Seq {
        Seq::ZERO
    }
    fn total(&self, _: &str) -> u64 {
        0
    }
    fn top(&self, _: Option<&str>, _: usize) -> Vec<(Arc<str>, u64)> {
        Vec::new()
    }
    fn hosts(&self) -> Vec<Arc<str>> {
        Vec::new()
    }
    fn late(&self, _: i64) -> Vec<Arc<str>> {
        Vec::new()
    }
    fn views_before(&self, _: &str, _: i64) -> u64 {
        0
    }
}

/// The exact top `cap` of a set of (URL, views) whose views only grow.
#[derive(Debug, Clone)]
pub(crate) struct TopSet {
    cap: usize,
    /// `(Reverse(views), url)`: iteration order is the ranking order.
    order: BTreeSet<(Reverse<u64>, Arc<str>)>,
    views: FastMap<Arc<str>, u64>,
    /// The views of the last member while the set is full, else 0: an offer of fewer views
    /// is turned away without a walk down the tree or a comparison of names.
    floor: u64,
}

impl TopSet {
    /// The top `cap` of `candidates` (which must contain the true top `cap`).
    pub(crate) fn new(cap: usize, candidates: impl IntoIterator<Item = (Arc<str>, u64)>) -> TopSet {
        let mut t = TopSet {
            cap,
            order: BTreeSet::new(),
            views: FastMap::default(),
            floor: 0,
        };
        for (u, v) in candidates {
            t.offer(&u, v);
        }
        t
    }

    /// `url` now has `views` (never fewer than before).
    pub(crate) fn offer(&mut self, url: &Arc<str>, views: u64) {
        // The applier offers every URL it updates; on a long tail nearly all end here.
        if views == 0 || views < self.floor {
            return;
        }
        self.offer_slow(url, views);
        self.floor = match self.order.len() >= self.cap {
            true => self.order.last().map_or(0, |(Reverse(w), _)| *w),
            false => 0,
        };
    }

    /// [`TopSet::offer`] of views at or above the floor.
    fn offer_slow(&mut self, url: &Arc<str>, views: u64) {
        // Below the last member of a full set: not a member either (a member's views never
        // fall below the last one's), so no lookup. Most offers of a long tail end here.
        if self.order.len() >= self.cap
            && self
                .order
                .last()
                .is_some_and(|(Reverse(w), wu)| (views, &**wu) < (*w, &**url))
        {
            return;
        }
        if let Some(old) = self.views.get_mut(url) {
            if *old != views {
                self.order.remove(&(Reverse(*old), url.clone()));
                *old = views;
                self.order.insert((Reverse(views), url.clone()));
            }
            return;
        }
        let entry = (Reverse(views), url.clone());
        if self.order.len() >= self.cap {
            match self.order.last() {
                Some(worst) if entry < *worst => {
                    let worst = worst.clone();
                    self.order.remove(&worst);
                    self.views.remove(&worst.1);
                }
                _ => return,
            }
        }
        self.views.insert(url.clone(), views);
        self.order.insert(entry);
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Arc<str>, u64)> {
        self.order.iter().map(|(Reverse(v), u)| (u, *v))
    }

    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }
}

/// The rankings for one serving view.
pub(crate) struct Ranking {
    pub(crate) base: Arc<dyn BaseTotals>,
    pub(crate) overall: TopSet,
    pub(crate) hosts: FastMap<Arc<str>, TopSet>,
}

impl Ranking {
    /// Builds the rankings of `base` plus `speed` (every URL with views in the epochs after the
    /// base's cutoff, with those views).
    pub(crate) fn build<'a>(
        base: Arc<dyn BaseTotals>,
        speed: impl Iterator<Item = (&'a Arc<str>, u64)> + Clone,
    ) -> Ranking {
        let combined = |u: &Arc<str>, s: u64| (u.clone(), base.total(u) + s);
        let speed_urls: HashMap<&str, u64> = speed.clone().map(|(u, s)| (&**u, s)).collect();
        // The view's own top lists hold every batch-only URL that can rank; URLs with speed
        // views are offered with their combined totals.
        let batch_only = |list: Vec<(Arc<str>, u64)>| {
            list.into_iter()
                .filter(|(u, _)| !speed_urls.contains_key(&**u))
                .collect::<Vec<_>>()
        };
        let overall = TopSet::new(
            OVERALL_CAP,
            batch_only(base.top(None, OVERALL_CAP))
                .into_iter()
                .chain(speed.clone().map(|(u, s)| combined(u, s))),
        );
        let mut hosts: FastMap<Arc<str>, TopSet> = FastMap::default();
        for h in base.hosts() {
            let t = TopSet::new(HOST_CAP, batch_only(base.top(Some(&h), HOST_CAP)));
            hosts.insert(h, t);
        }
        for (u, s) in speed {
            if let Some(h) = tally_core::url::host_of(u) {
                let (u, v) = combined(u, s);
                host_set(&mut hosts, h).offer(&u, v);
            }
        }
        Ranking {
            base,
            overall,
            hosts,
        }
    }

    /// `url`, with `base_total` views in the base (`self.base.total(url)`, which the applier
    /// reads before taking the mirror's lock), now has `speed` views after the base's cutoff.
    pub(crate) fn offer(&mut self, url: &Arc<str>, base_total: u64, speed: u64) {
        let v = base_total + speed;
        self.overall.offer(url, v);
        if let Some(h) = tally_core::url::host_of(url) {
            host_set(&mut self.hosts, h).offer(url, v);
        }
    }

    /// The ranking of `host` (or overall); `None`: no URL of that host has views.
    pub(crate) fn set(&self, host: Option<&str>) -> Option<&TopSet> {
        match host {
            None => Some(&self.overall),
            Some(h) => self.hosts.get(h),
        }
    }
}

impl std::fmt::Debug for Ranking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ranking")
            .field("view", &self.base.id())
            .field("overall", &self.overall.len())
            .field("hosts", &self.hosts.len())
            .finish()
    }
}

fn host_set<'a>(hosts: &'a mut FastMap<Arc<str>, TopSet>, h: &str) -> &'a mut TopSet {
    if !hosts.contains_key(h) {
        hosts.insert(Arc::from(h), TopSet::new(HOST_CAP, std::iter::empty()));
    }
    hosts.get_mut(h).expect("inserted above")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    fn listed(t: &TopSet) -> Vec<(String, u64)> {
        t.iter().map(|(u, v)| (u.to_string(), v)).collect()
    }

    #[test]
    fn keeps_the_exact_top_as_views_grow() {
        let mut t = TopSet::new(3, [(a("a"), 5), (a("b"), 3), (a("c"), 3), (a("d"), 1)]);
        assert_eq!(
            listed(&t),
            vec![("a".into(), 5), ("b".into(), 3), ("c".into(), 3)]
        );
        t.offer(&a("d"), 3); // ties with c, but "d" > "c": stays out
        assert_eq!(t.len(), 3);
        assert!(t.iter().all(|(u, _)| &**u != "d"));
        t.offer(&a("d"), 4); // passes b and c
        assert_eq!(
            listed(&t),
            vec![("a".into(), 5), ("d".into(), 4), ("b".into(), 3)]
        );
        t.offer(&a("b"), 9);
        assert_eq!(
            listed(&t),
            vec![("b".into(), 9), ("a".into(), 5), ("d".into(), 4)]
        );
        t.offer(&a("e"), 0);
        assert_eq!(t.len(), 3);
    }

    proptest::proptest! {
        /// Random growth: the set always equals the top `cap` of a full sort.
        #[test]
        fn equals_a_full_sort_under_random_growth(
            start in proptest::collection::vec(0u64..10, 12),
            steps in proptest::collection::vec((0usize..12, 1u64..4), 0..60),
            cap in 1usize..6,
        ) {
            let names: Vec<Arc<str>> = (0..12).map(|i| a(&format!("u{i:02}"))).collect();
            let mut views = start.clone();
            let mut t = TopSet::new(cap, names.iter().cloned().zip(start));
            for (i, n) in steps {
                views[i] += n;
                t.offer(&names[i], views[i]);
                let mut all: Vec<(String, u64)> = names
                    .iter()
                    .zip(&views)
                    .filter(|(_, v)| **v > 0)
                    .map(|(u, v)| (u.to_string(), *v))
                    .collect();
                all.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
                all.truncate(cap);
                proptest::prop_assert_eq!(listed(&t), all);
            }
        }
    }
}
