//! Whole sites (hosts) of a batch view: views per cell and visitor sketches per UTC day summed
//! and unioned over every URL of the host, built once when the view is loaded. A site's numbers
//! are then as cheap as one URL's (two binary searches for views; a few sketches for uniques),
//! and its uniques are the distinct visitors of any of its pages — never a sum of per-URL
//! uniques.
//!
//! Memory: a site has at most one entry per cell and per day in which any of its URLs has one,
//! so the cells of all sites are at most the cells of all URLs (far fewer: a site's URLs share
//! cells); a site-day sketch is sparse (4 bytes per distinct visitor) until it reaches the
//! sketch's register size, `2^p` bytes.

use std::sync::Arc;

use tally_core::hash::FastMap;

use crate::sketch::VisitorSketch;

/// The sites of a view, laid out like its URLs: site `i` owns cells
/// `cell[offsets[i]..offsets[i+1]]` and days `days[sketch_offsets[i]..sketch_offsets[i+1]]`.
#[derive(Debug, Default)]
pub(crate) struct Sites {
    names: Vec<Arc<str>>,
    index: FastMap<Arc<str>, u32>,
    offsets: Vec<usize>,
    cell: Vec<i64>,
    /// `prefix[j]` = views of cells `0..j` over all sites.
    prefix: Vec<u64>,
    sketch_offsets: Vec<usize>,
    days: Vec<i64>,
    sketches: Vec<VisitorSketch>,
}

/// What [`Sites::build`] reads of one URL: its cells with views, and its day sketches.
pub(crate) struct UrlPart<'a> {
    pub(crate) cells: &'a [i64],
    pub(crate) views: &'a [u64],
    pub(crate) days: &'a [i64],
    pub(crate) sketches: &'a [VisitorSketch],
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
            sketch_offsets: vec![0],
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
            s.offsets.push(s.cell.len());
            if let Some(p) = precision {
                let mut days: Vec<(i64, &VisitorSketch)> = parts
                    .iter()
                    .flat_map(|u| u.days.iter().copied().zip(u.sketches.iter()))
                    .collect();
                days.sort_unstable_by_key(|d| d.0);
                let mut j = 0;
                while j < days.len() {
                    let day = days[j].0;
                    let k = j + days[j..].partition_point(|d| d.0 == day);
                    // Every day sketch of the view has its precision: the union cannot fail.
                    let merged = VisitorSketch::union(p, days[j..k].iter().map(|d| d.1), &[])
                        .expect("day sketches share the view's precision");
                    s.days.push(day);
                    s.sketches.push(merged);
                    j = k;
                }
            }
            s.sketch_offsets.push(s.days.len());
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

    /// `(day, sketch)` of `host` for the days in `[from_day, to_day)`.
    pub(crate) fn day_sketches(
        &self,
        host: &str,
        from_day: i64,
        to_day: i64,
    ) -> impl Iterator<Item = (i64, &VisitorSketch)> + '_ {
        let (s, e) = self.id(host).map_or((0, 0), |i| {
            (self.sketch_offsets[i], self.sketch_offsets[i + 1])
        });
        let days = &self.days[s..e];
        let a = days.partition_point(|&d| d < from_day);
        let b = a + days[a..].partition_point(|&d| d < to_day);
        days[a..b]
            .iter()
            .copied()
            .zip(self.sketches[s + a..s + b].iter())
    }
}
