//! The in-memory batch view the serving layer answers from. Immutable once built; the server
//! holds it as `ArcSwap<Option<Arc<BatchView>>>` and swaps it in one step.

use std::sync::Arc;
use tally_core::hash::FastMap;

use tally_core::Seq;

use crate::error::Result;
use crate::kernel::{SketchData, ViewData};
use crate::site::{Sites, UrlPart};
use crate::sketch::VisitorSketch;
use crate::sources::{CampaignCount, SourceCount, Sources};
use crate::visitors::{KeyVisitors, Pieces, CELLS_PER_DAY};

/// A loaded batch view: per URL, views per 15-minute cell with prefix sums, totals in top-N order,
/// and (when computed) visitor sketches per UTC day and visitor lists per cell.
#[derive(Debug)]
pub struct BatchView {
    pub version: String,
    pub cutoff_seq: Seq,
    pub computed_at_ms: i64,
    pub events: u64,
    pub urls: u64,
    names: Vec<Arc<str>>,
    index: FastMap<Arc<str>, u32>,
    /// URL `i` owns cells `offsets[i]..offsets[i+1]`.
    offsets: Vec<usize>,
    /// Cell numbers ([`tally_core::CELL_MS`] cells since the epoch), ascending per URL.
    cell: Vec<i64>,
    /// `prefix[j]` = sum of views of cells `0..j` (over all URLs); `len = cells + 1`.
    prefix: Vec<u64>,
    /// URL ids by total views desc, then url asc.
    by_total: Vec<u32>,
    /// Host -> URL ids with that host, by total views desc, then url asc.
    hosts: FastMap<Arc<str>, Vec<u32>>,
    /// `(cell, url id)` of the cells after the one the view was computed in (events
    /// that were ahead of the clock), ascending.
    late: Vec<(i64, u32)>,
    /// Visitor sketches per (URL, UTC day) and visitor lists per (URL, cell), when computed.
    visitors: Option<SketchData>,
    /// Per URL, the union of its day sketches per week (`day.div_euclid(7)`), built at load:
    /// a 30-day uniques query merges ~4 of them and the ragged days instead of 30 days.
    week_offsets: Vec<usize>,
    weeks: Vec<i64>,
    week_sketches: Vec<VisitorSketch>,
    /// Every host's pages summed (views) and unioned (visitors), built at load.
    sites: Sites,
    /// Counts and sketches per source key (referrer host, URL), for breakdowns.
    sources: Sources,
}

/// One URL's share of a range ([`BatchView::urls_of`]).
#[derive(Debug, Clone, Copy)]
pub struct UrlCount<'a> {
    pub url: &'a str,
    /// The URL's number in the view ([`BatchView::url_visitors`]).
    pub key: u32,
    /// Views in the cell range.
    pub views: u64,
    /// Its cells in the range, ascending.
    pub cells: &'a [i64],
    /// Running views: cell `cells[j]` has `prefix[j + 1] - prefix[j]`.
    prefix: &'a [u64],
}

impl<'a> UrlCount<'a> {
    /// `(cell, views)` of its cells in the range, ascending.
    pub fn cell_views(&self) -> impl Iterator<Item = (i64, u64)> + 'a {
        let (cells, prefix) = (self.cells, self.prefix);
        (0..cells.len()).map(move |j| (cells[j], prefix[j + 1] - prefix[j]))
    }
}

