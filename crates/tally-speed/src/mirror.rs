//! The in-process speed state that queries read: the applier adds each batch here first and
//! queues it for Redis, which follows a little behind (`crate::replica`); at start it is
//! loaded from Redis (or rebuilt from the master dataset). Redis therefore holds what the
//! mirror held at some earlier applied seq, and a rewrite from the mirror repairs it.
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

use tally_core::hash::FastMap;
use tally_core::Seq;

use crate::aggregate::{site_key, EpochDelta, SiteDelta, UrlDelta};
use crate::hashes::Hashes;
use crate::keys::{split_visitor_member, visitor_member};
use crate::rank::{BaseTotals, Ranking};
use crate::shard::Sharded;
use crate::NotCovered;

/// Counts of one URL in one epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UrlCounts {
    /// `(cell, views)` ascending by cell, no zero entries.
    pub(crate) cells: Vec<(i64, u64)>,
    pub(crate) total: u64,
    /// Distinct visitors per cell.
    pub(crate) visitors: Visitors,
}

/// The distinct visitors of one URL in one epoch, per 15-minute cell (so that the visitors of
/// any zone's local day, hour or month are whole cells): the exact hashes (what Redis holds, as
/// [`crate::keys::visitor_member`]s), and for a cell with more of them than a sparse sketch
/// holds, also their HyperLogLog registers, kept up to date on insert. A uniques query then
/// merges `2^p` registers for a busy cell instead of sorting its hundreds of thousands of
/// hashes (the registers are what the serving layer's union would compute from the hashes, so
/// the answer is the same).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Visitors {
    /// Ascending by cell. A small vector, not an ordered map: most URLs' live events fall in a
    /// few cells, and the applier touches hundreds of thousands of these under its write lock
    /// (a `BTreeMap` node is ~800 bytes for one entry).
    cells: Vec<CellVisitors>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CellVisitors {
    cell: i64,
    hashes: Hashes,
    /// `2^p` registers of `hashes`, once `hashes` is past the sparse limit of precision `p`.
    registers: Option<Box<[u8]>>,
}

impl CellVisitors {
    /// Builds the registers of precision `p` if the cell is past the sparse limit without them.
    fn densify(&mut self, p: u8) {
        if self.registers.is_none() && self.hashes.len() > tally_core::sketch::sparse_limit(p) {
            let mut regs = vec![0u8; 1 << p].into_boxed_slice();
            for h in self.hashes.iter() {
                tally_core::sketch::set_register(&mut regs, p, h);
            }
            self.registers = Some(regs);
        }
    }
}

/// `binary_search_by_key` for cells ascending, looking at the last few first: live traffic is
/// mostly in the newest cells, while a site's or campaign's cells span every day of the
/// epoch's late events (thousands), where a binary search was a string of cache misses — a
/// third of the applier's time once 10 % of events came from the last 30 days.
#[inline]
fn search_recent<T>(cells: &[T], cell: i64, key: impl Fn(&T) -> i64) -> Result<usize, usize> {
    const TAIL: usize = 4;
    for (back, c) in cells.iter().rev().take(TAIL).enumerate() {
        let i = cells.len() - back;
        match key(c).cmp(&cell) {
            std::cmp::Ordering::Equal => return Ok(i - 1),
            std::cmp::Ordering::Less => return Err(i),
            std::cmp::Ordering::Greater => {}
        }
    }
    let end = cells.len().saturating_sub(TAIL);
    cells[..end].binary_search_by_key(&cell, key)
}

impl Visitors {
    /// Adds visitor members; with `dense_at = Some(p)`, keeps the registers of precision `p`
    /// of every cell past its sparse limit.
    pub(crate) fn extend(&mut self, members: impl IntoIterator<Item = i64>, dense_at: Option<u8>) {
        // Members come sorted by cell from a delta: look the cell up only when it changes.
        let mut at: Option<usize> = None;
        for m in members {
            let (cell, h) = split_visitor_member(m);
            let i = match at {
                Some(i) if self.cells[i].cell == cell => i,
                _ => {
                    let i = match search_recent(&self.cells, cell, |d| d.cell) {
                        Ok(i) => i,
                        Err(i) => {
                            self.cells.insert(
                                i,
                                CellVisitors {
                                    cell,
                                    hashes: Hashes::default(),
                                    registers: None,
                                },
                            );
                            i
                        }
                    };
                    at = Some(i);
                    i
                }
            };
            let d = &mut self.cells[i];
            if d.hashes.insert(h) {
                if let Some(p) = dense_at {
                    match d.registers.as_mut() {
                        Some(regs) => tally_core::sketch::set_register(regs, p, h),
                        // Only a cell that just grew can have passed the limit.
                        None => d.densify(p),
                    }
                }
            }
        }
    }

    /// Builds the registers of precision `p` of the cells past the sparse limit that have none.
    pub(crate) fn densify(&mut self, p: u8) {
        for d in &mut self.cells {
            d.densify(p);
        }
    }

    /// Every (cell, visitor) member.
    pub(crate) fn members(&self) -> impl Iterator<Item = i64> + '_ {
        self.cells
            .iter()
            .flat_map(|d| d.hashes.iter().map(|h| visitor_member(d.cell, h)))
    }

    /// The cells in `[from_cell, to_cell)`.
    fn range(&self, from_cell: i64, to_cell: i64) -> &[CellVisitors] {
        let a = self.cells.partition_point(|d| d.cell < from_cell);
        let b = a + self.cells[a..].partition_point(|d| d.cell < to_cell);
        &self.cells[a..b]
    }
}

/// The visitors of a URL in a range of cells across the live epochs, as the serving layer
/// merges them with the batch view's sketches: the distinct hashes of the quiet cells and the
/// max of the registers of the busy ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpeedVisitors {
    /// Sorted, distinct; empty when `registers` is set (they are in them).
    pub hashes: Vec<u32>,
    /// `2^p` registers at the precision asked for, when some cell was past its sparse limit.
    pub registers: Option<Box<[u8]>>,
}

/// One source key's share of the speed layer ([`crate::SpeedLayer::sources`]).
#[derive(Debug)]
pub struct SourceSpeed {
    /// Which key: for [`crate::SpeedLayer::source_visitors`].
    pub key: SourceId,
    /// The source key (`tally_core::dims::source_key`), or the URL itself for its direct views.
    name: Arc<str>,
    /// Views in the cell range asked for.
    pub views: u64,
    /// Those views per cell, ascending (empty unless asked for).
    pub cells: Vec<(i64, u64)>,
}

impl SourceSpeed {
    /// Key `key` named `name` over the epochs `live`, with its views in `cells` (and per cell,
    /// with `per_cell`); `None` without views there.
    fn read(
        key: SourceId,
        name: &Arc<str>,
        live: &[&EpochState],
        cells: (i64, i64),
        per_cell: bool,
    ) -> Option<SourceSpeed> {
        let mut s = SourceSpeed {
            key,
            name: name.clone(),
            views: 0,
            cells: Vec::new(),
        };
        let mut runs = 0;
        for e in live {
            let Some(c) = s.key.0.counts(e) else { continue };
            let a = c.cells.partition_point(|x| x.0 < cells.0);
            let b = a + c.cells[a..].partition_point(|x| x.0 < cells.1);
            if a == b {
                continue;
            }
            s.views += c.cells[a..b].iter().map(|x| x.1).sum::<u64>();
            if per_cell {
                s.cells.extend_from_slice(&c.cells[a..b]);
            }
            runs += 1;
        }
        // A key live in two epochs has two runs of cells: one ascending list.
        if runs > 1 && per_cell {
            s.merge_runs();
        }
        (s.views > 0).then_some(s)
    }

    /// Makes `cells`, runs read from several epochs, one ascending list.
    fn merge_runs(&mut self) {
        self.cells.sort_unstable();
        tally_core::sum_runs(&mut self.cells);
    }

    /// The referrer's host, empty for a direct visit.
    pub fn referrer(&self) -> &str {
        self.key.0.source_key(&self.name).map_or("", |(r, _)| r)
    }

    pub fn url(&self) -> &str {
        self.key.0.url_of(&self.name)
    }
}

/// A key of [`crate::SpeedLayer::sources`], [`crate::SpeedLayer::pages`] or
/// [`crate::SpeedLayer::campaigns`]. Valid while the epochs it was read from are live.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceId(Key);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// A source key's id in the dictionary, and whether it is the direct partition of the URL
    /// of that id.
    Id { id: u32, direct: bool },
    /// A URL's id in the dictionary: all its views, whatever their source.
    Url { id: u32 },
    /// A campaign key of a site ([`SiteCounts::campaigns`]).
    Campaign { host: Arc<str>, name: Arc<str> },
}

impl Key {
    /// `(referrer host, URL)` of this key named `name` when a source key names it; `None` for a
    /// URL's own keys, named by the URL (read without searching it for a separator: a grouping
    /// by page asks this of every page of the site).
    fn source_key<'n>(&self, name: &'n str) -> Option<(&'n str, &'n str)> {
        match self {
            Key::Url { .. } | Key::Id { direct: true, .. } => None,
            Key::Id { direct: false, .. } | Key::Campaign { .. } => {
                tally_core::dims::parse_source_key(name)
            }
        }
    }

    /// The URL of this key named `name` (a campaign's: its origin and UTM parameters).
    fn url_of<'n>(&self, name: &'n str) -> &'n str {
        self.source_key(name).map_or(name, |(_, u)| u)
    }

    /// The counts of this key in epoch `e`.
    fn counts<'e>(&self, e: &'e EpochState) -> Option<&'e UrlCounts> {
        match self {
            Key::Id { id, direct: false } => e.sources.get(id),
            Key::Id { id, direct: true } => e
                .urls
                .get(id)
                .map(|c| e.direct.get(id).map_or(c, |d| &d.counts)),
            Key::Url { id } => e.urls.get(id),
            Key::Campaign { host, name } => {
                e.sites.get(&**host).and_then(|s| s.campaigns.get(&**name))
            }
        }
    }
}

