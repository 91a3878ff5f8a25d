//! The sources of a batch view: views per cell, visitor sketches per UTC day and visitor lists
//! per cell per **source key** (referrer host, URL) — `tally_core::dims` — the data every breakdown is a sum over.
//! Built at load from the view's `sources.parquet` (computed by
//! [`crate::kernel::compute_sources`]), indexed by the URL's host: a breakdown of one site reads
//! only that site's keys.

use std::sync::{Arc, OnceLock};

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

/// One campaign key's share of a range ([`crate::BatchView::campaigns_of`]): the source keys of
/// a site with the same referrer host and UTM parameters, added up.
#[derive(Debug, Clone, Copy)]
pub struct CampaignCount<'a> {
    /// The referrer's host, empty for a direct visit.
    pub referrer: &'a str,
    /// The campaign's URL: the site's origin, `/` and the UTM parameters
    /// (`tally_core::dims::write_campaign_key`).
    pub url: &'a str,
    /// Views in the cell range.
    pub views: u64,
    /// Its cells in the range, ascending, and their views.
    pub cells: &'a [i64],
    pub cell_views: &'a [u64],
    /// The source keys it adds up (for [`crate::BatchView::source_visitors`]).
    pub keys: &'a [u32],
}

/// A site's campaign keys: built at its first breakdown by campaign dimensions, once per view.
#[derive(Debug, Default)]
struct Campaigns {
    /// Per campaign: its referrer host and campaign URL.
    names: Vec<(Box<str>, Box<str>)>,
    /// Campaign `i` owns `cell[offsets[i]..offsets[i + 1]]` and `keys[key_offsets[i]..key_offsets[i + 1]]`.
    offsets: Vec<usize>,
    cell: Vec<i64>,
    views: Vec<u64>,
    /// `prefix[j]` = views of cells `0..j` over all campaigns.
    prefix: Vec<u64>,
    key_offsets: Vec<usize>,
    keys: Vec<u32>,
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
    /// Host → its campaign keys, built at the first read.
    campaigns: FastMap<Arc<str>, OnceLock<Campaigns>>,
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
        let campaigns = hosts.keys().map(|h| (h.clone(), OnceLock::new())).collect();
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
            campaigns,
        }
    }

    /// The campaign keys of site `host` with views in the cells `[from_cell, to_cell)`, with
    /// those views: what [`Sources::of_host`] gives, added up by campaign
    /// (`tally_core::dims::is_campaign_dimension` groupings read these), in a few entries per
    /// referrer instead of one per page.
    pub(crate) fn campaigns_of<'a>(
        &'a self,
        host: &str,
        (from_cell, to_cell): (i64, i64),
    ) -> impl Iterator<Item = CampaignCount<'a>> + 'a {
        let c = self
            .campaigns
            .get(host)
            .map(|once| once.get_or_init(|| self.build_campaigns(host)));
        let n = c.map_or(0, |c| c.names.len());
        (0..n).filter_map(move |i| {
            let c = c?;
            let (s, e) = (c.offsets[i], c.offsets[i + 1]);
            let cells = &c.cell[s..e];
            let a = cells.partition_point(|&x| x < from_cell);
            let b = a + cells[a..].partition_point(|&x| x < to_cell);
            let views = c.prefix[s + b] - c.prefix[s + a];
            (views > 0).then(|| CampaignCount {
                referrer: &c.names[i].0,
                url: &c.names[i].1,
                views,
                cells: &cells[a..b],
                cell_views: &c.views[s + a..s + b],
                keys: &c.keys[c.key_offsets[i]..c.key_offsets[i + 1]],
            })
        })
    }

    /// Groups the keys of `host` by campaign key and adds up their cells.
    fn build_campaigns(&self, host: &str) -> Campaigns {
        let ids = self.hosts.get(host).map_or(&[][..], |h| h.as_slice());
        let mut index: FastMap<String, usize> = FastMap::default();
        let mut members: Vec<Vec<u32>> = Vec::new();
        let mut out = Campaigns::default();
        let mut name = String::new();
        for &k in ids {
            let (r, u) = self.keys[k as usize];
            let (referrer, url) = (&self.referrers[r as usize], &self.urls[u as usize]);
            tally_core::dims::write_campaign_key(&mut name, referrer, url);
            let i = match index.get(&name) {
                Some(&i) => i,
                None => {
                    let (_, campaign_url) =
                        tally_core::dims::parse_source_key(&name).unwrap_or(("", name.as_str()));
                    out.names.push((referrer.clone(), campaign_url.into()));
                    members.push(Vec::new());
                    index.insert(name.clone(), members.len() - 1);
                    members.len() - 1
                }
            };
            members[i].push(k);
        }
        out.offsets.push(0);
        out.key_offsets.push(0);
        let mut cells: Vec<(i64, u64)> = Vec::new();
        for keys in members {
            cells.clear();
            for &k in &keys {
                let (s, e) = (self.offsets[k as usize], self.offsets[k as usize + 1]);
                cells.extend(
                    self.cell[s..e]
                        .iter()
                        .copied()
                        .zip(self.views[s..e].iter().copied()),
                );
            }
            cells.sort_unstable_by_key(|c| c.0);
            let start = out.cell.len();
            for &(cell, n) in cells.iter() {
                match out.views.last_mut() {
                    Some(v) if out.cell.len() > start && out.cell.last() == Some(&cell) => *v += n,
                    _ => {
                        out.cell.push(cell);
                        out.views.push(n);
                    }
                }
            }
            out.offsets.push(out.cell.len());
            out.keys.extend(keys);
            out.key_offsets.push(out.keys.len());
        }
        out.prefix = crate::view::prefix_sums(&out.views);
        out
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
    use std::collections::BTreeMap;
    use tally_core::dims::{is_campaign_dimension, source_key, Dimension};

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

    /// A site's campaign keys add up its source keys by referrer and UTM parameters: every
    /// campaign dimension groups them as it groups the source keys, cell by cell.
    #[test]
    fn campaign_keys_add_up_the_source_keys_of_a_campaign() {
        let mut urls = vec![
            source_key("", "https://a.test/"),
            source_key("", "https://a.test/p?utm_source=news"),
            source_key("", "https://a.test/q"),
            source_key("g.test", "https://a.test/"),
            source_key("g.test", "https://a.test/q?x=1"),
            source_key("g.test", "https://a.test/r?utm_source=news&utm_medium=mail"),
            source_key("", "https://b.test/"),
        ];
        urls.sort();
        let n = urls.len();
        // Key i has cells 10 + i % 3 and 20, with views i + 1 and 1.
        let mut offsets = vec![0];
        let (mut cell, mut views) = (Vec::new(), Vec::new());
        for i in 0..n {
            cell.extend([10 + (i as i64 % 3), 20]);
            views.extend([i as u64 + 1, 1]);
            offsets.push(cell.len());
        }
        let s = Sources::from_data(ViewData {
            urls,
            offsets,
            cell,
            views,
            ..Default::default()
        });
        for range in [(0, 100), (11, 21), (12, 13)] {
            let campaigns: Vec<CampaignCount<'_>> = s.campaigns_of("a.test", range).collect();
            assert!(
                campaigns.len() < s.of_host("a.test", None, range).count() || range == (12, 13)
            );
            for d in Dimension::ALL
                .into_iter()
                .filter(|d| is_campaign_dimension(*d))
            {
                let mut want: BTreeMap<String, BTreeMap<i64, u64>> = BTreeMap::new();
                for c in s.of_host("a.test", None, range) {
                    let g = want
                        .entry(d.value(c.url, c.referrer).into_owned())
                        .or_default();
                    for (cell, n) in c.cells.iter().zip(c.cell_views) {
                        *g.entry(*cell).or_default() += n;
                    }
                }
                let mut got: BTreeMap<String, BTreeMap<i64, u64>> = BTreeMap::new();
                for c in &campaigns {
                    let g = got
                        .entry(d.value(c.url, c.referrer).into_owned())
                        .or_default();
                    assert_eq!(c.views, c.cell_views.iter().sum::<u64>());
                    for (cell, n) in c.cells.iter().zip(c.cell_views) {
                        *g.entry(*cell).or_default() += n;
                    }
                }
                assert_eq!(got, want, "{d:?} in {range:?}");
            }
        }
        // Every key of the site is in exactly one campaign.
        let mut keys: Vec<u32> = s
            .campaigns_of("a.test", (0, 100))
            .flat_map(|c| c.keys.to_vec())
            .collect();
        keys.sort_unstable();
        let mut all: Vec<u32> = s.of_host("a.test", None, (0, 100)).map(|c| c.key).collect();
        all.sort_unstable();
        assert_eq!(keys, all);
        assert_eq!(s.campaigns_of("c.test", (0, 100)).count(), 0);
    }
}