impl BatchView {
    /// Builds the in-memory index from computed or loaded view data.
    pub fn from_data(
        version: String,
        cutoff_seq: Seq,
        computed_at_ms: i64,
        data: ViewData,
    ) -> BatchView {
        let ViewData {
            urls,
            offsets,
            cell,
            views,
            sketches,
            sources,
            events,
            ..
        } = data;
        let sources = Sources::from_data(sources.map(|s| *s).unwrap_or_default());
        let names: Vec<Arc<str>> = urls.into_iter().map(Arc::from).collect();
        let index = names
            .iter()
            .enumerate()
            .map(|(i, u)| (u.clone(), i as u32))
            .collect();
        let prefix = prefix_sums(&views);
        let total = |i: usize| prefix[offsets[i + 1]] - prefix[offsets[i]];
        let mut by_total: Vec<u32> = (0..names.len() as u32).collect();
        // URL ids are in URL order already, so a stable sort by total keeps url asc for ties.
        by_total.sort_by_key(|&i| std::cmp::Reverse(total(i as usize)));
        let mut hosts: FastMap<Arc<str>, Vec<u32>> = FastMap::default();
        for &i in &by_total {
            if let Some(h) = tally_core::url::host_of(&names[i as usize]) {
                match hosts.get_mut(h) {
                    Some(v) => v.push(i),
                    None => {
                        hosts.insert(h.into(), vec![i]);
                    }
                }
            }
        }
        let computed_cell = tally_core::cell_of(computed_at_ms);
        let mut late: Vec<(i64, u32)> = Vec::new();
        for i in 0..names.len() {
            let (s, e) = (offsets[i], offsets[i + 1]);
            let a = s + cell[s..e].partition_point(|&h| h <= computed_cell);
            late.extend(cell[a..e].iter().map(|&h| (h, i as u32)));
        }
        late.sort_unstable();
        let sites = Sites::build(
            sketches.as_ref().map(|s| s.precision),
            hosts.iter().map(|(h, ids)| {
                let parts = ids
                    .iter()
                    .map(|&i| {
                        let i = i as usize;
                        let (s, e) = (offsets[i], offsets[i + 1]);
                        UrlPart {
                            cells: &cell[s..e],
                            views: &views[s..e],
                            visitors: sketches
                                .as_ref()
                                .map_or_else(KeyVisitors::default, |v| v.key(i, s, &cell[s..e])),
                        }
                    })
                    .collect();
                (h.clone(), parts)
            }),
        );
        let (week_offsets, weeks, week_sketches) = match &sketches {
            Some(v) => week_unions(v.precision, &v.offsets, &v.days, &v.sketches),
            None => (Vec::new(), Vec::new(), Vec::new()),
        };
        BatchView {
            version,
            cutoff_seq,
            computed_at_ms,
            events,
            urls: names.len() as u64,
            names,
            index,
            offsets,
            cell,
            prefix,
            by_total,
            hosts,
            late,
            visitors: sketches,
            week_offsets,
            weeks,
            week_sketches,
            sites,
            sources,
        }
    }

    fn id(&self, url: &str) -> Option<usize> {
        self.index.get(url).map(|&i| i as usize)
    }

    /// Index range `[a, b)` of URL `i`'s cells in `[from_cell, to_cell)`.
    fn cell_range(&self, i: usize, from_cell: i64, to_cell: i64) -> (usize, usize) {
        let (s, e) = (self.offsets[i], self.offsets[i + 1]);
        if from_cell >= to_cell {
            return (s, s);
        }
        let cell = &self.cell[s..e];
        let a = cell.partition_point(|&h| h < from_cell);
        let b = a + cell[a..].partition_point(|&h| h < to_cell);
        (s + a, s + b)
    }

    /// Views of `url` in the cells `[from_cell, to_cell)`.
    pub fn range_views(&self, url: &str, from_cell: i64, to_cell: i64) -> u64 {
        match self.id(url) {
            Some(i) => {
                let (a, b) = self.cell_range(i, from_cell, to_cell);
                self.prefix[b] - self.prefix[a]
            }
            None => 0,
        }
    }

    /// The non-zero `(cell, views)` of `url` in `[from_cell, to_cell)`, ascending.
    pub fn cell_counts(&self, url: &str, from_cell: i64, to_cell: i64) -> Vec<(i64, u64)> {
        match self.id(url) {
            Some(i) => {
                let (a, b) = self.cell_range(i, from_cell, to_cell);
                (a..b)
                    .map(|j| (self.cell[j], self.prefix[j + 1] - self.prefix[j]))
                    .collect()
            }
            None => Vec::new(),
        }
    }

    /// Total views of `url` in this view.
    pub fn total_views(&self, url: &str) -> u64 {
        self.id(url).map_or(0, |i| self.total(i))
    }

    fn total(&self, i: usize) -> u64 {
        self.prefix[self.offsets[i + 1]] - self.prefix[self.offsets[i]]
    }

    /// Every URL with its total views, by views desc then url asc.
    pub fn totals_desc(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.by_total
            .iter()
            .map(move |&i| (&*self.names[i as usize], self.total(i as usize)))
    }

