//! Pre-aggregation of an apply batch: events → per (epoch, url, cell) counts, per (epoch, url)
//! totals and distinct (cell, visitor) pairs. Pure; the applier turns each [`EpochDelta`] into one
//! Redis script and, once it committed, into one mirror update.

use std::borrow::Borrow;
use tally_core::hash::FastMap;

use tally_core::{cell_of, dims, Seq};
use tally_master::SeqEvent;

use crate::keys::visitor_member;

/// The increments of one URL in one epoch. Small vectors rather than ordered maps: a URL's
/// events in one batch fall in one or two cells, and the batch aggregates millions of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UrlDelta {
    /// `(cell number, views)`, ascending by cell.
    pub(crate) cells: Vec<(i64, u64)>,
    /// Sum of `cells`.
    pub(crate) total: u64,
    /// Distinct (15-minute cell, visitor) pairs as [`visitor_member`]s, ascending (events without a
    /// visitor do not count).
    pub(crate) visitors: Vec<i64>,
    /// Of a URL: its direct views in this delta (`tally_core::dims`: no referrer, or one of the
    /// page's own site) when some of its views here were referred; `None` when all of them
    /// were direct. Referred views also count under their source keys; direct ones only here,
    /// so a URL that is never referred costs nothing more than its own counts (see
    /// `EpochState::direct`).
    pub(crate) direct: Option<Box<UrlDelta>>,
}

impl UrlDelta {
    fn add(&mut self, cell: i64) {
        match self.cells.iter_mut().rev().find(|(h, _)| *h == cell) {
            Some((_, n)) => *n += 1,
            None => self.cells.push((cell, 1)),
        }
        self.total += 1;
    }

    /// Sorts what `add` and the visitor pushes left in arrival order.
    fn finish(&mut self) {
        self.settle();
        if let Some(d) = self.direct.as_mut() {
            d.finish();
        }
    }

    /// Appends `other`'s views and visitors (not its direct part): a sum of deltas, in no
    /// order until [`UrlDelta::settle`].
    fn gather(&mut self, other: &UrlDelta) {
        self.cells.extend_from_slice(&other.cells);
        self.total += other.total;
        self.visitors.extend_from_slice(&other.visitors);
    }

    /// Puts what `add` or [`UrlDelta::gather`] appended in order: cells ascending, one each;
    /// visitors ascending and distinct.
    fn settle(&mut self) {
        self.cells.sort_unstable_by_key(|c| c.0);
        self.cells.dedup_by(|next, kept| {
            let same = next.0 == kept.0;
            if same {
                kept.1 += next.1;
            }
            same
        });
        self.visitors.sort_unstable();
        self.visitors.dedup();
    }

    /// The direct views of this URL delta: `direct` when some views were referred, else all.
    pub(crate) fn direct_part(&self) -> &UrlDelta {
        self.direct.as_deref().unwrap_or(self)
    }
}

/// The increments of one site in one epoch: what `crate::mirror::SiteCounts` adds up, summed
/// here over the batch's URLs and source keys of the site (see [`site_deltas`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SiteDelta {
    /// Its URLs' views and visitors.
    pub(crate) all: UrlDelta,
    /// Campaign key (`tally_core::dims::write_campaign_key`) → the views of that campaign:
    /// the direct views of its URLs, and the views of its source keys.
    pub(crate) campaigns: FastMap<String, UrlDelta>,
}

/// The increments of one apply batch that fall into one epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EpochDelta {
    /// Start seq of the epoch.
    pub(crate) epoch: Seq,
    /// Seq of the first and last event of the batch in this epoch.
    pub(crate) first: Seq,
    pub(crate) last: Seq,
    pub(crate) urls: FastMap<String, UrlDelta>,
    /// Host → the increments of its site: `urls` summed per site ([`site_deltas`]).
    pub(crate) sites: FastMap<String, SiteDelta>,
}

/// The site of a URL or source key (by name) and the key's `(referrer host, url)`: the empty
/// referrer for a URL (its direct views go to its campaign).
pub(crate) fn site_key(name: &str) -> Option<(&str, &str, &str)> {
    let (referrer, url) = dims::parse_source_key(name).unwrap_or(("", name));
    Some((tally_core::url::host_of(url)?, referrer, url))
}

