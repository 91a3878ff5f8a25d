//! The sources of a batch view: views per cell, visitor sketches per UTC day and visitor lists
//! per cell per **source key** (referrer host, URL) — `tally_core::dims` — the data every breakdown is a sum over.
//! Built at load from the view's `sources.parquet` (computed by
//! [`crate::kernel::compute_sources`]), indexed by the URL's host: a breakdown of one site reads
//! only that site's keys.

use std::sync::Arc;

use tally_core::hash::FastMap;

use crate::kernel::{SketchData, ViewData};
use crate::visitors::KeyVisitors;

/// One source key's share of a range ([`crate::BatchView::sources_of`]).
#[derive(Debug, Clone, Copy)]
pub struct SourceCount<'a> {
    /// The referrer's host, empty for a direct visit.
    pub referrer: &'a str,
    pub url: &'a str,
    /// The key's number in the view ([`crate::BatchView::source_visitors`]).
    pub key: u32,
    /// The number of `referrer` in the view: equal numbers, equal strings. A caller grouping
    /// by a function of the referrer alone computes it once per referrer with it.
    pub referrer_id: u32,
    /// Views in the cell range.
    pub views: u64,
    /// Its cells in the range, ascending, and their views.
    pub cells: &'a [i64],
    pub cell_views: &'a [u64],
}

/// Laid out like the view's URLs: key `i` owns `cell[offsets[i]..offsets[i+1]]`.
#[derive(Debug, Default)]
pub(crate) struct Sources {
    /// `(referrer host, url)` per key, as numbers into `referrers` and `urls`: a URL reached
    /// from many sites is stored once.
    keys: Vec<(u32, u32)>,
    referrers: Vec<Box<str>>,
    urls: Vec<Box<str>>,
    offsets: Vec<usize>,
    cell: Vec<i64>,
    views: Vec<u64>,
    /// `prefix[j]` = views of cells `0..j` over all keys.
    prefix: Vec<u64>,
    /// Visitor sketches per (key, UTC day) and lists per (key, cell), when computed.
    visitors: Option<SketchData>,
    /// Host → its keys.
    hosts: FastMap<Arc<str>, Vec<u32>>,
}

impl Sources {
    /// The index of computed or loaded source data (a key that is not a source key — which the
    /// kernel never writes — counts as a direct view of that URL).
    pub(crate) fn from_data(data: ViewData) -> Sources {
        let ViewData {
            urls,
            offsets,
            cell,
            views,
            sketches,
            ..
        } = data;
        let prefix = crate::view::prefix_sums(&views);
        let mut hosts: FastMap<Arc<str>, Vec<u32>> = FastMap::default();
        let mut keys = Vec::with_capacity(urls.len());
        let mut referrers = Interner::default();
        let mut distinct_urls = Interner::default();
        for (i, k) in urls.iter().enumerate() {
            let (referrer, url) = tally_core::dims::parse_source_key(k).unwrap_or(("", k));
            if let Some(h) = tally_core::url::host_of(url) {
                match hosts.get_mut(h) {
                    Some(v) => v.push(i as u32),
                    None => {
                        hosts.insert(h.into(), vec![i as u32]);
                    }
                }
            }
            keys.push((referrers.id(referrer), distinct_urls.id(url)));
        }
        Sources {
            keys,
            referrers: referrers.names,
            urls: distinct_urls.names,
            offsets: if offsets.is_empty() { vec![0] } else { offsets },
            cell,
            views,
            prefix,
            visitors: sketches,
            hosts,
        }
    }

    /// Every source key of site `host` with views in the cells `[from_cell, to_cell)`, with
    /// those views and its visitors; only the keys of `url` when given.
    pub(crate) fn of_host<'a>(
        &'a self,
        host: &str,
        url: Option<&'a str>,
        (from_cell, to_cell): (i64, i64),
    ) -> impl Iterator<Item = SourceCount<'a>> + 'a {
        let ids = self.hosts.get(host).map_or(&[][..], |h| h.as_slice());
        ids.iter().filter_map(move |&i| {
            if url.is_some_and(|f| f != &*self.urls[self.keys[i as usize].1 as usize]) {
                return None;
            }
            Some(self.at(i, (from_cell, to_cell))).filter(|c| c.views > 0)
        })
    }

    /// All the visitors of key `key` (a [`SourceCount::key`]); the caller picks the range.
    pub(crate) fn visitors(&self, key: u32) -> KeyVisitors<'_> {
        let i = key as usize;
        let (s, e) = (self.offsets[i], self.offsets[i + 1]);
        self.visitors
            .as_ref()
            .map_or_else(KeyVisitors::default, |v| v.key(i, s, &self.cell[s..e]))
    }

    /// Key `key`'s share of the cells `[from_cell, to_cell)` (with no views when it has none).
    fn at(&self, key: u32, (from_cell, to_cell): (i64, i64)) -> SourceCount<'_> {
        let i = key as usize;
        let (referrer_id, url) = self.keys[i];
        let (s, e) = (self.offsets[i], self.offsets[i + 1]);
        let cells = &self.cell[s..e];
        let a = cells.partition_point(|&c| c < from_cell);
        let b = a + cells[a..].partition_point(|&c| c < to_cell);
        SourceCount {
            referrer: &self.referrers[referrer_id as usize],
            url: &self.urls[url as usize],
            key,
            referrer_id,
            views: self.prefix[s + b] - self.prefix[s + a],
            cells: &cells[a..b],
            cell_views: &self.views[s + a..s + b],
        }
    }

    /// Number of (source key, cell) entries.
    pub(crate) fn cells(&self) -> usize {
        self.cell.len()
    }
}

/// Numbers distinct strings in order of first sight.
#[derive(Default)]
struct Interner<'a> {
    ids: FastMap<&'a str, u32>,
    names: Vec<Box<str>>,
}

impl<'a> Interner<'a> {
    fn id(&mut self, name: &'a str) -> u32 {
        *self.ids.entry(name).or_insert_with(|| {
            self.names.push(name.into());
            (self.names.len() - 1) as u32
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::dims::source_key;

    #[test]
    fn a_host_lists_its_keys_with_range_views() {
        let urls = vec![
            source_key("", "https://a.test/"),
            source_key("g.test", "https://a.test/"),
            source_key("g.test", "https://b.test/x"),
        ];
        let mut urls_sorted = urls.clone();
        urls_sorted.sort();
        assert_eq!(urls, urls_sorted);
        let data = ViewData {
            urls,
            offsets: vec![0, 2, 3, 4],
            cell: vec![10, 20, 10, 10],
            views: vec![1, 2, 4, 8],
            ..Default::default()
        };
        let s = Sources::from_data(data);
        let got: Vec<(&str, &str, u64)> = s
            .of_host("a.test", None, (0, 15))
            .map(|c| (c.referrer, c.url, c.views))
            .collect();
        assert_eq!(
            got,
            vec![("", "https://a.test/", 1), ("g.test", "https://a.test/", 4)]
        );
        let all: u64 = s.of_host("a.test", None, (0, 100)).map(|c| c.views).sum();
        assert_eq!(all, 7);
        assert_eq!(
            s.of_host("a.test", Some("https://b.test/x"), (0, 100))
                .count(),
            0
        );
        assert_eq!(s.of_host("b.test", None, (0, 100)).count(), 1);
        assert_eq!(s.cells(), 4);
    }
}