    /// The top `k` URLs by total views (desc, then url asc), optionally only those of `host`.
    pub fn top(&self, host: Option<&str>, k: usize) -> Vec<(Arc<str>, u64)> {
        let ids: &[u32] = match host {
            None => &self.by_total,
            Some(h) => self.hosts.get(h).map_or(&[], |v| v.as_slice()),
        };
        ids.iter()
            .take(k)
            .map(|&i| (self.names[i as usize].clone(), self.total(i as usize)))
            .filter(|(_, v)| *v > 0)
            .collect()
    }

    /// Every host with URLs in the view.
    pub fn hosts(&self) -> impl Iterator<Item = &Arc<str>> + '_ {
        self.hosts.keys()
    }

    /// URLs with views in cells `>= from_cell`, among the cells that were ahead of the clock
    /// when the view was computed (so empty for any cell after that).
    pub fn late(&self, from_cell: i64) -> Vec<Arc<str>> {
        let a = self.late.partition_point(|c| c.0 < from_cell);
        let mut ids: Vec<u32> = self.late[a..].iter().map(|c| c.1).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
            .map(|i| self.names[i as usize].clone())
            .collect()
    }

    /// Calls `f(url, views)` for every URL (whose host is `host`, when given; see
    /// `tally_core::url::host_of`) with non-zero views in `[from_cell, to_cell)`.
    pub fn range_totals<'a>(
        &'a self,
        from_cell: i64,
        to_cell: i64,
        host: Option<&str>,
        mut f: impl FnMut(&'a str, u64),
    ) {
        let mut visit = |i: usize| {
            let (a, b) = self.cell_range(i, from_cell, to_cell);
            let v = self.prefix[b] - self.prefix[a];
            if v > 0 {
                f(&self.names[i], v);
            }
        };
        match host {
            Some(h) => {
                if let Some(ids) = self.hosts.get(h) {
                    ids.iter().for_each(|&i| visit(i as usize));
                }
            }
            None => (0..self.names.len()).for_each(visit),
        }
    }

    /// All URLs, ascending.
    pub fn url_list(&self) -> impl Iterator<Item = &str> + '_ {
        self.names.iter().map(|u| &**u)
    }

    /// Precision of the visitor sketches, `None` when the view has none.
    pub fn sketch_precision(&self) -> Option<u8> {
        self.visitors.as_ref().map(|v| v.precision)
    }

    /// The visitor sketch of `url` on UTC day `day` (days since the epoch), if any visitor.
    pub fn day_sketch(&self, url: &str, day: i64) -> Option<&VisitorSketch> {
        let (days, sketches) = self.visitors(url).day_sketches(day, day + 1);
        days.first().map(|_| &sketches[0])
    }

    /// The visitors of `url`: its day sketches and its cells' visitor lists (none when the view
    /// has no sketches or does not know `url`).
    pub fn visitors(&self, url: &str) -> KeyVisitors<'_> {
        self.id(url)
            .map_or_else(KeyVisitors::default, |i| self.url_visitors(i as u32))
    }

    /// The distinct visitors of `url` in the cells `[from_cell, to_cell)`, unioned with the
    /// speed layer's sketch `extra_sketch` and hashes `extra` (sorted, distinct) in one pass
    /// ([`VisitorSketch::union`]): the week sketches of the whole weeks in the range, the day
    /// sketches of the whole UTC days around them, the visitor lists of the cells of the UTC
    /// days the range cuts (a local day of a zone whose midnights are not UTC midnights).
    pub fn uniques_sketch(
        &self,
        url: &str,
        (from_cell, to_cell): (i64, i64),
        precision: u8,
        extra_sketch: Option<&VisitorSketch>,
        extra: &[u32],
    ) -> Result<VisitorSketch> {
        let k = self.visitors(url);
        let mut pieces = Pieces::default();
        // The whole UTC days [d0, d1) of the range, and the cells around them.
        let d0 = (from_cell + CELLS_PER_DAY - 1).div_euclid(CELLS_PER_DAY);
        let d1 = to_cell.div_euclid(CELLS_PER_DAY);
        let i = match self.id(url) {
            Some(i) if d0 < d1 && self.visitors.is_some() => i,
            _ => {
                k.collect(from_cell, to_cell, &mut pieces);
                return pieces.union(precision, extra_sketch, extra);
            }
        };
        k.collect(from_cell, d0 * CELLS_PER_DAY, &mut pieces);
        k.collect(d1 * CELLS_PER_DAY, to_cell, &mut pieces);
        // Whole weeks [w0, w1): the days [7 w0, 7 w1) lie inside the range.
        let w0 = (d0 + 6).div_euclid(7);
        let w1 = d1.div_euclid(7);
        if w1 <= w0 {
            pieces.sketches.extend(k.day_sketches(d0, d1).1);
            return pieces.union(precision, extra_sketch, extra);
        }
        let (s, e) = (self.week_offsets[i], self.week_offsets[i + 1]);
        let weeks = &self.weeks[s..e];
        let a = weeks.partition_point(|&w| w < w0);
        let b = a + weeks[a..].partition_point(|&w| w < w1);
        pieces.sketches.extend(&self.week_sketches[s + a..s + b]);
        pieces.sketches.extend(k.day_sketches(d0, 7 * w0).1);
        pieces.sketches.extend(k.day_sketches(7 * w1, d1).1);
        pieces.union(precision, extra_sketch, extra)
    }

    /// Views of every page of site `host` in the cells `[from_cell, to_cell)`.
    pub fn site_views(&self, host: &str, from_cell: i64, to_cell: i64) -> u64 {
        self.sites.range_views(host, from_cell, to_cell)
    }

    /// The non-zero `(cell, views)` of site `host` in `[from_cell, to_cell)`, ascending.
    pub fn site_cell_counts(&self, host: &str, from_cell: i64, to_cell: i64) -> Vec<(i64, u64)> {
        self.sites.cell_counts(host, from_cell, to_cell)
    }

    /// Every site (host) with views in `[from_cell, to_cell)`, with those views.
    pub fn site_totals(&self, from_cell: i64, to_cell: i64) -> Vec<(&Arc<str>, u64)> {
        self.sites.range_totals(from_cell, to_cell)
    }

    /// The distinct visitors of any page of site `host`: per UTC day and per cell (none when
    /// the view has no sketches).
    pub fn site_visitors(&self, host: &str) -> KeyVisitors<'_> {
        self.sites.visitors(host)
    }

    /// Every source key (referrer host, URL) of site `host` — only those of `url` when given —
    /// with views in the cells `[from_cell, to_cell)`, with those views (the visitors of the
    /// keys a caller needs: [`BatchView::source_visitors`]). A breakdown by any dimension sums
    /// these.
    pub fn sources_of<'a>(
        &'a self,
        host: &str,
        url: Option<&'a str>,
        cells: (i64, i64),
    ) -> impl Iterator<Item = SourceCount<'a>> + 'a {
        self.sources.of_host(host, url, cells)
    }

    /// The campaign keys of site `host` — its source keys added up by referrer host and UTM
    /// parameters (`tally_core::dims::write_campaign_key`) — with views in the cells
    /// `[from_cell, to_cell)`, with those views and the source keys each adds up (visitors:
    /// [`BatchView::source_visitors`] of those). A grouping by campaign dimensions alone reads
    /// these instead of [`BatchView::sources_of`]: the same numbers, from a few entries per
    /// referrer and campaign instead of one per page. Built per site at its first read.
    pub fn campaigns_of<'a>(
        &'a self,
        host: &str,
        cells: (i64, i64),
    ) -> impl Iterator<Item = CampaignCount<'a>> + 'a {
        self.sources.campaigns_of(host, cells)
    }

    /// The URLs of site `host` (only `url`, when given) with views in the cells
    /// `[from_cell, to_cell)`, with those views (visitors: [`BatchView::url_visitors`]). A
    /// URL's numbers are those of its source keys together: a grouping by a function of the
    /// URL alone reads these instead.
    pub fn urls_of<'a>(
        &'a self,
        host: &str,
        url: Option<&str>,
        (from_cell, to_cell): (i64, i64),
    ) -> impl Iterator<Item = UrlCount<'a>> + 'a {
        let ids: &'a [u32] = match url {
            Some(u) => match self.index.get(u) {
                Some(i) if tally_core::url::host_of(u) == Some(host) => std::slice::from_ref(i),
                _ => &[],
            },
            None => self.hosts.get(host).map_or(&[], Vec::as_slice),
        };
        ids.iter().filter_map(move |&i| {
            let (a, b) = self.cell_range(i as usize, from_cell, to_cell);
            let views = self.prefix[b] - self.prefix[a];
            (views > 0).then(|| UrlCount {
                url: &self.names[i as usize],
                key: i,
                views,
                cells: &self.cell[a..b],
                prefix: &self.prefix[a..=b],
            })
        })
    }

    /// All the visitors of URL `key` (a [`UrlCount::key`]).
    pub fn url_visitors(&self, key: u32) -> KeyVisitors<'_> {
        let i = key as usize;
        match &self.visitors {
            Some(v) if i < self.names.len() => {
                let (s, e) = (self.offsets[i], self.offsets[i + 1]);
                v.key(i, s, &self.cell[s..e])
            }
            _ => KeyVisitors::default(),
        }
    }

    /// All the visitors of source key `key` (a [`SourceCount::key`] of this view): per UTC
    /// day and per cell (none when the view has no sketches).
    pub fn source_visitors(&self, key: u32) -> KeyVisitors<'_> {
        self.sources.visitors(key)
    }

    /// Number of (source key, cell) entries.
    pub fn source_cells(&self) -> usize {
        self.sources.cells()
    }

    /// Number of (url, cell) entries (memory grows with this).
    pub fn cells(&self) -> usize {
        self.cell.len()
    }
}