/// `urls` (finished) summed per site: a URL's views are its site's; its direct views, and a
/// source key's, are a campaign's. Built with the batch, off the mirror's lock, so that the
/// mirror adds one delta per site and campaign instead of one per URL (a site's counts span
/// thousands of cells and visitors, and one after the other its adds stay in cache).
pub(crate) fn site_deltas(urls: &FastMap<String, UrlDelta>) -> FastMap<String, SiteDelta> {
    let mut sites: FastMap<String, SiteDelta> = FastMap::default();
    let mut key = String::new();
    for (name, u) in urls {
        let Some((host, referrer, url)) = site_key(name) else {
            continue;
        };
        let site = match sites.get_mut(host) {
            Some(site) => site,
            None => sites.entry(host.to_string()).or_default(),
        };
        let campaign = match dims::is_source_key(name) {
            true => u,
            false => {
                site.all.gather(u);
                u.direct_part()
            }
        };
        if campaign.total > 0 {
            dims::write_campaign_key(&mut key, referrer, url);
            match site.campaigns.get_mut(key.as_str()) {
                Some(c) => c.gather(campaign),
                None => {
                    let mut c = UrlDelta::default();
                    c.gather(campaign);
                    site.campaigns.insert(key.clone(), c);
                }
            }
        }
    }
    for site in sites.values_mut() {
        site.all.settle();
        site.campaigns.values_mut().for_each(UrlDelta::settle);
    }
    sites
}

impl EpochDelta {
    /// Events of the delta (each is counted under its URL and its source key; this counts it
    /// once).
    pub(crate) fn events(&self) -> u64 {
        self.urls
            .iter()
            .filter(|(k, _)| !dims::is_source_key(k))
            .map(|(_, u)| u.total)
            .sum()
    }
}

/// The epoch (its start) that `seq` falls in: the largest start `<= seq`. `None` when `seq` is
/// before every live epoch (its epoch was forgotten: nobody needs it).
pub(crate) fn epoch_of(epochs: &[Seq], seq: Seq) -> Option<Seq> {
    let i = epochs.partition_point(|s| *s <= seq);
    (i > 0).then(|| epochs[i - 1])
}