/// A site's share of the speed layer ([`crate::SpeedLayer::sites`]).
#[derive(Debug, Default)]
pub struct SiteSpeed {
    /// `(cell, views)` ascending, non-zero.
    pub cells: Vec<(i64, u64)>,
    /// Cell → the site's visitors in that cell.
    pub visitors: BTreeMap<i64, SpeedVisitors>,
}

impl SpeedVisitors {
    /// The answer as documented on the fields, from what [`Mirror::visitors`] collected: with
    /// registers, the hashes go into them (the union is a dense sketch anyway); without, they
    /// are sorted and deduplicated.
    pub(crate) fn finish(mut self, precision: u8) -> SpeedVisitors {
        match self.registers.as_mut() {
            Some(regs) => {
                for h in self.hashes.drain(..) {
                    tally_core::sketch::set_register(regs, precision, h);
                }
            }
            None => {
                self.hashes.sort_unstable();
                self.hashes.dedup();
            }
        }
        self
    }
}

/// One URL of a delta on its way into the mirror: [`Mirror::prepare`] finds its id and name
/// under the read lock, [`UrlUpdate::complete`] does the rest of the work that needs no lock,
/// and [`Mirror::apply_urls`] links it in under the write lock.
pub(crate) struct UrlUpdate<'a> {
    pub(crate) delta: &'a UrlDelta,
    pub(crate) id: u32,
    /// Shared by the dictionary and the rankings.
    pub(crate) name: Arc<str>,
    /// The dictionary lacks it: the id is new (so is the URL to every epoch).
    pub(crate) new: bool,
    /// Its counts, built in advance for a new URL.
    counts: Option<UrlCounts>,
    /// Its views in the rankings' base, read in advance.
    base_total: Option<u64>,
    /// Of a URL with referred views in the delta: the id of its direct source key, its name,
    /// and whether the dictionary lacks it.
    direct_key: Option<(u32, Arc<str>, bool)>,
}

impl UrlUpdate<'_> {
    /// Builds a new URL's counts (registers of `precision` for busy cells) and reads its total
    /// in `base`: the work of an apply that needs no lock.
    pub(crate) fn complete(&mut self, precision: u8, base: Option<&Arc<dyn BaseTotals>>) {
        if self.new {
            self.counts = Some(UrlCounts::of(self.delta, precision));
        }
        self.base_total = base.map(|b| b.total(&self.name));
    }
}

/// Whether two bases are the same view (the same object).
fn same_view(a: &Arc<dyn BaseTotals>, b: &Arc<dyn BaseTotals>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

impl UrlCounts {
    /// The counts of a delta alone, keeping registers of `precision` for busy cells.
    pub(crate) fn of(d: &UrlDelta, precision: u8) -> UrlCounts {
        let mut c = UrlCounts::default();
        c.add_delta(d, precision);
        c
    }

    /// Adds a delta, keeping registers of `precision` for busy cells.
    pub(crate) fn add_delta(&mut self, d: &UrlDelta, precision: u8) {
        for (h, n) in &d.cells {
            self.add(*h, *n);
        }
        self.visitors
            .extend(d.visitors.iter().copied(), Some(precision));
    }

    /// Adds `other`'s views and visitors (a site's counts are its URLs' added up).
    pub(crate) fn merge(&mut self, other: &UrlCounts, precision: u8) {
        for (cell, n) in &other.cells {
            self.add(*cell, *n);
        }
        self.visitors
            .extend(other.visitors.members(), Some(precision));
    }

    /// The views now in each cell of `cells` (ascending by cell, as a delta's): what Redis is
    /// set to for them ([`crate::replica`] writes values, not increments).
    pub(crate) fn now_in(&self, cells: &[(i64, u64)]) -> Vec<(i64, u64)> {
        let mut at = 0;
        cells
            .iter()
            .map(|(cell, _)| {
                at += self.cells[at..].partition_point(|c| c.0 < *cell);
                (
                    *cell,
                    self.cells
                        .get(at)
                        .filter(|c| c.0 == *cell)
                        .map_or(0, |c| c.1),
                )
            })
            .collect()
    }

    /// Adds `n` views in `cell`.
    pub(crate) fn add(&mut self, cell: i64, n: u64) {
        if n == 0 {
            return;
        }
        match search_recent(&self.cells, cell, |c| c.0) {
            Ok(i) => self.cells[i].1 += n,
            Err(i) => self.cells.insert(i, (cell, n)),
        }
        self.total += n;
    }

    /// Views in the cells `[from_cell, to_cell)`.
    pub(crate) fn range(&self, from_cell: i64, to_cell: i64) -> u64 {
        let (Some(first), Some(last)) = (self.cells.first(), self.cells.last()) else {
            return 0;
        };
        if from_cell >= to_cell {
            return 0;
        }
        if from_cell <= first.0 && to_cell > last.0 {
            return self.total;
        }
        let a = self.cells.partition_point(|c| c.0 < from_cell);
        let b = a + self.cells[a..].partition_point(|c| c.0 < to_cell);
        self.cells[a..b].iter().map(|c| c.1).sum()
    }
}

/// State of one epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct EpochState {
    /// Last seq of this epoch applied (0: none).
    pub(crate) applied: Seq,
    /// URL id → counts.
    pub(crate) urls: Sharded<u32, UrlCounts>,
    /// Host → its site's counts: the sum of its URLs' views per cell and the union of their
    /// visitors per cell. Derived (kept by [`Mirror::apply_urls`], built again at load, never
    /// written to Redis): a site's reads look at one entry per epoch instead of walking its
    /// URLs, which under ingest are most of a busy site's.
    pub(crate) sites: FastMap<Arc<str>, SiteCounts>,
    /// Source key id (`tally_core::dims::source_key`, in the same dictionary as URLs) →
    /// counts: the data of breakdowns. Kept apart so that nothing that lists URLs (rankings,
    /// sites, top) ever sees a source key.
    pub(crate) sources: Sharded<u32, UrlCounts>,
    /// URL id → its direct views, for the URLs of the epoch with some referred views: a
    /// URL's direct views are all its views until its first referred one, which copies them
    /// here (under the id of the source key `("", url)`, as Redis keeps them). Most views are
    /// direct (internal navigation has the page's own site as referrer), so most URLs never
    /// pay for a second set of counts.
    pub(crate) direct: Sharded<u32, Direct>,
    /// Cell → the URLs with views in that cell, for cells that were ahead of the clock when
    /// applied (events up to `ingest.max_future` ahead). An all-time ranking answers "until the
    /// next hour", so these few URLs get their exact counts instead; cells that are no longer
    /// ahead are dropped.
    pub(crate) ahead: BTreeMap<i64, HashSet<u32>>,
}

/// A site's counts in one epoch ([`EpochState::sites`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SiteCounts {
    /// Its URLs' views per cell added up, their visitors per cell united.
    pub(crate) all: UrlCounts,
    /// Campaign key (`tally_core::dims::write_campaign_key`: referrer host, UTM parameters)
    /// → the counts of its views, direct ones under the empty referrer: every breakdown by a
    /// campaign dimension (referrer, source, UTM) sums these — a few entries per referrer and
    /// campaign instead of one per page and referrer.
    pub(crate) campaigns: FastMap<Arc<str>, UrlCounts>,
}

impl SiteCounts {
    /// The counts of the campaign of source key `(referrer, url)`, created empty; `buf` is
    /// scratch space for its name.
    fn campaign(&mut self, buf: &mut String, referrer: &str, url: &str) -> &mut UrlCounts {
        tally_core::dims::write_campaign_key(buf, referrer, url);
        self.campaign_named(buf)
    }

    /// The counts of campaign key `key`, created empty.
    fn campaign_named(&mut self, key: &str) -> &mut UrlCounts {
        if !self.campaigns.contains_key(key) {
            self.campaigns.insert(Arc::from(key), UrlCounts::default());
        }
        self.campaigns.get_mut(key).expect("inserted above")
    }
}

/// The direct views of a URL with referred ones ([`EpochState::direct`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Direct {
    /// Id of the source key `("", url)` in the dictionary.
    pub(crate) id: u32,
    pub(crate) counts: UrlCounts,
}

/// What [`Mirror::apply_urls`] added to direct views, for Redis: the source key's id, its
/// name, whether it is new to the epoch, and the increments (on the first referred view, a
/// copy of every view before) with, in `cells`, the views now in each cell they touched.
pub(crate) type DirectWrite = (u32, Arc<str>, bool, UrlDelta);

/// What [`Mirror::apply_urls`] did to one URL, for Redis: whether it is new to the epoch, its
/// name, and the views now in each cell of its delta ([`UrlCounts::now_in`]).
pub(crate) type UrlWrite = (bool, Arc<str>, Vec<(i64, u64)>);

/// What [`Mirror::apply_urls`] did, for Redis: per URL of the part (in order), a [`UrlWrite`];
/// and the direct views it added.
pub(crate) type Applied = (Vec<UrlWrite>, Vec<DirectWrite>);

