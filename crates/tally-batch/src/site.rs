//! Whole sites (hosts) of a batch view: views per cell and visitor sketches per UTC day summed
//! and unioned over every URL of the host, built once when the view is loaded. A site's numbers
//! are then as cheap as one URL's (two binary searches for views; a few sketches for uniques),
//! and its uniques are the distinct visitors of any of its pages — never a sum of per-URL
//! uniques.
//!
//! Memory: a site has at most one entry per cell and per day in which any of its URLs has one,
//! so the cells of all sites are at most the cells of all URLs (far fewer: a site's URLs share
//! cells); a site-day sketch is sparse (4 bytes per distinct visitor) until it reaches the
//! sketch's register size, `2^p` bytes; a site-cell visitor list is 4 bytes per distinct
//! visitor of the site in that cell (at most the sum of its URLs' lists).

use std::sync::Arc;

use tally_core::hash::FastMap;

use crate::kernel::SketchData;
use crate::sketch::VisitorSketch;
use crate::visitors::KeyVisitors;

/// The sites of a view, laid out like its URLs: site `i` owns cells
/// `cell[offsets[i]..offsets[i+1]]`, and its visitors are key `i` of `visitors`.
#[derive(Debug, Default)]
pub(crate) struct Sites {
    names: Vec<Arc<str>>,
    index: FastMap<Arc<str>, u32>,
    offsets: Vec<usize>,
    cell: Vec<i64>,
    /// `prefix[j]` = views of cells `0..j` over all sites.
    prefix: Vec<u64>,
    /// Site-day sketches and site-cell visitor lists, when the view has sketches.
    visitors: Option<SketchData>,
}

/// What [`Sites::build`] reads of one URL: its cells with views, and its visitors.
pub(crate) struct UrlPart<'a> {
    pub(crate) cells: &'a [i64],
    pub(crate) views: &'a [u64],
    pub(crate) visitors: KeyVisitors<'a>,
}