/// Groups `events` (ascending seq) by epoch (`epochs`: start seqs ascending) and pre-aggregates
/// each group. Events before the first epoch are skipped. The deltas come out in epoch order.
pub(crate) fn aggregate<I>(events: I, epochs: &[Seq]) -> Vec<EpochDelta>
where
    I: IntoIterator,
    I::Item: Borrow<SeqEvent>,
{
    let mut out: Vec<EpochDelta> = Vec::new();
    // Raw referrer → its site (`tally_core::dims::referrer_site`): parsed once per batch.
    let mut sites: FastMap<String, String> = FastMap::default();
    let mut key = String::new();
    for ev in events {
        let ev = ev.borrow();
        let Some(epoch) = epoch_of(epochs, ev.seq) else {
            continue;
        };
        match out.last_mut() {
            Some(d) if d.epoch == epoch => {
                debug_assert!(ev.seq > d.last, "events must come in seq order");
                d.last = ev.seq;
            }
            _ => out.push(EpochDelta {
                epoch,
                first: ev.seq,
                last: ev.seq,
                urls: FastMap::default(),
                sites: FastMap::default(),
            }),
        }
        let d = out.last_mut().expect("pushed above");
        let u = match d.urls.get_mut(ev.event.url.as_str()) {
            Some(u) => u,
            None => d.urls.entry(ev.event.url.clone()).or_default(),
        };
        let cell = cell_of(ev.event.ts);
        let member = ev
            .event
            .visitor
            .as_ref()
            .map(|v| visitor_member(cell, tally_core::sketch::visitor_hash32(v.as_bytes())));
        // Referred views also count under their source key, for breakdowns
        // (`tally_core::dims`); direct ones are the URL's views minus those, and are kept apart
        // only once the URL has some referred ones.
        let site = match ev.event.referrer.as_deref() {
            None => "",
            Some(r) => match sites.get(r) {
                Some(s) => s.as_str(),
                None => sites
                    .entry(r.to_string())
                    .or_insert_with(|| dims::referrer_site(Some(r))),
            },
        };
        let site = dims::unless_same_site(&ev.event.url, site);
        if site.is_empty() {
            if let Some(direct) = u.direct.as_mut() {
                direct.add(cell);
                direct.visitors.extend(member);
            }
        } else if u.direct.is_none() {
            // The first referred view: every view so far was direct.
            u.direct = Some(Box::new(u.clone()));
        }
        u.add(cell);
        u.visitors.extend(member);
        if site.is_empty() {
            continue;
        }
        dims::write_source_key(&mut key, site, &ev.event.url);
        let s = match d.urls.get_mut(key.as_str()) {
            Some(s) => s,
            None => d.urls.entry(key.clone()).or_default(),
        };
        s.add(cell);
        s.visitors.extend(member);
    }
    for d in &mut out {
        d.urls.values_mut().for_each(UrlDelta::finish);
        d.sites = site_deltas(&d.urls);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tally_core::{Event, CELL_MS};

    pub(crate) fn ev(seq: u64, url: &str, ts: i64) -> SeqEvent {
        SeqEvent {
            seq: Seq(seq),
            event: Event {
                ts,
                url: url.to_string(),
                visitor: None,
                referrer: None,
                id: None,
                received_at: ts,
            },
        }
    }

    #[test]
    fn epoch_of_picks_the_largest_start_not_after_seq() {
        let epochs = [Seq(1), Seq(11), Seq(21)];
        assert_eq!(epoch_of(&epochs, Seq(1)), Some(Seq(1)));
        assert_eq!(epoch_of(&epochs, Seq(10)), Some(Seq(1)));
        assert_eq!(epoch_of(&epochs, Seq(11)), Some(Seq(11)));
        assert_eq!(epoch_of(&epochs, Seq(500)), Some(Seq(21)));
        assert_eq!(epoch_of(&[Seq(5)], Seq(4)), None);
        assert_eq!(epoch_of(&[], Seq(4)), None);
    }

    #[test]
    fn aggregates_per_url_cell_and_splits_at_epoch_starts() {
        let h = 100 * CELL_MS;
        let events = vec![
            ev(9, "a", h),
            ev(10, "a", h + 5),
            ev(11, "b", h + CELL_MS),
            ev(12, "a", h + 2 * CELL_MS),
            ev(14, "a", h + 3),
        ];
        let deltas = aggregate(&events, &[Seq(1), Seq(12)]);
        assert_eq!(deltas.len(), 2);
        let d0 = &deltas[0];
        assert_eq!((d0.epoch, d0.first, d0.last), (Seq(1), Seq(9), Seq(11)));
        assert_eq!(d0.urls["a"].cells, vec![(100, 2)]);
        assert_eq!(d0.urls["a"].total, 2);
        assert_eq!(d0.urls["b"].cells, vec![(101, 1)]);
        assert_eq!(d0.events(), 3);
        let d1 = &deltas[1];
        assert_eq!((d1.epoch, d1.first, d1.last), (Seq(12), Seq(12), Seq(14)));
        assert_eq!(d1.urls["a"].cells, vec![(100, 1), (102, 1)]);
        // Direct views count only under the URL.
        assert_eq!(d1.urls.len(), 1);
        assert_eq!(d1.urls["a"].direct, None);
    }

    /// A referred view counts under its source key too; the URL's direct views are kept apart
    /// from its first referred view on (those before it, all direct, copied).
    #[test]
    fn referred_views_count_under_their_source_key_and_split_the_direct_ones_off() {
        let h = 100 * CELL_MS;
        let mut events = vec![
            ev(1, "https://a.test/x", h),
            ev(2, "https://a.test/x", h + CELL_MS),
            ev(3, "https://a.test/x", h),
            ev(4, "https://a.test/x", h),
            ev(5, "https://a.test/x", h + CELL_MS),
            ev(6, "https://a.test/y", h),
        ];
        events[2].event.referrer = Some("https://www.search.test/q".into());
        // The page's own site is direct.
        events[3].event.referrer = Some("https://a.test/other".into());
        events[4].event.visitor = Some("v".into());
        let d = &aggregate(&events, &[Seq(1)])[0];
        let x = &d.urls["https://a.test/x"];
        assert_eq!((x.total, x.cells.clone()), (5, vec![(100, 3), (101, 2)]));
        let direct = x.direct.as_deref().expect("x was referred");
        assert_eq!(
            (direct.total, direct.cells.clone()),
            (4, vec![(100, 2), (101, 2)])
        );
        assert_eq!(direct.visitors.len(), 1);
        let referred = &d.urls[&dims::source_key("search.test", "https://a.test/x")];
        assert_eq!(
            (referred.total, referred.cells.clone()),
            (1, vec![(100, 1)])
        );
        assert_eq!(d.urls["https://a.test/y"].direct, None);
        assert_eq!(d.urls.len(), 3);
        assert_eq!(d.events(), 6);
    }

    /// A site's delta sums its URLs' (cells coalesced, visitors distinct); its campaigns split
    /// the same views by referrer, direct ones under the empty referrer.
    #[test]
    fn sites_sum_their_urls_and_split_views_by_campaign() {
        let h = 100 * CELL_MS;
        let mut events = vec![
            ev(1, "https://a.test/x", h),
            ev(2, "https://a.test/y", h),
            ev(3, "https://a.test/y", h + CELL_MS),
            ev(4, "https://a.test/x?utm_source=n", h),
            ev(5, "https://b.test/", h),
        ];
        for e in &mut events[..3] {
            e.event.visitor = Some("v".into());
        }
        events[1].event.referrer = Some("https://search.test/".into());
        let d = &aggregate(&events, &[Seq(1)])[0];
        assert_eq!(d.sites.len(), 2);
        let a = &d.sites["a.test"];
        assert_eq!(
            (a.all.total, a.all.cells.clone()),
            (4, vec![(100, 3), (101, 1)])
        );
        let v = tally_core::sketch::visitor_hash32(b"v");
        assert_eq!(
            a.all.visitors,
            vec![visitor_member(100, v), visitor_member(101, v)]
        );
        let campaign = |referrer: &str, url: &str| {
            let mut key = String::new();
            dims::write_campaign_key(&mut key, referrer, url);
            let c = &a.campaigns[&key];
            (c.total, c.cells.clone())
        };
        assert_eq!(a.campaigns.len(), 3);
        assert_eq!(
            campaign("", "https://a.test/x"),
            (2, vec![(100, 1), (101, 1)])
        );
        assert_eq!(
            campaign("search.test", "https://a.test/y"),
            (1, vec![(100, 1)])
        );
        assert_eq!(
            campaign("", "https://a.test/x?utm_source=n"),
            (1, vec![(100, 1)])
        );
        assert_eq!(d.sites["b.test"].all.total, 1);
    }

    #[test]
    fn collects_distinct_visitor_hashes_per_cell() {
        use tally_core::{CELL_MS, DAY_MS};
        let mut a = ev(1, "a", 0);
        a.event.visitor = Some("v1".into());
        let mut b = ev(2, "a", 5);
        b.event.visitor = Some("v1".into());
        let mut c = ev(3, "a", DAY_MS);
        c.event.visitor = Some("v2".into());
        let d = ev(4, "a", DAY_MS); // no visitor
        let deltas = aggregate([a, b, c, d], &[Seq(1)]);
        let u = &deltas[0].urls["a"];
        assert_eq!(u.total, 4);
        let h = |v: &str| tally_core::sketch::visitor_hash32(v.as_bytes());
        let mut want = vec![
            visitor_member(0, h("v1")),
            visitor_member(DAY_MS / CELL_MS, h("v2")),
        ];
        want.sort_unstable();
        assert_eq!(u.visitors, want);
    }

    #[test]
    fn skips_events_of_forgotten_epochs_and_takes_arcs() {
        let events: Vec<std::sync::Arc<SeqEvent>> = vec![
            ev(3, "a", 0).into(),
            ev(4, "a", -1).into(),
            ev(5, "a", 0).into(),
        ];
        let deltas = aggregate(events.iter().map(|e| &**e), &[Seq(5)]);
        assert_eq!(deltas.len(), 1);
        assert_eq!(deltas[0].first, Seq(5));
        assert_eq!(deltas[0].events(), 1);
        assert!(aggregate(Vec::<SeqEvent>::new(), &[Seq(1)]).is_empty());
        // Negative timestamps floor to the previous cell.
        let d = aggregate([ev(1, "a", -1)], &[Seq(1)]);
        assert_eq!(d[0].urls["a"].cells, vec![(-1, 1)]);
    }
}