/// The URL ids of the live epochs ([`crate::keys`]: ids, not hashes, name Redis keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UrlDict {
    ids: Sharded<Arc<str>, u32>,
    names: Sharded<u32, Arc<str>>,
    /// Host → the ids of its URLs and of their referred source keys: a site's reads look at
    /// its own keys, not at every live one (nor at direct partitions, read with their URL).
    hosts: FastMap<Arc<str>, HostIds>,
    /// Id → the start of the newest epoch with its counts ([`UrlDict::seen_in`]), or
    /// [`UNKNOWN_EPOCH`]: a site's reads after a cutoff skip the ids only older epochs hold
    /// (those the batch view already covers) without looking into any epoch.
    newest: Vec<Seq>,
    /// Ids below this may be taken.
    next: u32,
    /// Ids below `next` that no live epoch holds any more (freed by [`UrlDict::retain`]),
    /// taken from the end before new ones: the ids, and `newest`, stay as many as the live
    /// keys at their peak, not as every URL ever seen (a site whose URLs carry click ids sees
    /// millions of new ones a day, and a `u32` would run out).
    free: Vec<u32>,
}

/// The ids of one host's keys ([`UrlDict::hosts`]), in order of first sight: vectors, not sets,
/// because a site's reads walk them all (an id is recorded once; collection rebuilds them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HostIds {
    pub(crate) urls: Vec<u32>,
    /// Source keys with a referrer.
    pub(crate) referred: Vec<u32>,
}

/// The newest epoch of an id recorded without one: read as possibly any.
const UNKNOWN_EPOCH: Seq = Seq(u64::MAX);

/// The host of a URL or of a source key's URL, and whether it is a referred source key;
/// `None` for a direct partition's key (read with its URL) or a URL without a host.
fn host_of_key(key: &str) -> Option<(&str, bool)> {
    match tally_core::dims::parse_source_key(key) {
        Some(("", _)) => None,
        Some((_, url)) => Some((tally_core::url::host_of(url)?, true)),
        None => Some((tally_core::url::host_of(key)?, false)),
    }
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
        self.insert_name(id, &Arc::from(url))
    }

    /// [`UrlDict::insert`] of a name the caller already holds (shared, not copied).
    pub(crate) fn insert_name(&mut self, id: u32, name: &Arc<str>) -> Result<(), String> {
        let url: &str = name;
        match (self.names.get(&id), self.ids.get(url)) {
            (Some(u), Some(i)) if **u == *url && *i == id => Ok(()),
            (Some(u), _) if **u != *url => Err(format!("id {id} names {u} and {url}")),
            (_, Some(i)) if *i != id => Err(format!("{url} has ids {i} and {id}")),
            _ => {
                let name = name.clone();
                if let Some((host, referred)) = host_of_key(url) {
                    let ids = match self.hosts.get_mut(host) {
                        Some(ids) => ids,
                        None => self.hosts.entry(Arc::from(host)).or_default(),
                    };
                    match referred {
                        true => ids.referred.push(id),
                        false => ids.urls.push(id),
                    }
                }
                self.ids.insert(name.clone(), id);
                self.names.insert(id, name);
                self.next = self.next.max(id.saturating_add(1));
                let i = id as usize;
                if self.newest.len() <= i {
                    self.newest.resize(i + 1, UNKNOWN_EPOCH);
                }
                self.newest[i] = UNKNOWN_EPOCH;
                Ok(())
            }
        }
    }

    /// Records that epoch `epoch` holds counts of `id` (a known id).
    pub(crate) fn seen_in(&mut self, id: u32, epoch: Seq) {
        if let Some(n) = self.newest.get_mut(id as usize) {
            *n = match *n {
                UNKNOWN_EPOCH => epoch,
                n => n.max(epoch),
            };
        }
    }

    /// Whether `id` may have counts in an epoch starting after `cutoff`.
    fn may_be_after(&self, id: u32, cutoff: Seq) -> bool {
        self.newest.get(id as usize).is_none_or(|&n| n > cutoff)
    }

    /// Keeps only the ids in `keep`; the others are free to be taken again.
    fn retain(&mut self, keep: &HashSet<u32>) {
        let mut freed = Vec::new();
        self.names.retain(|id, _| {
            let kept = keep.contains(id);
            if !kept {
                freed.push(*id);
            }
            kept
        });
        // Highest last, so the lowest are taken first and the ids stay dense.
        freed.sort_unstable_by(|a, b| b.cmp(a));
        self.free.extend(freed);
        self.ids.retain(|_, id| keep.contains(id));
        self.hosts.retain(|_, ids| {
            ids.urls.retain(|id| keep.contains(id));
            ids.referred.retain(|id| keep.contains(id));
            !(ids.urls.is_empty() && ids.referred.is_empty())
        });
    }

    /// The ids of the URLs of `host`.
    pub(crate) fn urls_of_host(&self, host: &str) -> &[u32] {
        self.hosts.get(host).map_or(&[], |h| &h.urls)
    }

    /// The ids of the referred source keys of `host`'s URLs.
    pub(crate) fn referred_of_host(&self, host: &str) -> &[u32] {
        self.hosts.get(host).map_or(&[], |h| &h.referred)
    }
}

/// Speed views of URL `id` in the epochs after `cutoff` other than `except` (the epoch being
/// applied, whose total the caller has in hand: one lookup less per URL, usually the only one).
fn speed_total(epochs: &BTreeMap<Seq, EpochState>, id: u32, cutoff: Seq, except: Seq) -> u64 {
    epochs
        .range(cutoff.next()..)
        .filter(|(start, _)| **start != except)
        .filter_map(|(_, e)| e.urls.get(&id))
        .map(|c| c.total)
        .sum()
}

/// epoch start → state, plus the URL dictionary, the coverage floor and the all-time
/// rankings of the serving view.
#[derive(Debug)]
pub(crate) struct Mirror {
    pub(crate) dict: UrlDict,
    pub(crate) epochs: BTreeMap<Seq, EpochState>,
    /// Every epoch that starts at or after `floor` is held whole (up to its applied seq).
    pub(crate) floor: Seq,
    /// The rankings of the serving view ([`Mirror::set_base`]), kept up to date by `apply`.
    ranking: Option<Ranking>,
    /// Precision of the registers kept for busy URL-cells ([`Visitors`]).
    pub(crate) precision: u8,
}

/// For tests: from the first seq on, registers at the default precision.
#[cfg(test)]
impl Default for Mirror {
    fn default() -> Self {
        Mirror::empty(Seq(1), 14)
    }
}

impl Mirror {
    /// A mirror that holds every epoch from `floor` on, all empty, keeping registers of
    /// `precision` for busy URL-cells.
    pub(crate) fn empty(floor: Seq, precision: u8) -> Mirror {
        Mirror {
            dict: UrlDict::default(),
            epochs: BTreeMap::new(),
            floor,
            ranking: None,
            precision,
        }
    }

    /// Builds the all-time rankings of `base` plus the epochs after its cutoff; `apply` keeps
    /// them up to date from then on.
    pub(crate) fn set_base(&mut self, base: Arc<dyn BaseTotals>) {
        let cutoff = base.cutoff();
        let mut speed: HashMap<u32, u64> = HashMap::new();
        for e in self.epochs.range(cutoff.next()..).map(|(_, e)| e) {
            for (id, c) in &e.urls {
                *speed.entry(*id).or_default() += c.total;
            }
        }
        let named: Vec<(&Arc<str>, u64)> = speed
            .iter()
            .filter_map(|(id, n)| Some((self.dict.name(*id)?, *n)))
            .collect();
        self.ranking = Some(Ranking::build(base, named.iter().map(|(u, n)| (*u, *n))));
    }

