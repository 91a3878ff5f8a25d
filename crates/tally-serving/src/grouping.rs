//! A site's views grouped by the value of a function of (URL, referrer host) — and by time
//! bucket — across the batch view and the speed layer, then the visitors of the groups a caller
//! answers with: what `/v1/breakdown` and `POST /api/v2/query` are built on.

use std::sync::Arc;

use tally_batch::{BatchView, Piece, Pieces, VisitorSketch};
use tally_core::dims::Input;
use tally_core::hash::FastMap;
use tally_core::{Seq, CELL_MS};
use tally_speed::{SourceId, SourceSpeed, SpeedVisitors};

use crate::answer::speed_read;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::views::ViewManager;

/// The visitors collected for one group, from both layers.
#[derive(Default)]
struct Tally<'a> {
    batch: Pieces<'a>,
    speed: Vec<VisitorSketch>,
    hashes: Vec<u32>,
}

impl<'a> Tally<'a> {
    /// Adds a piece of the batch view's visitors.
    fn add_batch(&mut self, piece: Piece<'a>) {
        match piece {
            Piece::Day(s) => self.batch.sketches.push(s),
            Piece::Cell(l) => self.batch.lists.push(l),
        }
    }

    /// Adds the speed layer's visitors of one cell.
    fn add_speed(&mut self, v: SpeedVisitors, precision: u8) -> ApiResult<()> {
        self.hashes.extend_from_slice(&v.hashes);
        if let Some(r) = v.registers {
            self.speed
                .push(VisitorSketch::from_registers(precision, r).map_err(ApiError::internal)?);
        }
        Ok(())
    }

    /// The distinct visitors of the group: one union of everything collected.
    fn uniques(mut self, precision: u8) -> ApiResult<u64> {
        self.hashes.sort_unstable();
        self.hashes.dedup();
        let u = self
            .batch
            .union(precision, self.speed.iter(), &self.hashes)
            .map_err(ApiError::internal)?;
        Ok(u.estimate().round() as u64)
    }
}

/// The source keys of a site grouped by the value of a dimension (and by time bucket): the
/// first of two phases. Grouping adds up views only; after ranking the groups, the caller asks
/// for the uniques of the groups it answers with ([`Grouping::uniques`]), so a breakdown of a
/// site with 100 000 pages unions the visitors of its top ten, not of every page.
pub(crate) struct Grouping<'a, K> {
    /// Group values in order of first sight; a group is its index here.
    values: Vec<K>,
    index: FastMap<K, u32>,
    /// Views per group, without time buckets.
    totals: Vec<u64>,
    /// (group, bucket start) → views, with time buckets.
    views: FastMap<(u32, i64), u64>,
    view: Option<&'a Arc<BatchView>>,
    /// What the batch view's keys in `batch` are.
    kind: BatchKeys,
    /// The batch view's keys with their group.
    batch: Vec<(u32, u32)>,
    /// The speed layer's keys with their group (`None`: the speed layer could not be read).
    speed: Option<Vec<(u32, &'a SourceSpeed)>>,
    bucket_of: Option<&'a dyn Fn(i64) -> i64>,
    cutoff: Seq,
}

/// What a grouping reads of the batch view: the fewest entries that give its groups.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BatchKeys {
    /// Source keys (referrer host, URL) ([`BatchView::sources_of`]): any grouping.
    Sources,
    /// A site's URLs ([`BatchView::urls_of`]): a grouping by a function of the URL alone.
    Urls,
}

/// The speed layer's keys of site `host` (of `url` alone when given) after the cutoff of
/// `view` with views in `cells` (and per cell, for a grouping by time bucket: `per_cell`), for
/// a grouping whose value is a function of `input` — the fewest that give its groups, as
/// [`Grouping::new`] reads the batch view: for the whole site by campaign dimensions alone
/// (`by_campaign`: `tally_core::dims::is_campaign_dimension`) its campaign keys, for a function
/// of the URL alone its pages, else its source keys (referrer host, URL). The sums are the same
/// from any of them. `None` while the speed layer cannot be read.
pub(crate) fn speed_sources(
    state: &AppState,
    view: Option<&Arc<BatchView>>,
    host: &str,
    url: Option<&str>,
    cells: (i64, i64),
    per_cell: bool,
    (input, by_campaign): (Input, bool),
) -> ApiResult<Option<Vec<SourceSpeed>>> {
    let cutoff = ViewManager::cutoff(view);
    speed_read(match (url, by_campaign, input) {
        (None, true, _) => state.speed.campaigns(host, cutoff, cells, per_cell),
        (_, _, Input::Url) => state.speed.pages(host, url, cutoff, cells, per_cell),
        _ => state.speed.sources(host, url, cutoff, cells, per_cell),
    })
}