/// `prefix[j]` = the sum of `views[..j]` (`len + 1` entries): any run's views in one subtraction.
pub(crate) fn prefix_sums(views: &[u64]) -> Vec<u64> {
    let mut prefix = Vec::with_capacity(views.len() + 1);
    let mut acc = 0u64;
    prefix.push(0);
    for v in views {
        acc += v;
        prefix.push(acc);
    }
    prefix
}

/// Per URL, the union of its day sketches per week: `(offsets, weeks, sketches)` laid out like
/// the day sketches.
fn week_unions(
    precision: u8,
    offsets: &[usize],
    days: &[i64],
    sketches: &[VisitorSketch],
) -> (Vec<usize>, Vec<i64>, Vec<VisitorSketch>) {
    let mut w_offsets = Vec::with_capacity(offsets.len());
    let mut weeks = Vec::new();
    let mut unions = Vec::new();
    w_offsets.push(0);
    for u in 0..offsets.len().saturating_sub(1) {
        let (s, e) = (offsets[u], offsets[u + 1]);
        let mut j = s;
        while j < e {
            let w = days[j].div_euclid(7);
            let k = j + days[j..e].partition_point(|d| d.div_euclid(7) == w);
            // Every day of the URL is a sketch of `precision`: the union cannot fail.
            let merged = VisitorSketch::union(precision, &sketches[j..k], &[])
                .expect("day sketches share the view's precision");
            weeks.push(w);
            unions.push(merged);
            j = k;
        }
        w_offsets.push(weeks.len());
    }
    (w_offsets, weeks, unions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> ViewData {
        ViewData {
            urls: vec![
                "http://a.com/".into(),
                "http://b.com/x".into(),
                "http://b.com/y".into(),
            ],
            offsets: vec![0, 3, 4, 6],
            cell: vec![10, 12, 20, 11, 10, 30],
            views: vec![1, 2, 3, 9, 5, 1],
            events: 21,
            ..Default::default()
        }
    }

    /// Uniques over any range, answered from week and day sketches, equal the union of the day
    /// sketches of the range (which the precision-8 sparse limit keeps exact below 64 visitors
    /// and dense above: both regimes are covered).
    #[test]
    fn uniques_from_week_and_day_sketches_equal_the_union_of_days() {
        use crate::kernel::SketchData;
        let p = 8;
        // One URL, days -10..40 (negative days too, so weeks straddle the epoch), some missing;
        // visitor v is seen on day d when (v + d) % 5 == 0.
        let days: Vec<i64> = (-10..40).filter(|d| d % 6 != 3).collect();
        let sketches: Vec<VisitorSketch> = days
            .iter()
            .map(|d| {
                let hashes = (0..250u32)
                    .filter(|v| (*v as i64 + d).rem_euclid(5) == 0)
                    .map(|v| v.wrapping_mul(0x9e37_79b1))
                    .collect();
                VisitorSketch::from_hashes(p, hashes).unwrap()
            })
            .collect();
        let mut d = data();
        d.sketches = Some(SketchData {
            precision: p,
            offsets: vec![0, days.len(), days.len(), days.len()],
            days: days.clone(),
            sketches: sketches.clone(),
            ..Default::default()
        });
        let v = BatchView::from_data("v".into(), Seq(21), 0, d);
        let extra = [1u32, 2, 3];
        let cells = |d: i64| d * CELLS_PER_DAY;
        for from in -12..42 {
            for to in from + 1..43 {
                let got = v
                    .uniques_sketch("http://a.com/", (cells(from), cells(to)), p, None, &extra)
                    .unwrap();
                let in_range = days
                    .iter()
                    .zip(&sketches)
                    .filter(|(d, _)| (from..to).contains(*d))
                    .map(|(_, s)| s);
                let want = VisitorSketch::union(p, in_range, &extra).unwrap();
                assert_eq!(got.estimate(), want.estimate(), "[{from}, {to})");
                assert_eq!(got.is_sparse(), want.is_sparse(), "[{from}, {to})");
            }
        }
    }

    /// A site is the sum of its URLs' cells and the union of their day sketches.
    #[test]
    fn sites_sum_their_pages_and_union_their_visitors() {
        use crate::kernel::SketchData;
        let p = 8;
        let sk = |v: &[u32]| VisitorSketch::from_hashes(p, v.to_vec()).unwrap();
        let mut d = data();
        // b.com/x sees visitors 1, 2 on day 0; b.com/y sees 2, 3 on day 0 and 4 on day 1.
        d.sketches = Some(SketchData {
            precision: p,
            offsets: vec![0, 0, 1, 3],
            days: vec![0, 0, 1],
            sketches: vec![sk(&[1, 2]), sk(&[2, 3]), sk(&[4])],
            ..Default::default()
        });
        let v = BatchView::from_data("v".into(), Seq(21), 0, d);
        // b.com/x has (11: 9); b.com/y has (10: 5), (30: 1).
        assert_eq!(
            v.site_cell_counts("b.com", 0, 100),
            vec![(10, 5), (11, 9), (30, 1)]
        );
        assert_eq!(v.site_views("b.com", 10, 12), 14);
        assert_eq!(v.site_views("a.com", 0, 100), 6);
        assert_eq!(v.site_views("nope.com", 0, 100), 0);
        let mut totals: Vec<(String, u64)> = v
            .site_totals(0, 100)
            .into_iter()
            .map(|(h, n)| (h.to_string(), n))
            .collect();
        totals.sort();
        assert_eq!(totals, vec![("a.com".into(), 6), ("b.com".into(), 15)]);
        let (days, sketches) = v.site_visitors("b.com").day_sketches(0, 2);
        assert_eq!(days, [0, 1]);
        assert_eq!(sketches[0].estimate().round(), 3.0, "visitor 2 counts once");
        assert_eq!(sketches[1].estimate().round(), 1.0);
        assert!(v.site_visitors("a.com").day_sketches(0, 2).0.is_empty());
    }

    #[test]
    fn ranges_totals_and_hosts() {
        let v = BatchView::from_data("v".into(), Seq(21), 0, data());
        assert_eq!(v.range_views("http://a.com/", 0, 100), 6);
        assert_eq!(v.range_views("http://a.com/", 11, 20), 2);
        assert_eq!(v.range_views("http://a.com/", 12, 12), 0);
        assert_eq!(v.range_views("http://a.com/", 20, 10), 0);
        assert_eq!(v.range_views("http://zzz/", 0, 100), 0);
        assert_eq!(
            v.cell_counts("http://a.com/", 10, 20),
            vec![(10, 1), (12, 2)]
        );
        let top: Vec<_> = v.totals_desc().collect();
        assert_eq!(
            top,
            vec![
                ("http://b.com/x", 9),
                ("http://a.com/", 6),
                ("http://b.com/y", 6)
            ]
        );
        let mut got = Vec::new();
        v.range_totals(10, 12, Some("b.com"), |u, n| got.push((u.to_string(), n)));
        assert_eq!(
            got,
            vec![
                ("http://b.com/x".to_string(), 9),
                ("http://b.com/y".to_string(), 5)
            ]
        );
        assert!(v.day_sketch("http://a.com/", 0).is_none());
        assert!(v.visitors("http://a.com/").day_sketches(0, 10).0.is_empty());
    }
}