    /// The URLs of `d`, in `d.urls` order, with the id each is written under (its id when the
    /// dictionary has it, else a new one) and its name. The applier then completes them without
    /// a lock ([`UrlUpdate::complete`]) and adds them in parts ([`Mirror::apply_urls`]).
    pub(crate) fn prepare<'a>(&self, d: &'a EpochDelta) -> Vec<UrlUpdate<'a>> {
        let mut next = self.dict.next;
        // Freed ids first, from the end: `apply_urls` gives back as many as it took.
        let mut free = self.dict.free.iter().rev();
        let mut id_of = |url: &str| match self.dict.id(url) {
            Some(id) => match self.dict.name(id) {
                Some(name) => (id, name.clone(), false),
                None => (id, Arc::from(url), true),
            },
            None => match free.next() {
                Some(id) => (*id, Arc::from(url), true),
                None => {
                    next += 1;
                    (next - 1, Arc::from(url), true)
                }
            },
        };
        d.urls
            .iter()
            .map(|(url, delta)| {
                let (id, name, new) = id_of(url);
                let direct_key = delta
                    .direct
                    .as_ref()
                    .map(|_| id_of(&tally_core::dims::source_key("", url)));
                UrlUpdate {
                    delta,
                    id,
                    name,
                    new,
                    counts: None,
                    base_total: None,
                    direct_key,
                }
            })
            .collect()
    }

    /// Adds a delta, prepared and completed, in one step (see [`Mirror::apply_urls`] for parts).
    #[cfg(test)]
    pub(crate) fn apply(&mut self, d: &EpochDelta) -> Result<Applied, String> {
        let mut urls = self.prepare(d);
        let base = self.ranking.as_ref().map(|r| r.base.clone());
        for u in &mut urls {
            u.complete(self.precision, base.as_ref());
        }
        let fresh = self.apply_urls(d.epoch, urls, base.as_ref())?;
        self.apply_sites(d.epoch, &d.sites);
        self.set_applied(d.epoch, d.last);
        Ok(fresh)
    }

    /// Adds the increments of some URLs of a delta into `epoch`; returns, per URL, whether it
    /// is new to the epoch, and its name. The applier adds a large delta in parts, each under
    /// its own short write lock, so that queries never wait long; each URL's counts change in
    /// one step. What needs no lock was done before ([`Mirror::prepare`],
    /// [`UrlUpdate::complete`], with `base` the rankings' base the totals were read from): here
    /// the new names are recorded, counts added or linked in, and the rankings offered the new
    /// totals. The sites' counts are added apart ([`Mirror::apply_sites`]).
    pub(crate) fn apply_urls(
        &mut self,
        epoch: Seq,
        urls: Vec<UrlUpdate<'_>>,
        base: Option<&Arc<dyn BaseTotals>>,
    ) -> Result<Applied, String> {
        let mut taken = 0;
        for u in urls.iter().filter(|u| u.new) {
            self.dict.insert_name(u.id, &u.name)?;
            taken += 1;
        }
        for (id, name, new) in urls.iter().filter_map(|u| u.direct_key.as_ref()) {
            self.dict.insert_name(*id, name)?;
            taken += usize::from(*new);
        }
        // `prepare` handed out the freed ids from the end, in this part's order, before new
        // ones: they are taken now.
        let left = self.dict.free.len().saturating_sub(taken);
        self.dict.free.truncate(left);
        let now_cell = tally_core::cell_of(tally_core::now_ms());
        let e = self.epochs.entry(epoch).or_default();
        if e.ahead
            .first_key_value()
            .is_some_and(|(h, _)| *h <= now_cell)
        {
            e.ahead = e.ahead.split_off(&(now_cell + 1));
        }
        let mut done = Vec::with_capacity(urls.len());
        let mut offers = Vec::with_capacity(urls.len());
        let mut direct_writes = Vec::new();
        for u in urls {
            let source = tally_core::dims::is_source_key(&u.name);
            if !source {
                for (h, _) in u.delta.cells.iter().filter(|(h, _)| *h > now_cell) {
                    e.ahead.entry(*h).or_default().insert(u.id);
                }
                // Direct views, before the URL's own counts change (a first referred view
                // copies the views before this delta).
                match (e.direct.get_mut(&u.id), &u.delta.direct, &u.direct_key) {
                    (Some(d), _, _) => {
                        let part = u.delta.direct_part();
                        d.counts.add_delta(part, self.precision);
                        if let Some(name) = self.dict.name(d.id) {
                            let write = UrlDelta {
                                cells: d.counts.now_in(&part.cells),
                                total: part.total,
                                visitors: part.visitors.clone(),
                                direct: None,
                            };
                            direct_writes.push((d.id, name.clone(), false, write));
                        }
                    }
                    (None, Some(part), Some((id, name, _))) => {
                        // All the URL's views before this delta were direct.
                        let mut counts = e.urls.get(&u.id).cloned().unwrap_or_default();
                        counts.add_delta(part, self.precision);
                        // Redis learns the new partition whole.
                        let write = UrlDelta {
                            cells: counts.cells.clone(),
                            total: counts.total,
                            visitors: counts.visitors.members().collect(),
                            direct: None,
                        };
                        e.direct.insert(u.id, Direct { id: *id, counts });
                        direct_writes.push((*id, name.clone(), true, write));
                    }
                    _ => {}
                }
            }
            self.dict.seen_in(u.id, epoch);
            let map = if source { &mut e.sources } else { &mut e.urls };
            let total = match map.get_mut(&u.id) {
                Some(c) => {
                    c.add_delta(u.delta, self.precision);
                    done.push((false, u.name.clone(), c.now_in(&u.delta.cells)));
                    c.total
                }
                None => {
                    // New to the epoch: its views are the delta's.
                    done.push((true, u.name.clone(), u.delta.cells.clone()));
                    let c = match u.counts {
                        Some(c) => c,
                        None => UrlCounts::of(u.delta, self.precision),
                    };
                    let total = c.total;
                    map.insert(u.id, c);
                    total
                }
            };
            if !source {
                offers.push((u.id, u.base_total, total, u.name));
            }
        }
        if let Some(r) = self.ranking.as_mut() {
            let cutoff = r.base.cutoff();
            if epoch > cutoff {
                let same_base = base.is_some_and(|b| same_view(b, &r.base));
                for (id, base_total, in_epoch, name) in offers {
                    let base_total = match base_total {
                        Some(t) if same_base => t,
                        _ => r.base.total(&name),
                    };
                    let speed = in_epoch + speed_total(&self.epochs, id, cutoff, epoch);
                    r.offer(&name, base_total, speed);
                }
            }
        }
        Ok((done, direct_writes))
    }

    /// Adds the increments of some sites of a delta ([`EpochDelta::sites`]) into `epoch`: what
    /// [`Mirror::derive_sites`] would build from the URLs that [`Mirror::apply_urls`] added.
    pub(crate) fn apply_sites<'d>(
        &mut self,
        epoch: Seq,
        sites: impl IntoIterator<Item = (&'d String, &'d SiteDelta)>,
    ) {
        let precision = self.precision;
        let e = self.epochs.entry(epoch).or_default();
        for (host, d) in sites {
            let site = match e.sites.get_mut(host.as_str()) {
                Some(site) => site,
                None => e.sites.entry(Arc::from(host.as_str())).or_default(),
            };
            site.all.add_delta(&d.all, precision);
            for (key, c) in &d.campaigns {
                site.campaign_named(key).add_delta(c, precision);
            }
        }
    }

    /// Records that the epoch holds every event up to `last`.
    pub(crate) fn set_applied(&mut self, epoch: Seq, last: Seq) {
        let e = self.epochs.entry(epoch).or_default();
        e.applied = e.applied.max(last);
    }

    /// Builds epoch `epoch`'s sites ([`EpochState::sites`]) from its URLs, source keys and
    /// direct partitions, as [`Mirror::apply_urls`] keeps them: for a mirror loaded from Redis,
    /// which holds no site.
    pub(crate) fn derive_sites(&mut self, epoch: Seq) {
        let Some(e) = self.epochs.get_mut(&epoch) else {
            return;
        };
        let (dict, precision) = (&self.dict, self.precision);
        let mut sites: FastMap<Arc<str>, SiteCounts> = FastMap::default();
        let mut buf = String::new();
        let keys = (e.urls.iter().map(|(id, c)| (id, c, false)))
            .chain(e.sources.iter().map(|(id, c)| (id, c, true)));
        for (id, counts, source) in keys {
            let Some((host, referrer, url)) = dict.name(*id).and_then(|n| site_key(n)) else {
                continue;
            };
            let site = match sites.get_mut(host) {
                Some(site) => site,
                None => sites.entry(Arc::from(host)).or_default(),
            };
            let campaign = match source {
                true => counts,
                false => {
                    site.all.merge(counts, precision);
                    e.direct.get(id).map_or(counts, |d| &d.counts)
                }
            };
            if campaign.total > 0 {
                site.campaign(&mut buf, referrer, url)
                    .merge(campaign, precision);
            }
        }
        e.sites = sites;
    }

    /// The whole state of the live epochs, for a rewrite of Redis.
    pub(crate) fn snapshot(&self) -> crate::replica::Pending {
        self.epochs
            .iter()
            .map(|(start, e)| {
                let direct = e.direct.iter().map(|(_, d)| (&d.id, &d.counts));
                let urls = e
                    .urls
                    .iter()
                    .chain(e.sources.iter())
                    .chain(direct)
                    .filter_map(|(id, c)| Some((*id, self.dict.name(*id)?.clone(), c.clone())));
                (
                    *start,
                    crate::replica::PendingEpoch::snapshot(e.applied, urls),
                )
            })
            .collect()
    }

    #[cfg(test)]
    pub(crate) fn applied_in(&self, epoch: Seq) -> Seq {
        self.epochs.get(&epoch).map_or(Seq::ZERO, |e| e.applied)
    }

    /// The exact all-time top `limit` (views until `to_cell`, the next full hour) of the batch
    /// view `view_id` with cutoff `after_cutoff` plus the speed layer, from the incremental
    /// rankings: `Ok(None)` when they cannot answer (another view, a limit above what they keep).
    pub(crate) fn top_all_time(
        &self,
        view_id: &str,
        after_cutoff: Seq,
        limit: usize,
        host: Option<&str>,
        to_cell: i64,
    ) -> Result<Option<Vec<(String, u64)>>, NotCovered> {
        let live: Vec<&EpochState> = self.live_after(after_cutoff)?.collect();
        let Some(r) = &self.ranking else {
            return Ok(None);
        };
        if r.base.id() != view_id || r.base.cutoff() != after_cutoff {
            return Ok(None);
        }
        let Some(set) = r.set(host) else {
            return Ok(Some(Vec::new()));
        };
        if limit > set.cap() {
            return Ok(None);
        }
        // An apply records the cells after its clock's as ahead; if the clock has reached
        // `to_cell` since the caller chose it, an event in that cell may have been applied
        // without being recorded, and only a scan is exact.
        if to_cell <= tally_core::cell_of(tally_core::now_ms()) {
            return Ok(None);
        }
        // URLs with views at or after `to_cell`: their all-time totals overstate the range.
        let mut late: HashSet<Arc<str>> = r.base.late(to_cell).into_iter().collect();
        for e in &live {
            for ids in e.ahead.range(to_cell..).map(|(_, ids)| ids) {
                late.extend(ids.iter().filter_map(|id| self.dict.name(*id).cloned()));
            }
        }
        late.retain(|u| host.is_none_or(|h| tally_core::url::host_of(u) == Some(h)));
        let mut picked: Vec<(String, u64)> = set
            .iter()
            .filter(|(u, _)| !late.contains(*u))
            .take(limit)
            .map(|(u, v)| (u.to_string(), v))
            .collect();
        if picked.len() < limit && set.len() == set.cap() {
            return Ok(None); // the kept members ran out: scan instead
        }
        for u in &late {
            let speed = self.views(u, after_cutoff, i64::MIN, to_cell)?;
            let v = r.base.views_before(u, to_cell) + speed;
            if v > 0 {
                picked.push((u.to_string(), v));
            }
        }
        picked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        picked.truncate(limit);
        Ok(Some(picked))
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
            .flat_map(|e| {
                let direct = e.direct.iter().map(|(_, d)| d.id);
                e.urls.keys().chain(e.sources.keys()).copied().chain(direct)
            })
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
        from_cell: i64,
        to_cell: i64,
    ) -> Result<u64, NotCovered> {
        Ok(self
            .url_counts(url, after_cutoff)?
            .map(|c| c.range(from_cell, to_cell))
            .sum())
    }

    /// Non-zero cells of `url` in `[from_cell, to_cell)`, ascending.
    pub(crate) fn cell_counts(
        &self,
        url: &str,
        after_cutoff: Seq,
        from_cell: i64,
        to_cell: i64,
    ) -> Result<Vec<(i64, u64)>, NotCovered> {
        let mut out: BTreeMap<i64, u64> = BTreeMap::new();
        for c in self.url_counts(url, after_cutoff)? {
            let a = c.cells.partition_point(|x| x.0 < from_cell);
            for (h, n) in c.cells[a..].iter().take_while(|x| x.0 < to_cell) {
                *out.entry(*h).or_insert(0) += n;
            }
        }
        Ok(out.into_iter().collect())
    }

    /// The visitors of `url` in the cells `[from_cell, to_cell)`, for sketches of precision
    /// `precision`: busy cells as registers when the mirror keeps them at that precision, every
    /// other cell as hashes — in no order, possibly repeated: the caller
    /// [`SpeedVisitors::finish`]es them after releasing the lock (sorting a busy URL's hashes
    /// under it held the applier, and every reader queued behind it, for milliseconds).
    pub(crate) fn visitors(
        &self,
        url: &str,
        after_cutoff: Seq,
        from_cell: i64,
        to_cell: i64,
        precision: u8,
    ) -> Result<SpeedVisitors, NotCovered> {
        let mut out = SpeedVisitors::default();
        if from_cell >= to_cell {
            return Ok(out);
        }
        for c in self.url_counts(url, after_cutoff)? {
            for d in c.visitors.range(from_cell, to_cell) {
                self.collect_cell(&mut out, d, precision);
            }
        }
        Ok(out)
    }

    /// Adds the visitors of one URL-cell to `out`: its registers when it keeps them at the
    /// precision asked for, else its hashes (see [`SpeedVisitors::finish`]).
    fn collect_cell(&self, out: &mut SpeedVisitors, d: &CellVisitors, precision: u8) {
        match &d.registers {
            Some(r) if precision == self.precision => {
                let regs = out
                    .registers
                    .get_or_insert_with(|| vec![0u8; r.len()].into_boxed_slice());
                for (x, y) in regs.iter_mut().zip(r.iter()) {
                    *x = (*x).max(*y);
                }
            }
            _ => out.hashes.extend(d.hashes.iter()),
        }
    }

    /// The whole sites `hosts` in the live epochs after `after_cutoff`: each one's views per
    /// cell in `cells`, ascending, and its visitors per cell in `visitor_cells` (collected over
    /// its URLs; [`SpeedVisitors::finish`] each). One scan
    /// of the live URLs for all of them.
    pub(crate) fn sites(
        &self,
        hosts: &[&str],
        after_cutoff: Seq,
        cells: (i64, i64),
        visitor_cells: (i64, i64),
        precision: u8,
    ) -> Result<HashMap<String, SiteSpeed>, NotCovered> {
        /// One site's views per cell and visitors per cell, as they are collected.
        #[derive(Default)]
        struct Acc {
            views: BTreeMap<i64, u64>,
            visitors: BTreeMap<i64, SpeedVisitors>,
        }
        let mut acc: HashMap<&str, Acc> = hosts.iter().map(|h| (*h, Acc::default())).collect();
        let live: Vec<&EpochState> = self.live_after(after_cutoff)?.collect();
        let distinct: HashSet<&str> = hosts.iter().copied().collect();
        for host in distinct {
            let Some(Acc { views, visitors }) = acc.get_mut(host) else {
                continue;
            };
            for c in live
                .iter()
                .filter_map(|e| e.sites.get(host))
                .map(|s| &s.all)
            {
                let a = c.cells.partition_point(|x| x.0 < cells.0);
                for (cell, n) in c.cells[a..].iter().take_while(|x| x.0 < cells.1) {
                    *views.entry(*cell).or_default() += n;
                }
                if visitor_cells.0 < visitor_cells.1 {
                    for d in c.visitors.range(visitor_cells.0, visitor_cells.1) {
                        self.collect_cell(visitors.entry(d.cell).or_default(), d, precision);
                    }
                }
            }
        }
        Ok(acc
            .into_iter()
            .map(|(h, Acc { views, visitors })| {
                let site = SiteSpeed {
                    cells: views.into_iter().collect(),
                    visitors,
                };
                (h.to_string(), site)
            })
            .collect())
    }

    /// The source keys of site `host` (of `url` alone when given) with views in the cells
    /// `cells` over the live epochs after `after_cutoff`, with those views (and per cell, with
    /// `per_cell`). One scan of the live source keys of the site; their visitors come from
    /// [`Mirror::source_visitors`], for the keys a caller still needs after ranking.
    pub(crate) fn sources(
        &self,
        host: &str,
        url: Option<&str>,
        after_cutoff: Seq,
        cells: (i64, i64),
        per_cell: bool,
    ) -> Result<Vec<SourceSpeed>, NotCovered> {
        // Direct views (kept apart for URLs with referred ones, else all the URL's) under the
        // URL's id, referred views under their source keys.
        let urls = self.dict.urls_of_host(host).iter();
        let referred = self.dict.referred_of_host(host).iter();
        let keys = (urls.map(|&id| Key::Id { id, direct: true }))
            .chain(referred.map(|&id| Key::Id { id, direct: false }));
        self.read_keys(keys, url, after_cutoff, cells, per_cell)
    }

    /// The pages of site `host` (`url` alone when given) with views in the cells `cells` over
    /// the live epochs after `after_cutoff`, each with all its views there (and per cell, with
    /// `per_cell`): what [`Mirror::sources`] gives, for a grouping by the URL alone, in one
    /// entry per page instead of one per (referrer, page).
    pub(crate) fn pages(
        &self,
        host: &str,
        url: Option<&str>,
        after_cutoff: Seq,
        cells: (i64, i64),
        per_cell: bool,
    ) -> Result<Vec<SourceSpeed>, NotCovered> {
        let keys = self
            .dict
            .urls_of_host(host)
            .iter()
            .map(|&id| Key::Url { id });
        self.read_keys(keys, url, after_cutoff, cells, per_cell)
    }

    /// `keys` (of the dictionary: [`Key::Id`] or [`Key::Url`]) whose URL is `url` when given,
    /// with their views in `cells` over the live epochs after `after_cutoff` (and per cell,
    /// with `per_cell`); keys without views there, or that only earlier epochs hold, are left
    /// out.
    fn read_keys(
        &self,
        keys: impl Iterator<Item = Key>,
        url: Option<&str>,
        after_cutoff: Seq,
        cells: (i64, i64),
        per_cell: bool,
    ) -> Result<Vec<SourceSpeed>, NotCovered> {
        let live: Vec<&EpochState> = self.live_after(after_cutoff)?.collect();
        let mut out = Vec::new();
        for key in keys {
            let (Key::Id { id, .. } | Key::Url { id }) = key else {
                continue;
            };
            if !self.dict.may_be_after(id, after_cutoff) {
                continue;
            }
            let Some(name) = self.dict.name(id) else {
                continue;
            };
            if url.is_some_and(|f| key.url_of(name) != f) {
                continue;
            }
            out.extend(SourceSpeed::read(
                SourceId(key),
                name,
                &live,
                cells,
                per_cell,
            ));
        }
        Ok(out)
    }

    /// The campaign keys of site `host` ([`SiteCounts::campaigns`]) with views in the cells
    /// `cells` over the live epochs after `after_cutoff`, with those views (and per cell, with
    /// `per_cell`): what [`Mirror::sources`] gives, for a grouping by campaign dimensions
    /// alone, in a few entries per referrer and campaign instead of one per page.
    pub(crate) fn campaigns(
        &self,
        host: &str,
        after_cutoff: Seq,
        cells: (i64, i64),
        per_cell: bool,
    ) -> Result<Vec<SourceSpeed>, NotCovered> {
        let mut out: Vec<SourceSpeed> = Vec::new();
        let mut index: FastMap<&str, usize> = FastMap::default();
        let mut runs = false;
        for (site_host, site) in self
            .live_after(after_cutoff)?
            .filter_map(|e| e.sites.get_key_value(host))
        {
            for (name, c) in &site.campaigns {
                let a = c.cells.partition_point(|x| x.0 < cells.0);
                let b = a + c.cells[a..].partition_point(|x| x.0 < cells.1);
                if a == b {
                    continue;
                }
                let i = match index.get(&**name) {
                    Some(&i) => {
                        runs = true;
                        i
                    }
                    None => {
                        index.insert(name, out.len());
                        out.push(SourceSpeed {
                            key: SourceId(Key::Campaign {
                                host: site_host.clone(),
                                name: name.clone(),
                            }),
                            name: name.clone(),
                            views: 0,
                            cells: Vec::new(),
                        });
                        out.len() - 1
                    }
                };
                let s = &mut out[i];
                s.views += c.cells[a..b].iter().map(|x| x.1).sum::<u64>();
                if per_cell {
                    s.cells.extend_from_slice(&c.cells[a..b]);
                }
            }
        }
        // A key live in two epochs has two runs of cells: one ascending list.
        if runs && per_cell {
            for s in &mut out {
                s.merge_runs();
            }
        }
        Ok(out)
    }

    /// The visitors of each of `keys` (from [`Mirror::sources`], [`Mirror::pages`] or
    /// [`Mirror::campaigns`]) per cell in `visitor_cells`, over the live epochs after
    /// `after_cutoff` (not yet [`SpeedVisitors::finish`]ed).
    pub(crate) fn source_visitors(
        &self,
        keys: &[SourceId],
        after_cutoff: Seq,
        visitor_cells: (i64, i64),
        precision: u8,
    ) -> Result<Vec<BTreeMap<i64, SpeedVisitors>>, NotCovered> {
        let live: Vec<&EpochState> = self.live_after(after_cutoff)?.collect();
        let mut out = Vec::with_capacity(keys.len());
        for SourceId(key) in keys {
            let mut visitors: BTreeMap<i64, SpeedVisitors> = BTreeMap::new();
            for e in &live {
                let Some(c) = key.counts(e) else { continue };
                if visitor_cells.0 < visitor_cells.1 {
                    for d in c.visitors.range(visitor_cells.0, visitor_cells.1) {
                        self.collect_cell(visitors.entry(d.cell).or_default(), d, precision);
                    }
                }
            }
            out.push(visitors);
        }
        Ok(out)
    }

    /// host → views in `[from_cell, to_cell)` of every site with views there.
    pub(crate) fn site_totals(
        &self,
        after_cutoff: Seq,
        from_cell: i64,
        to_cell: i64,
    ) -> Result<HashMap<&str, u64>, NotCovered> {
        let mut out: HashMap<&str, u64> = HashMap::new();
        for e in self.live_after(after_cutoff)? {
            for (host, c) in &e.sites {
                let n = c.all.range(from_cell, to_cell);
                if n > 0 {
                    *out.entry(&**host).or_default() += n;
                }
            }
        }
        Ok(out)
    }

    /// url → views in `[from_cell, to_cell)` for every URL with views there, optionally only
    /// URLs whose host is `host`. The keys borrow from the mirror (the caller holds its read
    /// lock).
    pub(crate) fn range_totals(
        &self,
        after_cutoff: Seq,
        from_cell: i64,
        to_cell: i64,
        host: Option<&str>,
    ) -> Result<HashMap<&str, u64>, NotCovered> {
        let mut out: HashMap<&str, u64> = HashMap::new();
        let live: Vec<&EpochState> = self.live_after(after_cutoff)?.collect();
        let mut add = |id: u32, c: &UrlCounts| {
            let n = c.range(from_cell, to_cell);
            if n > 0 {
                if let Some(url) = self.dict.name(id) {
                    *out.entry(&**url).or_default() += n;
                }
            }
        };
        match host {
            Some(h) => {
                for &id in self.dict.urls_of_host(h) {
                    for c in live.iter().filter_map(|e| e.urls.get(&id)) {
                        add(id, c);
                    }
                }
            }
            None => {
                for e in &live {
                    for (id, c) in &e.urls {
                        add(*id, c);
                    }
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
    use crate::rank::BaseTotals;
    use tally_core::{CELL_MS, HOUR_MS};

    fn mirror_of(events: &[tally_master::SeqEvent], epochs: &[Seq]) -> Mirror {
        let mut m = Mirror::default();
        for d in aggregate(events, epochs) {
            m.apply(&d).unwrap();
        }
        m
    }

    /// A site's sources after a cutoff come from the epochs after it alone: a key only an
    /// older epoch holds is skipped, a key in both counts its newer views.
    #[test]
    fn sources_after_a_cutoff_read_only_the_newer_epochs() {
        let events = [
            ev(1, "https://a.test/x", 0),
            ev(2, "https://a.test/y", 0),
            ev(3, "https://a.test/y", 0),
            ev(4, "https://a.test/y", 0),
            ev(5, "https://a.test/z", 0),
        ];
        let m = mirror_of(&events, &[Seq(1), Seq(4)]);
        let views = |cutoff: Seq| -> BTreeMap<String, u64> {
            let all = (i64::MIN, i64::MAX);
            (m.sources("a.test", None, cutoff, all, false)
                .unwrap()
                .iter())
            .map(|s| (s.url().to_string(), s.views))
            .collect()
        };
        let want = |v: &[(&str, u64)]| -> BTreeMap<String, u64> {
            v.iter()
                .map(|(u, n)| (format!("https://a.test/{u}"), *n))
                .collect()
        };
        assert_eq!(views(Seq(0)), want(&[("x", 1), ("y", 3), ("z", 1)]));
        assert_eq!(views(Seq(3)), want(&[("y", 1), ("z", 1)]));
        assert_eq!(views(Seq(5)), want(&[]));
    }

    /// Grouping a site's campaign keys by a campaign dimension, or its pages by a dimension of
    /// the URL alone, gives what grouping its source keys gives — views, views per cell and the
    /// union of visitors per group — for every cutoff; and a mirror loaded from Redis derives
    /// the sites an apply kept.
    #[test]
    fn campaign_keys_and_pages_group_as_the_source_keys_they_sum() {
        use rand::{Rng, SeedableRng};
        use tally_core::dims::{is_campaign_dimension, Dimension, Input};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let pages = [
            "/",
            "/a",
            "/a/b",
            "/d",
            "/b?x=1",
            "/c?utm_source=news&utm_medium=mail",
        ];
        let tags = ["", "?utm_source=ads", "?utm_campaign=spring&utm_source=ads"];
        let referrers = [
            None,
            Some("https://google.com/q"),
            Some("https://www.a.test/"),
            Some("https://news.test/"),
        ];
        let events: Vec<tally_master::SeqEvent> = (1..=3000u64)
            .map(|seq| {
                let page = pages[rng.random_range(0..pages.len())];
                let tag = match page.contains('?') {
                    true => "",
                    false => tags[rng.random_range(0..tags.len())],
                };
                let host = ["a.test", "b.test"][rng.random_range(0..2)];
                let mut e = ev(
                    seq,
                    &format!("https://{host}{page}{tag}"),
                    rng.random_range(0..20) * CELL_MS,
                );
                e.event.referrer =
                    referrers[rng.random_range(0..referrers.len())].map(String::from);
                e.event.visitor = Some(format!("v{}", rng.random_range(0..300)));
                e
            })
            .collect();
        let epochs = [Seq(1), Seq(1200), Seq(2500)];
        let mut m = Mirror::default();
        // In small batches, so keys span several deltas and epochs.
        for chunk in events.chunks(97) {
            for d in aggregate(chunk, &epochs) {
                m.apply(&d).unwrap();
            }
        }
        let cells = (3, 17);
        for cutoff in [Seq(0), Seq(1199), Seq(2499)] {
            for host in ["a.test", "b.test"] {
                let sources = m.sources(host, None, cutoff, cells, true).unwrap();
                let campaigns = m.campaigns(host, cutoff, cells, true).unwrap();
                assert!(
                    campaigns.len() < sources.len() / 2,
                    "{} vs {}",
                    campaigns.len(),
                    sources.len()
                );
                let pages = m.pages(host, None, cutoff, cells, true).unwrap();
                assert!(pages.len() < sources.len() / 2);
                // One page alone, as `url=` asks.
                let one = &pages[0];
                let alone = m.pages(host, Some(one.url()), cutoff, cells, true).unwrap();
                assert_eq!((alone.len(), alone[0].views), (1, one.views));
                for d in Dimension::ALL {
                    let fewer = match (is_campaign_dimension(d), d.input()) {
                        (true, _) => &campaigns,
                        (false, Input::Url) => &pages,
                        _ => continue,
                    };
                    type Groups =
                        BTreeMap<String, (u64, BTreeMap<i64, u64>, BTreeMap<i64, Vec<u32>>)>;
                    let group = |keys: &[SourceSpeed]| -> Groups {
                        let ids: Vec<SourceId> = keys.iter().map(|k| k.key.clone()).collect();
                        let visitors = m.source_visitors(&ids, cutoff, cells, 14).unwrap();
                        let mut out = Groups::new();
                        for (k, v) in keys.iter().zip(visitors) {
                            let g = out
                                .entry(d.value(k.url(), k.referrer()).into_owned())
                                .or_default();
                            g.0 += k.views;
                            for (cell, n) in &k.cells {
                                *g.1.entry(*cell).or_default() += n;
                            }
                            for (cell, sv) in v {
                                assert!(sv.registers.is_none(), "few visitors: hashes");
                                let hashes = g.2.entry(cell).or_default();
                                hashes.extend(sv.hashes);
                                hashes.sort_unstable();
                                hashes.dedup();
                            }
                        }
                        out
                    };
                    assert_eq!(
                        group(fewer),
                        group(&sources),
                        "{d:?} of {host} after {cutoff}"
                    );
                    if d.input() == Input::Url && is_campaign_dimension(d) {
                        assert_eq!(group(&pages), group(&sources), "{d:?} by pages");
                    }
                }
            }
        }
        // A load from Redis holds no sites: they are derived as the applies kept them.
        for (start, e) in &m.epochs {
            let mut loaded = Mirror {
                dict: m.dict.clone(),
                ..Mirror::default()
            };
            let mut state = e.clone();
            state.sites = FastMap::default();
            loaded.epochs.insert(*start, state);
            loaded.derive_sites(*start);
            assert_eq!(loaded.epochs[start].sites, e.sites, "epoch {start}");
        }
    }

    #[test]
    fn searching_from_the_newest_cells_finds_what_a_binary_search_finds() {
        for n in 0..12i64 {
            let cells: Vec<i64> = (0..n).map(|i| 2 * i).collect();
            for cell in -1..2 * n + 1 {
                assert_eq!(
                    search_recent(&cells, cell, |c| *c),
                    cells.binary_search(&cell),
                    "{cell} in {cells:?}"
                );
            }
        }
    }

    #[test]
    fn range_is_half_open_and_uses_total_for_full_cover() {
        let mut c = UrlCounts::default();
        c.add(3, 5);
        c.add(1, 2);
        c.add(7, 1);
        c.add(9, 0);
        assert_eq!(c.cells, vec![(1, 2), (3, 5), (7, 1)]);
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
        let h = CELL_MS;
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
            m.cell_counts(x, Seq(0), 0, 10),
            Ok(vec![(0, 1), (1, 2), (2, 1)])
        );
        assert_eq!(m.cell_counts(x, Seq(3), 0, 2), Ok(vec![(1, 1)]));
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
        let mut events = vec![
            ev(1, "http://a.com/x", 0),
            ev(2, "http://a.com/y", 0),
            ev(3, "http://a.com/x", 0),
        ];
        events[1].event.referrer = Some("http://r.test/".into());
        let mut m = mirror_of(&events, &[Seq(1), Seq(3)]);
        assert_eq!(
            m.dict.len(),
            4,
            "two URLs, y's referred source key and its direct one"
        );
        // Direct partitions are read with their URL, not listed by host.
        assert_eq!(m.dict.urls_of_host("a.com").len(), 2);
        assert_eq!(m.dict.referred_of_host("a.com").len(), 1);
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
        assert!(m.visitors("http://a.com/x", Seq(0), 0, 1, 14).is_err());
        assert!(m.cell_counts("http://a.com/x", Seq(0), 0, 1).is_err());
        // Only x is left in a live epoch: y's ids are free again.
        assert_eq!(m.dict.len(), 1);
        assert_eq!(
            m.dict.urls_of_host("a.com"),
            [m.dict.id("http://a.com/x").unwrap()]
        );
        assert!(m.dict.referred_of_host("a.com").is_empty());
        assert!(m.dict.id("http://a.com/y").is_none());
        let y_direct = tally_core::dims::source_key("", "http://a.com/y");
        assert!(m.dict.id(&y_direct).is_none());
        // Collecting is monotonic.
        m.collect_before(Seq(2));
        assert_eq!(m.floor, Seq(3));
    }

    /// Ids freed by a collection are taken again, so the ids (and the per-id tables) stay as
    /// many as the live keys, while names and counts stay exact.
    #[test]
    fn collected_ids_are_taken_again_by_new_urls() {
        let mut m = Mirror::default();
        let mut seq = 0u64;
        let mut epoch = Seq(1);
        let events = |seq: &mut u64, urls: std::ops::Range<u64>, referred: bool| -> Vec<_> {
            urls.map(|i| {
                *seq += 1;
                let mut e = ev(*seq, &format!("http://a.com/{i}"), 0);
                if referred {
                    e.event.referrer = Some("http://r.test/".into());
                }
                e
            })
            .collect()
        };
        let mut peak = 0;
        for round in 0..5u64 {
            // 100 URLs (half of them referred: three keys each) new to this epoch, then the
            // previous epochs collected.
            let mut batch = events(&mut seq, round * 100..round * 100 + 50, false);
            batch.extend(events(&mut seq, round * 100 + 50..round * 100 + 100, true));
            for d in aggregate(&batch, &[epoch]) {
                m.apply(&d).unwrap();
            }
            for i in round * 100..round * 100 + 100 {
                let url = format!("http://a.com/{i}");
                assert_eq!(m.views(&url, Seq(epoch.0 - 1), 0, 1), Ok(1), "{url}");
            }
            peak = peak.max(m.dict.next);
            epoch = Seq(seq + 1);
            m.collect_before(epoch);
            assert_eq!(m.dict.len(), 0);
        }
        // 200 keys live at a time (50 URLs + 50 × (URL, referred key, direct key)), never more ids.
        assert_eq!(peak, 200, "ids are reused, not grown per URL ever seen");
        assert!(m.dict.newest.len() <= 200);
        // Everything collected: every id is free again.
        let ids: HashSet<u32> = (0..200).collect();
        assert_eq!(m.dict.free.iter().copied().collect::<HashSet<u32>>(), ids);
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
    fn visitor_hashes_are_a_union_over_epochs_and_cells() {
        use tally_core::sketch::visitor_hash32;
        use tally_core::{CELL_MS, DAY_MS};
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
        // Days `[from, to)`, as cells.
        let hashes = |url: &str, after: Seq, from: i64, to: i64| {
            let day = DAY_MS / CELL_MS;
            m.visitors(url, after, from * day, to * day, 14).map(|v| {
                let v = v.finish(14);
                assert_eq!(v.registers, None, "no day is busy");
                v.hashes
            })
        };
        let h = |v: &str| visitor_hash32(v.as_bytes());
        let mut want = vec![h("x"), h("y")];
        want.sort_unstable();
        assert_eq!(hashes("u", Seq(0), 0, 2), Ok(want));
        assert_eq!(hashes("u", Seq(3), 0, 2), Ok(vec![h("x")]));
        assert_eq!(hashes("u", Seq(3), 2, 3), Ok(vec![h("z")]));
        assert_eq!(hashes("u", Seq(0), 3, 9), Ok(vec![]));
        assert_eq!(hashes("nope", Seq(0), 0, 9), Ok(vec![]));
        assert_eq!(hashes("u", Seq(0), 2, 0), Ok(vec![]));
    }

    #[test]
    fn busy_cells_keep_registers_that_equal_those_of_their_hashes() {
        use tally_core::sketch::{set_register, visitor_hash32};
        use tally_core::{CELL_MS, DAY_MS};
        let p = 4; // a sparse sketch holds 4 hashes
        let mut events = Vec::new();
        // Day 0: 3 visitors (quiet); day 1: 40 visitors in its first cell, half in each epoch
        // (busy in both).
        for i in 0..3 {
            let mut e = ev(events.len() as u64 + 1, "u", 0);
            e.event.visitor = Some(format!("q{i}"));
            events.push(e);
        }
        for i in 0..40 {
            let mut e = ev(events.len() as u64 + 1, "u", DAY_MS + i);
            e.event.visitor = Some(format!("b{i}"));
            events.push(e);
        }
        let cut = Seq(24);
        let mut m = Mirror::empty(Seq(1), p);
        let mut loaded = Mirror::empty(Seq(1), p);
        for mut d in aggregate(&events, &[Seq(1), cut]) {
            // One URL, no source keys: its id is 0 in every mirror.
            d.urls.retain(|k, _| !tally_core::dims::is_source_key(k));
            m.apply(&d).unwrap();
            // What a load from Redis builds: the hashes first, registers after.
            // (One URL: its id is 0 in both mirrors.)
            let mut plain = Mirror::empty(Seq(1), p);
            plain.apply(&d).unwrap();
            let e = plain.epochs.remove(&d.epoch).unwrap();
            for (id, mut c) in e.urls {
                let mut bare = Visitors::default();
                bare.extend(c.visitors.members(), None);
                bare.densify(p);
                c.visitors = bare;
                loaded.dict.insert(id, "u").unwrap();
                loaded.epochs.entry(d.epoch).or_default().urls.insert(id, c);
            }
            loaded.set_applied(d.epoch, d.last);
        }
        let h = |v: &str| visitor_hash32(v.as_bytes());
        let mut busy = vec![0u8; 1 << p].into_boxed_slice();
        for i in 0..40 {
            set_register(&mut busy, p, h(&format!("b{i}")));
        }
        let mut all_regs = busy.clone();
        let mut quiet: Vec<u32> = (0..3).map(|i| h(&format!("q{i}"))).collect();
        for q in &quiet {
            set_register(&mut all_regs, p, *q);
        }
        quiet.sort_unstable();
        for mirror in [&m, &loaded] {
            // Collected: the busy day as registers, the quiet day as hashes.
            let mut got = mirror
                .visitors("u", Seq(0), 0, 2 * DAY_MS / CELL_MS, p)
                .unwrap();
            got.hashes.sort_unstable();
            assert_eq!(got.hashes, quiet);
            assert_eq!(got.registers.as_deref(), Some(&busy[..]));
            // Finished: the hashes are in the registers.
            let got = got.finish(p);
            assert!(got.hashes.is_empty());
            assert_eq!(got.registers.as_deref(), Some(&all_regs[..]));
            // Only the second epoch: its 20 visitors are still busy.
            let day1 = (DAY_MS / CELL_MS, 2 * DAY_MS / CELL_MS);
            let late = mirror
                .visitors("u", Seq(cut.0 - 1), day1.0, day1.1, p)
                .unwrap();
            assert!(late.hashes.is_empty() && late.registers.is_some());
            // Another precision: every hash, no registers.
            let all = mirror
                .visitors("u", Seq(0), 0, day1.1, p + 1)
                .unwrap()
                .finish(p + 1);
            assert_eq!((all.hashes.len(), all.registers), (43, None));
        }
        assert_eq!(m.epochs, loaded.epochs);
    }

    /// A batch view for the ranking tests: `(url, hour)` cells of the events up to `cutoff`.
    struct Base {
        cutoff: Seq,
        cells: Vec<(String, i64)>,
    }

    impl BaseTotals for Base {
        fn id(&self) -> &str {
            "v"
        }
        fn cutoff(&self) -> Seq {
            self.cutoff
        }
        fn total(&self, url: &str) -> u64 {
            self.cells.iter().filter(|(u, _)| u == url).count() as u64
        }
        fn top(&self, host: Option<&str>, k: usize) -> Vec<(Arc<str>, u64)> {
            let mut all: HashMap<&str, u64> = HashMap::new();
            for (u, _) in &self.cells {
                if host.is_none_or(|h| tally_core::url::host_of(u) == Some(h)) {
                    *all.entry(u).or_default() += 1;
                }
            }
            let mut v: Vec<(Arc<str>, u64)> =
                all.into_iter().map(|(u, n)| (Arc::from(u), n)).collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            v.truncate(k);
            v
        }
        fn hosts(&self) -> Vec<Arc<str>> {
            let hs: HashSet<&str> = self
                .cells
                .iter()
                .filter_map(|(u, _)| tally_core::url::host_of(u))
                .collect();
            hs.into_iter().map(Arc::from).collect()
        }
        fn late(&self, from_cell: i64) -> Vec<Arc<str>> {
            let us: HashSet<&str> = self
                .cells
                .iter()
                .filter(|(_, h)| *h >= from_cell)
                .map(|(u, _)| u.as_str())
                .collect();
            us.into_iter().map(Arc::from).collect()
        }
        fn views_before(&self, url: &str, to_cell: i64) -> u64 {
            self.cells
                .iter()
                .filter(|(u, h)| u == url && *h < to_cell)
                .count() as u64
        }
    }

    /// The incremental rankings answer exactly what a full sort of batch + speed answers, for
    /// every limit and host, while views keep arriving — also with events ahead of the clock,
    /// which an all-time answer (until the next full hour) must leave out.
    #[test]
    fn all_time_rankings_equal_a_full_sort_while_views_arrive() {
        let now_cell = tally_core::cell_of(tally_core::now_ms());
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let url = |i: u64| format!("http://h{}.test/{}", i % 3, i);
        let mut all: Vec<(u64, String, i64)> = Vec::new();
        let cutoff = Seq(300);
        for seq in 1..=300u64 {
            let i = rnd(40).min(rnd(40));
            let hour = if rnd(20) == 0 {
                now_cell + 1
            } else {
                now_cell - rnd(100) as i64
            };
            all.push((seq, url(i), hour));
        }
        let base = Arc::new(Base {
            cutoff,
            cells: all.iter().map(|(_, u, h)| (u.clone(), *h)).collect(),
        });
        let epochs = [Seq(1), Seq(301)];
        let mut m = Mirror::default();
        m.set_base(base.clone());
        let check = |m: &Mirror, all: &[(u64, String, i64)]| {
            let to_cell = now_cell + 1;
            for host in [None, Some("h0.test"), Some("h2.test"), Some("nope.test")] {
                for limit in [1, 3, 10, 100] {
                    let mut counts: HashMap<&str, u64> = HashMap::new();
                    for (_, u, h) in all {
                        if *h < to_cell
                            && host.is_none_or(|x| tally_core::url::host_of(u) == Some(x))
                        {
                            *counts.entry(u).or_default() += 1;
                        }
                    }
                    let mut want: Vec<(String, u64)> = counts
                        .into_iter()
                        .map(|(u, n)| (u.to_string(), n))
                        .collect();
                    want.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                    want.truncate(limit);
                    let got = m.top_all_time("v", cutoff, limit, host, to_cell).unwrap();
                    assert_eq!(got, Some(want), "limit {limit} host {host:?}");
                }
            }
            // Another view, or more than a host ranking keeps: not answered here.
            assert_eq!(m.top_all_time("w", cutoff, 10, None, to_cell), Ok(None));
            assert_eq!(
                m.top_all_time("v", cutoff, 101, Some("h0.test"), to_cell),
                Ok(None)
            );
            // An end the clock has reached: events of its cell applied since may not be
            // recorded as ahead of the clock, so only a scan is exact.
            let reached = tally_core::cell_of(tally_core::now_ms());
            assert_eq!(m.top_all_time("v", cutoff, 10, None, reached), Ok(None));
        };
        check(&m, &all);
        let mut seq = 301u64;
        for _ in 0..20 {
            let mut batch = Vec::new();
            for _ in 0..rnd(30) + 1 {
                let i = rnd(50).min(rnd(50));
                let hour = if rnd(10) == 0 {
                    now_cell + 1
                } else {
                    now_cell - rnd(3) as i64
                };
                let mut e = ev(seq, &url(i), hour * CELL_MS);
                e.event.received_at = tally_core::now_ms();
                batch.push(e);
                all.push((seq, url(i), hour));
                seq += 1;
            }
            for d in aggregate(&batch, &epochs) {
                m.apply(&d).unwrap();
            }
            check(&m, &all);
        }
        // Rebuilt from scratch (a new mirror, the same base): the same answers.
        m.set_base(base);
        check(&m, &all);
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
                parts.apply(&d).unwrap();
            }
        }
        for url in (0..7).map(|i| format!("u{i}")) {
            for after in [Seq(0), Seq(49), Seq(50), Seq(119)] {
                assert_eq!(
                    once.cell_counts(&url, after, i64::MIN, i64::MAX),
                    parts.cell_counts(&url, after, i64::MIN, i64::MAX)
                );
            }
        }
        assert_eq!(once.epochs.len(), parts.epochs.len());
    }
}

/// How fast the applier's work on the mirror is, on traffic like the mixed benchmark's: a
/// batch view of 700 000 URLs, Zipf traffic over 1M URLs on 1 000 hosts, batches of 20 000
/// events. Not a test (no assertion; run it to measure):
/// `cargo test --release -p tally-speed --lib apply_throughput -- --ignored --nocapture`.
#[cfg(test)]
mod bench {
    use super::*;
    use crate::aggregate::aggregate;
    use crate::aggregate::tests::ev;
    use crate::rank::BaseTotals;

    struct Base(tally_core::hash::FastMap<String, u64>);

    impl BaseTotals for Base {
        fn id(&self) -> &str {
            "v"
        }
        fn cutoff(&self) -> Seq {
            Seq::ZERO
        }
        fn total(&self, url: &str) -> u64 {
            self.0.get(url).copied().unwrap_or(0)
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
        fn views_before(&self, url: &str, _: i64) -> u64 {
            self.total(url)
        }
    }

    #[test]
    #[ignore = "a measurement, not a test"]
    fn apply_throughput() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Zipf(1) over n by inverse transform of the harmonic approximation.
        let n = 1_000_000f64;
        let hn = n.ln() + 0.5772;
        let url = |r: u64| {
            let u = (r >> 11) as f64 / (1u64 << 53) as f64;
            let i = ((u * hn).exp() - 0.5).clamp(0.0, n - 1.0) as u64;
            format!("https://h{}.bench/page/{i}", i % 1000)
        };
        let base: tally_core::hash::FastMap<String, u64> = (0..700_000u64)
            .map(|i| (format!("https://h{}.bench/page/{i}", i % 1000), 10))
            .collect();
        let mut m = Mirror::empty(Seq(1), 14);
        m.set_base(Arc::new(Base(base)));
        let now = tally_core::now_ms();
        let mut seq = 0u64;
        let mut batches = Vec::new();
        for _ in 0..300 {
            let mut events = Vec::with_capacity(20_000);
            for _ in 0..20_000 {
                seq += 1;
                // As `scripts/bench.sh mixed` sends them: 90 % in the last hour, 10 % over
                // the last 30 days (so sites and campaigns span thousands of cells).
                let back = match rnd() % 10 {
                    0 => rnd() % (30 * tally_core::DAY_MS as u64),
                    _ => rnd() % 3_600_000,
                };
                let mut e = ev(seq, &url(rnd()), now - back as i64);
                e.event.visitor = Some(format!("v{}", rnd() % 200_000));
                // A quarter of the views referred by one of 20 sites.
                if rnd() % 4 == 0 {
                    e.event.referrer = Some(format!("https://ref{}.test/", rnd() % 20));
                }
                events.push(e);
            }
            batches.push(aggregate(&events, &[Seq(1)]));
        }
        let updates: usize = batches.iter().flatten().map(|d| d.urls.len()).sum();
        let started = std::time::Instant::now();
        for b in &batches {
            for d in b {
                m.apply(d).unwrap();
            }
        }
        let took = started.elapsed();
        println!(
            "{seq} events, {updates} url updates, {} live urls: {:.0} ms, {:.2} us per update, {:.0} events/s",
            m.dict.len(),
            took.as_secs_f64() * 1e3,
            took.as_secs_f64() * 1e6 / updates as f64,
            seq as f64 / took.as_secs_f64()
        );
        // A site's reads, through the host index: 200 sites' top pages, sources and series.
        let started = std::time::Instant::now();
        let mut found = 0usize;
        for h in 0..200 {
            let host = format!("h{h}.bench");
            found += m
                .range_totals(Seq(0), i64::MIN, i64::MAX, Some(&host))
                .unwrap()
                .len();
            found += m
                .sources(&host, None, Seq(0), (i64::MIN, i64::MAX), true)
                .unwrap()
                .len();
            found += m
                .sites(&[&host], Seq(0), (i64::MIN, i64::MAX), (0, 0), 14)
                .unwrap()
                .len();
        }
        println!(
            "site reads: {:.2} ms per site (range_totals + sources + sites), {found} items",
            started.elapsed().as_secs_f64() * 1e3 / 200.0
        );
        // What a breakdown by a campaign dimension reads of the speed layer: every source key
        // of the site, or its campaign keys. The busiest sites, first phase (views) only.
        for (what, campaigns) in [("source keys", false), ("campaign keys", true)] {
            let started = std::time::Instant::now();
            let mut keys = 0;
            for h in 0..20 {
                let host = format!("h{h}.bench");
                let all = (i64::MIN, i64::MAX);
                keys += match campaigns {
                    false => m.sources(&host, None, Seq(0), all, false).unwrap().len(),
                    true => m.campaigns(&host, Seq(0), all, false).unwrap().len(),
                };
            }
            println!(
                "breakdown reads of {what}: {:.3} ms per site, {} keys per site",
                started.elapsed().as_secs_f64() * 1e3 / 20.0,
                keys / 20
            );
        }
    }
}