impl<'a, K: std::hash::Hash + Eq + Clone> Grouping<'a, K> {
    /// Groups the source keys of site `host` (of `url` alone when given) with views in `cells`
    /// — the batch view's, and `speed` (from [`speed_sources`] for the same view) — by
    /// `group_of(url, referrer host)` (`None` leaves a key out) and, with `bucket_of` (an
    /// instant → its time bucket's start), by time bucket too (else bucket 0). `group_of` is
    /// a function of `input` alone: called once per distinct URL (or referrer host) of each
    /// layer, not once per key. A grouping by the URL alone reads the batch view's URLs
    /// rather than their source keys (fewer entries, the same numbers); a grouping of the whole
    /// site by campaign dimensions alone (`by_campaign`:
    /// `tally_core::dims::is_campaign_dimension`) reads the view's campaign keys, whose URLs are
    /// their campaign's (`speed` must then come from [`speed_sources`] with the same `input`
    /// and `by_campaign`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        view: Option<&'a Arc<BatchView>>,
        speed: Option<&'a [SourceSpeed]>,
        host: &str,
        url: Option<&'a str>,
        cells: (i64, i64),
        (input, by_campaign, group_of): (Input, bool, impl Fn(&'a str, &'a str) -> Option<K>),
        bucket_of: Option<&'a dyn Fn(i64) -> i64>,
    ) -> Grouping<'a, K> {
        let mut g = Grouping {
            values: Vec::new(),
            index: FastMap::default(),
            totals: Vec::new(),
            views: FastMap::default(),
            view,
            kind: BatchKeys::Sources,
            batch: Vec::new(),
            speed: speed.map(|s| Vec::with_capacity(s.len())),
            bucket_of,
            cutoff: ViewManager::cutoff(view),
        };
        if let (Some(v), None, true) = (view, url, by_campaign) {
            // Each campaign once; phase two unions the visitors of the source keys it adds up.
            for c in v.campaigns_of(host, cells) {
                let Some(i) = group_of(c.url, c.referrer).map(|k| g.group(k)) else {
                    continue;
                };
                g.add_views(
                    i,
                    c.views,
                    c.cells.iter().copied().zip(c.cell_views.iter().copied()),
                );
                g.batch.extend(c.keys.iter().map(|&k| (i, k)));
            }
        } else if let (Some(v), Input::Url) = (view, input) {
            g.kind = BatchKeys::Urls;
            for c in v.urls_of(host, url, cells) {
                let Some(i) = group_of(c.url, "").map(|k| g.group(k)) else {
                    continue;
                };
                g.add_views(i, c.views, c.cell_views());
                g.batch.push((i, c.key));
            }
        } else if let Some(v) = view {
            // The group of each referrer host, computed once per referrer.
            let mut by_referrer: FastMap<u32, Option<u32>> = FastMap::default();
            for c in v.sources_of(host, url, cells) {
                let found = match input {
                    Input::Referrer => *by_referrer
                        .entry(c.referrer_id)
                        .or_insert_with(|| group_of(c.url, c.referrer).map(|k| g.group(k))),
                    Input::Url | Input::Both => group_of(c.url, c.referrer).map(|k| g.group(k)),
                };
                let Some(i) = found else {
                    continue;
                };
                g.add_views(
                    i,
                    c.views,
                    c.cells.iter().copied().zip(c.cell_views.iter().copied()),
                );
                g.batch.push((i, c.key));
            }
        }
        let mut memo: FastMap<&'a str, Option<u32>> = FastMap::default();
        for s in speed.unwrap_or_default() {
            let memo_key = match input {
                Input::Url => Some(s.url()),
                Input::Referrer => Some(s.referrer()),
                Input::Both => None,
            };
            let found = match memo_key {
                Some(key) => *memo
                    .entry(key)
                    .or_insert_with(|| group_of(s.url(), s.referrer()).map(|k| g.group(k))),
                None => group_of(s.url(), s.referrer()).map(|k| g.group(k)),
            };
            let Some(i) = found else {
                continue;
            };
            g.add_views(i, s.views, s.cells.iter().copied());
            if let Some(keys) = &mut g.speed {
                keys.push((i, s));
            }
        }
        g
    }

    fn group(&mut self, k: K) -> u32 {
        if let Some(&i) = self.index.get(&k) {
            return i;
        }
        let i = self.values.len() as u32;
        self.values.push(k.clone());
        self.index.insert(k, i);
        self.totals.push(0);
        i
    }

    fn add_views(&mut self, g: u32, views: u64, cells: impl Iterator<Item = (i64, u64)>) {
        match self.bucket_of {
            None => self.totals[g as usize] += views,
            Some(b) => {
                for (cell, n) in cells {
                    *self.views.entry((g, b(cell * CELL_MS))).or_default() += n;
                }
            }
        }
    }

    /// Whether the speed layer could be read.
    pub(crate) fn speed_available(&self) -> bool {
        self.speed.is_some()
    }

    /// Every (group value, bucket) with its views, in no particular order.
    pub(crate) fn groups(&self) -> impl Iterator<Item = (&K, i64, u64)> + '_ {
        let totals = match self.bucket_of {
            None => &self.totals[..],
            Some(_) => &[],
        };
        let totals = (self.values.iter().zip(totals)).map(|(k, &n)| (k, 0, n));
        let bucketed = (self.views.iter()).map(|(&(g, b), &n)| (&self.values[g as usize], b, n));
        totals.chain(bucketed)
    }

    /// The distinct visitors, in the cells `visitor_cells`, of each of `wanted` (group value,
    /// bucket): one union of the batch view's and the speed layer's visitors of the group's keys
    /// per item, never a sum of per-key uniques. A value this grouping does not have has none.
    /// Also says whether the speed layer's visitors could be read.
    pub(crate) fn uniques(
        &self,
        state: &AppState,
        wanted: &[(&K, i64)],
        visitor_cells: (i64, i64),
        precision: u8,
    ) -> ApiResult<(Vec<u64>, bool)> {
        let mut slot: FastMap<(u32, i64), usize> = FastMap::default();
        let mut want_group = vec![false; self.values.len()];
        for (n, (k, b)) in wanted.iter().enumerate() {
            if let Some(&g) = self.index.get(*k) {
                slot.insert((g, *b), n);
                want_group[g as usize] = true;
            }
        }
        let mut tallies: Vec<Tally<'a>> = wanted.iter().map(|_| Tally::default()).collect();
        let (va, vb) = visitor_cells;
        for (g, key) in &self.batch {
            let Some(view) = self.view.filter(|_| want_group[*g as usize]) else {
                continue;
            };
            let visitors = match self.kind {
                BatchKeys::Sources => view.source_visitors(*key),
                BatchKeys::Urls => view.url_visitors(*key),
            };
            match self.bucket_of {
                None => {
                    if let Some(&n) = slot.get(&(*g, 0)) {
                        visitors.collect(va, vb, &mut tallies[n].batch);
                    }
                }
                Some(b) => visitors.collect_by(va, vb, Some(b), &mut |bucket, piece| {
                    if let Some(&n) = slot.get(&(*g, bucket)) {
                        tallies[n].add_batch(piece);
                    }
                }),
            }
        }
        let mut speed_available = self.speed.is_some();
        let keys: Vec<(u32, SourceId)> = self
            .speed
            .iter()
            .flatten()
            .filter(|(g, _)| want_group[*g as usize])
            .map(|(g, s)| (*g, s.key.clone()))
            .collect();
        if !keys.is_empty() {
            let ids: Vec<SourceId> = keys.iter().map(|k| k.1.clone()).collect();
            let read = state
                .speed
                .source_visitors(&ids, self.cutoff, visitor_cells, precision);
            // An epoch read in the first phase was collected since: the uniques are the batch
            // view's alone, and the answer says so.
            match read {
                Ok(Some(visitors)) => {
                    for ((g, _), cells) in keys.iter().zip(visitors) {
                        for (cell, v) in cells {
                            let bucket = self.bucket_of.map_or(0, |b| b(cell * CELL_MS));
                            if let Some(&n) = slot.get(&(*g, bucket)) {
                                tallies[n].add_speed(v, precision)?;
                            }
                        }
                    }
                }
                Ok(None) | Err(_) => speed_available = false,
            }
        }
        let uniques = tallies
            .into_iter()
            .map(|t| t.uniques(precision))
            .collect::<ApiResult<Vec<u64>>>()?;
        Ok((uniques, speed_available))
    }
}