impl Sites {
    /// Sums and unions the URLs of each host. `hosts` lists each host with its URLs' parts.
    pub(crate) fn build<'a>(
        precision: Option<u8>,
        hosts: impl IntoIterator<Item = (Arc<str>, Vec<UrlPart<'a>>)>,
    ) -> Sites {
        let mut s = Sites {
            offsets: vec![0],
            prefix: vec![0],
            visitors: precision.map(|p| SketchData::empty(p, 0, 0)),
            ..Default::default()
        };
        let mut hosts: Vec<(Arc<str>, Vec<UrlPart<'a>>)> = hosts.into_iter().collect();
        hosts.sort_by(|a, b| a.0.cmp(&b.0));
        let mut acc = 0u64;
        for (host, parts) in hosts {
            let mut cells: Vec<(i64, u64)> = parts
                .iter()
                .flat_map(|p| p.cells.iter().copied().zip(p.views.iter().copied()))
                .collect();
            cells.sort_unstable_by_key(|c| c.0);
            let mut last: Option<i64> = None;
            for (c, v) in cells {
                if last == Some(c) {
                    acc += v;
                    *s.prefix.last_mut().expect("prefix starts with 0") = acc;
                } else {
                    acc += v;
                    s.cell.push(c);
                    s.prefix.push(acc);
                    last = Some(c);
                }
            }
            if let Some(v) = s.visitors.as_mut() {
                // Each site cell's visitors: the union of its URLs' lists of that cell.
                let mut lists: Vec<(i64, &[u32])> = parts
                    .iter()
                    .flat_map(|u| u.visitors.cell_lists(i64::MIN, i64::MAX))
                    .collect();
                lists.sort_by_key(|l| l.0);
                let mut j = 0;
                for &c in &s.cell[*s.offsets.last().expect("offsets start with 0")..] {
                    let k = j + lists[j..].partition_point(|l| l.0 <= c);
                    match &lists[j..k] {
                        [] => {}
                        [(_, one)] => v.cell_hashes.extend_from_slice(one),
                        many => {
                            let mut all: Vec<u32> =
                                many.iter().flat_map(|l| l.1.iter().copied()).collect();
                            all.sort_unstable();
                            all.dedup();
                            v.cell_hashes.extend_from_slice(&all);
                        }
                    }
                    v.cell_offsets.push(
                        u32::try_from(v.cell_hashes.len())
                            .expect("a site's lists are its URLs' united"),
                    );
                    j = k;
                }
                // Each site day's sketch: the union of its URLs' sketches of that day.
                let mut days: Vec<(i64, &VisitorSketch)> = parts
                    .iter()
                    .flat_map(|u| {
                        let (days, sketches) = u.visitors.day_sketches(i64::MIN, i64::MAX);
                        days.iter().copied().zip(sketches.iter())
                    })
                    .collect();
                days.sort_unstable_by_key(|d| d.0);
                let mut j = 0;
                while j < days.len() {
                    let day = days[j].0;
                    let k = j + days[j..].partition_point(|d| d.0 == day);
                    // Every day sketch of the view has its precision: the union cannot fail.
                    let merged =
                        VisitorSketch::union(v.precision, days[j..k].iter().map(|d| d.1), &[])
                            .expect("day sketches share the view's precision");
                    v.days.push(day);
                    v.sketches.push(merged);
                    j = k;
                }
                v.offsets.push(v.days.len());
            }
            s.offsets.push(s.cell.len());
            s.index.insert(host.clone(), s.names.len() as u32);
            s.names.push(host);
        }
        s
    }

    fn id(&self, host: &str) -> Option<usize> {
        self.index.get(host).map(|&i| i as usize)
    }

    fn cell_range(&self, i: usize, from_cell: i64, to_cell: i64) -> (usize, usize) {
        let (s, e) = (self.offsets[i], self.offsets[i + 1]);
        if from_cell >= to_cell {
            return (s, s);
        }
        let cells = &self.cell[s..e];
        let a = cells.partition_point(|&c| c < from_cell);
        let b = a + cells[a..].partition_point(|&c| c < to_cell);
        (s + a, s + b)
    }

    /// Views of every page of `host` in the cells `[from_cell, to_cell)`.
    pub(crate) fn range_views(&self, host: &str, from_cell: i64, to_cell: i64) -> u64 {
        self.id(host).map_or(0, |i| {
            let (a, b) = self.cell_range(i, from_cell, to_cell);
            self.prefix[b] - self.prefix[a]
        })
    }

    /// The non-zero `(cell, views)` of `host` in `[from_cell, to_cell)`, ascending.
    pub(crate) fn cell_counts(&self, host: &str, from_cell: i64, to_cell: i64) -> Vec<(i64, u64)> {
        self.id(host).map_or_else(Vec::new, |i| {
            let (a, b) = self.cell_range(i, from_cell, to_cell);
            (a..b)
                .map(|j| (self.cell[j], self.prefix[j + 1] - self.prefix[j]))
                .collect()
        })
    }

    /// Every site with views in `[from_cell, to_cell)`, with those views.
    pub(crate) fn range_totals(&self, from_cell: i64, to_cell: i64) -> Vec<(&Arc<str>, u64)> {
        (0..self.names.len())
            .filter_map(|i| {
                let (a, b) = self.cell_range(i, from_cell, to_cell);
                let v = self.prefix[b] - self.prefix[a];
                (v > 0).then(|| (&self.names[i], v))
            })
            .collect()
    }

    /// The visitors of `host`, per UTC day and per cell.
    pub(crate) fn visitors(&self, host: &str) -> KeyVisitors<'_> {
        let Some(i) = self.id(host) else {
            return KeyVisitors::default();
        };
        let (s, e) = (self.offsets[i], self.offsets[i + 1]);
        self.visitors
            .as_ref()
            .map_or_else(KeyVisitors::default, |v| v.key(i, s, &self.cell[s..e]))
    }
}
