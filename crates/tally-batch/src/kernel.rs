//! The batch computation: per URL, views per 15-minute cell (and optionally its distinct visitors
//! per cell and a visitor sketch per UTC day) over the master files, counting exactly the events
//! with `seq <= cutoff`.
//!
//! How it stays fast:
//! - one task per (file, row group), spread over the rayon pool;
//! - only the needed columns are decoded (`ts`, `url`; `seq` only for files that straddle the
//!   cutoff; `visitor` only with sketches);
//! - `url` is read as `Dictionary(Int32, Utf8)` and aggregated on dictionary keys: a URL string
//!   is looked at once per dictionary, never per row; rows are sorted by (url, ts) in master
//!   files, so a row group becomes a short run-length list of (url, cell, count) cells;
//! - each file's row groups become one canonical partial, kept encoded (the form
//!   [`crate::partials`] caches, ~5 bytes per entry); files are scanned a window at a time, so a
//!   run never holds every file's decoded partial;
//! - the partials are merged a range of key ranks at a time by a counting sort on the global
//!   key rank (no string work per cell), then each key's few runs are sorted by cell in
//!   parallel: the merge holds one range's entries decoded, besides the view it builds.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Array, AsArray, DictionaryArray, RecordBatch, StringArray};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{
    DataType, Field, Int32Type, Int64Type, Schema, TimeUnit, TimestampMillisecondType, UInt64Type,
};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;
use rayon::prelude::*;
use serde::Serialize;
use std::hash::BuildHasher;

use tally_core::hash::{FastMap, FastState};
use tally_core::{Seq, CELL_MS};
use tally_master::MasterFile;

use crate::error::{Error, Result};
use crate::partials::{Encoded, Entries, PartialCache, Slot};
use crate::sketch::{self, VisitorSketch};
use crate::visitors::{KeyVisitors, CELLS_PER_DAY};

/// Rows decoded per Arrow batch.
const BATCH_ROWS: usize = 64 * 1024;

/// Live progress of a computation (read by `GET /v1/admin/batch`).
#[derive(Debug, Default)]
pub struct Progress {
    pub files_total: AtomicU64,
    pub files_done: AtomicU64,
    /// Of `files_done`, those whose cached partial was merged instead of reading the file.
    pub files_reused: AtomicU64,
    pub events_done: AtomicU64,
}

/// A copy of [`Progress`] at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProgressSnapshot {
    pub files_done: u64,
    pub files_total: u64,
    pub files_reused: u64,
    /// Files read so far (`files_done - files_reused`).
    pub files_computed: u64,
    pub events_done: u64,
}

impl Progress {
    pub fn new() -> Progress {
        Progress::default()
    }

    pub fn snapshot(&self) -> ProgressSnapshot {
        let files_done = self.files_done.load(Ordering::Relaxed);
        let files_reused = self.files_reused.load(Ordering::Relaxed);
        ProgressSnapshot {
            files_done,
            files_reused,
            files_computed: files_done.saturating_sub(files_reused),
            files_total: self.files_total.load(Ordering::Relaxed),
            events_done: self.events_done.load(Ordering::Relaxed),
        }
    }
}

/// Where the time of one computation went. `*_cpu_ms` are summed over the worker threads;
/// `*_wall_ms` are elapsed time.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ComputeStats {
    pub files: usize,
    /// Files whose cached partial aggregate was merged instead of reading them.
    pub files_reused: usize,
    /// Files read (all of them without a cache, or on a full run).
    pub files_computed: usize,
    /// The first seq of each file read: a run of two keyings read a file when either did.
    #[serde(skip)]
    pub computed_files: Vec<tally_core::Seq>,
    pub row_groups: usize,
    /// Rows decoded (including rows after the cutoff in straddling files).
    pub rows_read: u64,
    /// `url` dictionaries seen (one per row group when the master file keeps `url`
    /// dictionary-encoded; more means the writer fell back to plain pages).
    pub url_dictionaries: u64,
    /// Opening files and reading footers.
    pub open_wall_ms: f64,
    /// Parquet read + decompress + decode into Arrow.
    pub read_decode_cpu_ms: f64,
    /// Per-row-group aggregation on dictionary keys.
    pub aggregate_cpu_ms: f64,
    /// The parallel scan (read + decode + aggregate).
    pub scan_wall_ms: f64,
    /// Merging the partial results into the final, sorted view data.
    pub merge_wall_ms: f64,
    pub total_wall_ms: f64,
}

/// The result of [`compute`]: the content of a batch view, column-wise.
///
/// URL `i` is `urls[i]` (ascending, distinct); its cells are `cell[offsets[i]..offsets[i+1]]`
/// (ascending, distinct cell numbers: [`tally_core::CELL_MS`] cells since the epoch) with
/// `views[..]` (non-zero).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ViewData {
    pub urls: Vec<String>,
    pub offsets: Vec<usize>,
    pub cell: Vec<i64>,
    pub views: Vec<u64>,
    pub sketches: Option<SketchData>,
    /// The same counts per source key (`tally_core::dims::source_key`), for breakdowns:
    /// [`compute_sources`]. `None` in the result of either compute function; the runner sets it.
    pub sources: Option<Box<ViewData>>,
    /// Number of events counted (`seq <= cutoff`).
    pub events: u64,
    pub stats: ComputeStats,
}

/// Visitor sketches per (URL, UTC day): URL `i` has `days[offsets[i]..offsets[i+1]]`
/// (ascending, days since the epoch) with `sketches[..]`. URLs are those of [`ViewData::urls`].
///
/// And the distinct visitors of every (URL, cell) of [`ViewData::cell`], for ranges that start
/// or end inside a UTC day (local days of a zone whose midnights are not UTC midnights): cell
/// `j` has `cell_hashes[cell_offsets[j]..cell_offsets[j+1]]`, ascending
/// ([`crate::visitor_hash`]s); `cell_offsets` has one entry per cell and one more.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SketchData {
    pub precision: u8,
    pub offsets: Vec<usize>,
    pub days: Vec<i64>,
    pub sketches: Vec<VisitorSketch>,
    pub cell_offsets: Vec<u32>,
    pub cell_hashes: Vec<u32>,
}

impl SketchData {
    /// No visitor anywhere: the sketch data of `keys` keys with `cells` cells.
    pub fn empty(precision: u8, keys: usize, cells: usize) -> SketchData {
        SketchData {
            precision,
            offsets: vec![0; keys + 1],
            cell_offsets: vec![0; cells + 1],
            ..Default::default()
        }
    }

    /// The visitors of key `i`, whose cells are `cells`, the entries `first_cell..` of the
    /// cells this data was built with ([`ViewData::cell`]).
    pub fn key<'a>(&'a self, i: usize, first_cell: usize, cells: &'a [i64]) -> KeyVisitors<'a> {
        let (s, e) = (self.offsets[i], self.offsets[i + 1]);
        let days = (&self.days[s..e], &self.sketches[s..e]);
        if self.cell_offsets.is_empty() {
            return KeyVisitors::new(days, &[], &[], &[]);
        }
        let lists = &self.cell_offsets[first_cell..=first_cell + cells.len()];
        KeyVisitors::new(days, cells, lists, &self.cell_hashes)
    }
}

impl ViewData {
    /// Number of (url, 15-minute cell) entries.
    pub fn cells(&self) -> usize {
        self.cell.len()
    }
}

/// Maps an `i64` bucket into a `u32` that sorts the same way.
#[inline]
fn bias(b: i64) -> Option<u32> {
    i32::try_from(b).ok().map(|v| (v as u32) ^ 0x8000_0000)
}

#[inline]
fn unbias(b: u32) -> i64 {
    i64::from((b ^ 0x8000_0000) as i32)
}

/// The result of one row group, or of a whole master file ([`merge_file`], cached by
/// [`crate::partials`]).
#[derive(Default)]
pub(crate) struct Partial {
    /// The `url` dictionaries of the row group (normally one).
    pub(crate) dicts: Vec<StringArray>,
    /// Local URL id -> (dictionary number, index in it).
    pub(crate) urls: Vec<(u32, u32)>,
    /// `(local id << 32 | biased cell, count)`, sorted by key, distinct keys.
    /// Counts in u64: a (key, cell) summed over row groups or files may pass 2^32.
    pub(crate) cells: Vec<(u64, u64)>,
    /// `(local id << 32 | biased cell, visitor hash)`.
    pub(crate) visitors: Vec<(u64, u32)>,
    pub(crate) rows: u64,
    pub(crate) events: u64,
    pub(crate) dictionaries: u64,
    pub(crate) decode_ns: u64,
    pub(crate) agg_ns: u64,
}

struct FilePlan {
    file: MasterFile,
    meta: ArrowReaderMetadata,
    mask: ProjectionMask,
    keying: Keying,
    need_seq: bool,
    row_groups: usize,
    remaining: AtomicU64,
}

/// Computes the batch view over `files` for exactly the events with `seq <= cutoff`.
///
/// `sketch_precision`: `Some(p)` also builds a visitor sketch per (URL, UTC day) with
/// precision `p` (4..=18); `None` skips sketches (and never reads `visitor`).
/// Blocking and CPU-heavy: call it from `spawn_blocking` or a dedicated thread.
pub fn compute(
    files: &[MasterFile],
    cutoff: Seq,
    sketch_precision: Option<u8>,
    progress: &Progress,
) -> Result<ViewData> {
    compute_cached(files, cutoff, sketch_precision, progress, None)
}

/// [`compute`], reusing the cached partial aggregate of every master file wholly at or below
/// `cutoff` found in `cache` and caching those it computes ([`crate::partials`]); `None` is
/// [`compute`]. The result is the same as [`compute`]'s; `stats.files_reused` and
/// `stats.files_computed` say what was reused.
pub fn compute_cached(
    files: &[MasterFile],
    cutoff: Seq,
    sketch_precision: Option<u8>,
    progress: &Progress,
    cache: Option<&PartialCache>,
) -> Result<ViewData> {
    compute_keyed(
        files,
        cutoff,
        sketch_precision,
        progress,
        Keying::Url,
        cache,
        MERGE_STEP_ENTRIES,
    )
}

/// [`compute`] per source key (`tally_core::dims::source_key`: the pair (referrer host, URL))
/// instead of per URL: the data of every breakdown. `urls` of the result are source keys.
pub fn compute_sources(
    files: &[MasterFile],
    cutoff: Seq,
    sketch_precision: Option<u8>,
    progress: &Progress,
) -> Result<ViewData> {
    compute_sources_cached(files, cutoff, sketch_precision, progress, None)
}

/// [`compute_sources`] with cached partials, as [`compute_cached`].
pub fn compute_sources_cached(
    files: &[MasterFile],
    cutoff: Seq,
    sketch_precision: Option<u8>,
    progress: &Progress,
    cache: Option<&PartialCache>,
) -> Result<ViewData> {
    compute_keyed(
        files,
        cutoff,
        sketch_precision,
        progress,
        Keying::Source,
        cache,
        MERGE_STEP_ENTRIES,
    )
}

/// What one computation counts under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keying {
    Url,
    /// `(referrer host, url)`: also reads `referrer`.
    Source,
}

/// [`compute_cached`] or [`compute_sources_cached`], as `keying` says, merging about
/// `step_entries` entries a step ([`merge`]): the files to count chosen, the partials the
/// cache holds loaded, the other files planned and scanned, then every partial merged.
fn compute_keyed(
    files: &[MasterFile],
    cutoff: Seq,
    sketch_precision: Option<u8>,
    progress: &Progress,
    keying: Keying,
    cache: Option<&PartialCache>,
    step_entries: usize,
) -> Result<ViewData> {
    let t0 = Instant::now();
    let run = KeyedRun::new(cutoff, sketch_precision, keying, cache, progress)?;
    let files = run.select_files(files)?;
    let CacheLookup {
        mut parts,
        files,
        slots,
    } = run.load_cached(files)?;
    let files_reused = parts.len();
    let plans = run.plan_files(files)?;
    let open_ms = ms(t0);

    let t_scan = Instant::now();
    let row_groups = run.scan_files(&plans, &slots, &mut parts)?;
    let scan_ms = ms(t_scan);

    check_visitor_entries(&parts)?;
    let t_merge = Instant::now();
    let mut data = merge(parts, sketch_precision, step_entries);
    let merge_ms = ms(t_merge);
    // The merge's stats (what the partials carry from their scans), and this run's.
    data.stats = ComputeStats {
        files: plans.len() + files_reused,
        files_reused,
        files_computed: plans.len(),
        computed_files: plans.iter().map(|p| p.file.first).collect(),
        row_groups,
        open_wall_ms: open_ms,
        scan_wall_ms: scan_ms,
        merge_wall_ms: merge_ms,
        total_wall_ms: ms(t0),
        ..data.stats
    };
    log_done(&data);
    Ok(data)
}

/// What the steps of one computation ([`compute_keyed`]) share: its settings, and the progress
/// they report to.
struct KeyedRun<'a> {
    cutoff: Seq,
    /// Visitor pairs are counted too (with sketches).
    visitors: bool,
    keying: Keying,
    cache: Option<&'a PartialCache>,
    progress: &'a Progress,
}

impl<'a> KeyedRun<'a> {
    /// A run's settings; an error if `sketch_precision` is out of range ([`VisitorSketch::new`]).
    fn new(
        cutoff: Seq,
        sketch_precision: Option<u8>,
        keying: Keying,
        cache: Option<&'a PartialCache>,
        progress: &'a Progress,
    ) -> Result<KeyedRun<'a>> {
        if let Some(p) = sketch_precision {
            VisitorSketch::new(p)?;
        }
        Ok(KeyedRun {
            cutoff,
            visitors: sketch_precision.is_some(),
            keying,
            cache,
            progress,
        })
    }

    /// The files holding events at or below the cutoff, by first seq (their number is the
    /// progress's total); an error if two of them overlap.
    fn select_files(&self, files: &[MasterFile]) -> Result<Vec<MasterFile>> {
        let mut files: Vec<MasterFile> = files
            .iter()
            .filter(|f| f.first <= self.cutoff)
            .cloned()
            .collect();
        files.sort_by_key(|f| f.first);
        for w in files.windows(2) {
            if w[1].first <= w[0].last {
                return Err(Error::Snapshot(format!(
                    "master files {} and {} overlap",
                    w[0].path.display(),
                    w[1].path.display()
                )));
            }
        }
        self.progress
            .files_total
            .store(files.len() as u64, Ordering::Relaxed);
        Ok(files)
    }

    /// Looks `files` up in the cache, in parallel: the files it holds the partial of are
    /// counted done and reused, the others left to scan.
    fn load_cached(&self, files: Vec<MasterFile>) -> Result<CacheLookup> {
        let looked_up: Vec<(MasterFile, Option<Slot>, Option<Encoded>)> = files
            .into_par_iter()
            .map(|f| self.look_up(f))
            .collect::<Result<_>>()?;
        let mut parts: Vec<Encoded> = Vec::new();
        let mut to_scan: Vec<(MasterFile, Option<Slot>)> = Vec::new();
        for (f, slot, hit) in looked_up {
            match hit {
                Some(p) => {
                    self.reused(&p);
                    parts.push(p);
                }
                None => to_scan.push((f, slot)),
            }
        }
        let (files, slots) = to_scan.into_iter().unzip();
        Ok(CacheLookup {
            parts,
            files,
            slots,
        })
    }

    /// `f`'s cache slot and the partial cached in it, if any: both `None` without a cache or
    /// for a file that straddles the cutoff.
    fn look_up(&self, f: MasterFile) -> Result<(MasterFile, Option<Slot>, Option<Encoded>)> {
        // Files wholly at or below the cutoff have a cacheable partial: load what the cache
        // holds.
        let Some(cache) = self.cache.filter(|_| f.last <= self.cutoff) else {
            return Ok((f, None, None));
        };
        let slot = cache.slot(&f, self.keying, self.visitors)?;
        let hit = cache.load(&slot, self.keying, self.visitors);
        Ok((f, Some(slot), hit))
    }

    /// Counts a file done and reused, with the events of its cached partial `p`.
    fn reused(&self, p: &Encoded) {
        let progress = self.progress;
        progress.files_reused.fetch_add(1, Ordering::Relaxed);
        progress.files_done.fetch_add(1, Ordering::Relaxed);
        progress.events_done.fetch_add(p.events, Ordering::Relaxed);
    }

    /// Plans the scan of each of `files` ([`plan_file`]), in parallel; files without row
    /// groups are counted done.
    fn plan_files(&self, files: Vec<MasterFile>) -> Result<Vec<FilePlan>> {
        let plans: Vec<FilePlan> = files
            .into_par_iter()
            .map(|f| plan_file(f, self.cutoff, self.visitors, self.keying))
            .collect::<Result<_>>()?;
        let empty_files = plans.iter().filter(|p| p.row_groups == 0).count();
        self.progress
            .files_done
            .fetch_add(empty_files as u64, Ordering::Relaxed);
        Ok(plans)
    }

    /// Scans the planned files, appending each one's partial to `parts` and storing it in the
    /// file's cache slot (`slots[i]` is `plans[i]`'s): returns the number of row groups read.
    ///
    /// A few files at a time: their row groups scanned in parallel, then each file's row groups
    /// made one canonical partial, encoded (and cached for the next run). A run holds the
    /// row-group partials of one window of files and the encoded partials of all, never every
    /// file's decoded partial.
    fn scan_files(
        &self,
        plans: &[FilePlan],
        slots: &[Option<Slot>],
        parts: &mut Vec<Encoded>,
    ) -> Result<usize> {
        let window = (rayon::current_num_threads() * 2).max(2);
        let mut row_groups = 0;
        for (plans, slots) in plans.chunks(window).zip(slots.chunks(window)) {
            row_groups += plans.iter().map(|p| p.row_groups).sum::<usize>();
            let scanned = self.scan_row_groups(plans)?;
            parts.extend(self.encode_files(scanned, slots));
        }
        Ok(row_groups)
    }

    /// The partials of every row group of `plans`' files, scanned in parallel, one list per
    /// file in the order of its row groups.
    fn scan_row_groups(&self, plans: &[FilePlan]) -> Result<Vec<Vec<Partial>>> {
        let tasks: Vec<(usize, usize)> = plans
            .iter()
            .enumerate()
            .flat_map(|(i, p)| (0..p.row_groups).map(move |rg| (i, rg)))
            .collect();
        let scanned: Vec<Partial> = tasks
            .par_iter()
            .with_max_len(1)
            .map(|&(fi, rg)| self.scan_task(&plans[fi], rg))
            .collect::<Result<_>>()?;
        let mut it = scanned.into_iter();
        Ok(plans
            .iter()
            .map(|plan| it.by_ref().take(plan.row_groups).collect())
            .collect())
    }

    /// Scans row group `rg` of `plan`'s file ([`scan_row_group`]); the file's last row group
    /// to finish counts the file done.
    fn scan_task(&self, plan: &FilePlan, rg: usize) -> Result<Partial> {
        let part = scan_row_group(plan, rg, self.cutoff, self.visitors, self.progress)?;
        if plan.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.progress.files_done.fetch_add(1, Ordering::Relaxed);
        }
        Ok(part)
    }

    /// Makes each file's row-group partials one canonical partial ([`merge_file`]), encoded,
    /// in parallel; stored in the cache when the file has a slot (`slots[i]` is file `i`'s).
    fn encode_files(&self, scanned: Vec<Vec<Partial>>, slots: &[Option<Slot>]) -> Vec<Encoded> {
        scanned
            .into_par_iter()
            .zip(slots)
            .map(|(row_groups, slot)| {
                let part = Encoded::new(&merge_file(row_groups), self.keying, self.visitors);
                if let (Some(cache), Some(slot)) = (self.cache, slot) {
                    cache.store(slot, &part);
                }
                part
            })
            .collect()
    }
}

/// A computation's files after the cache lookup ([`KeyedRun::load_cached`]).
struct CacheLookup {
    /// The partials the cache held, in file order.
    parts: Vec<Encoded>,
    /// The files left to scan, in order, and the cache slot of each (`None`: no cache, or a
    /// file that straddles the cutoff).
    files: Vec<MasterFile>,
    slots: Vec<Option<Slot>>,
}

/// Checks that the (key, cell, visitor) entries of `parts` fit one view.
fn check_visitor_entries(parts: &[Encoded]) -> Result<()> {
    // Per-cell visitor lists are indexed by `u32` (4 bytes per cell): at most 2^32 - 1 of them.
    let pairs: usize = parts.iter().map(|p| p.nvisitors).sum();
    if u32::try_from(pairs).is_err() {
        return Err(Error::Invalid(format!(
            "{pairs} (key, cell, visitor) entries are more than one batch view holds (2^32 - 1)"
        )));
    }
    Ok(())
}

/// Logs (at debug level) what a computation counted and where its time went.
fn log_done(data: &ViewData) {
    tracing::debug!(
        files = data.stats.files,
        row_groups = data.stats.row_groups,
        events = data.events,
        urls = data.urls.len(),
        cells = data.cells(),
        scan_ms = data.stats.scan_wall_ms,
        merge_ms = data.stats.merge_wall_ms,
        "batch kernel done"
    );
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn plan_file(file: MasterFile, cutoff: Seq, visitors: bool, keying: Keying) -> Result<FilePlan> {
    let path = file.path.clone();
    let f = File::open(&path).map_err(|e| Error::io(&path, e))?;
    let plain = ArrowReaderMetadata::load(&f, ArrowReaderOptions::new())
        .map_err(|e| Error::parquet(&path, e))?;
    let schema = plain.schema();
    let schema_err = |reason: String| Error::Schema {
        path: path.clone(),
        reason,
    };
    let need_seq = file.last > cutoff;
    let mut wanted = vec!["ts", "url"];
    if need_seq {
        wanted.push("seq");
    }
    if visitors {
        wanted.push("visitor");
    }
    if keying == Keying::Source {
        wanted.push("referrer");
    }
    let mut indices = Vec::new();
    for name in &wanted {
        let i = schema
            .index_of(name)
            .map_err(|_| schema_err(format!("missing column {name:?}")))?;
        indices.push(i);
    }
    // Ask for `url` (and `referrer`) as a dictionary so that the reader keeps the Parquet
    // dictionary.
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| {
            if (f.name() == "url" || f.name() == "referrer")
                && matches!(f.data_type(), DataType::Utf8)
            {
                f.as_ref().clone().with_data_type(DataType::Dictionary(
                    Box::new(DataType::Int32),
                    Box::new(DataType::Utf8),
                ))
            } else {
                f.as_ref().clone()
            }
        })
        .collect();
    let hint = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
    let meta = ArrowReaderMetadata::try_new(
        plain.metadata().clone(),
        ArrowReaderOptions::new().with_schema(hint),
    )
    .map_err(|e| Error::parquet(&path, e))?;
    let mask = ProjectionMask::roots(meta.parquet_schema(), indices);
    let row_groups = meta.metadata().num_row_groups();
    Ok(FilePlan {
        file,
        meta,
        mask,
        keying,
        need_seq,
        row_groups,
        remaining: AtomicU64::new(row_groups as u64),
    })
}

impl Partial {
    pub(crate) fn url(&self, lid: usize) -> &str {
        let (d, i) = self.urls[lid];
        self.dicts[d as usize].value(i as usize)
    }
}

/// The source keys of one row group ([`Keying::Source`]): each row's (URL, referrer) maps to
/// the key (referrer host, URL). A referrer is parsed once per dictionary entry into its site
/// (`tally_core::dims::referrer_site`), and a key is named once per (URL, site) pair.
#[derive(Default)]
struct SourceKeys {
    /// The current `referrer` dictionary and, per key in it, the referrer's site id (u32::MAX:
    /// not seen yet).
    dict: Option<StringArray>,
    map: Vec<u32>,
    /// Distinct sites of the row group; id 0 is "none".
    site_ids: FastMap<Box<str>, u32>,
    sites: Vec<Box<str>>,
    /// `(url local id << 32 | site id)` → key id.
    pairs: FastMap<u64, u32>,
    /// Key name → key id, and the names.
    by_name: FastMap<Box<str>, u32>,
    names: Vec<Box<str>>,
}

impl SourceKeys {
    fn new() -> SourceKeys {
        let mut s = SourceKeys::default();
        s.sites.push(Box::from(""));
        s.site_ids.insert(Box::from(""), 0);
        s
    }

    /// Uses `values` as the current referrer dictionary.
    fn set_dict(&mut self, values: &StringArray) {
        if !self.dict.as_ref().is_some_and(|d| same_strings(d, values)) {
            self.map.clear();
            self.map.resize(values.len(), u32::MAX);
            self.dict = Some(values.clone());
        }
    }

    /// The site id of the referrer under dictionary key `k` of the current dictionary.
    fn site(&mut self, k: usize) -> Option<u32> {
        let id = *self.map.get(k)?;
        if id != u32::MAX {
            return Some(id);
        }
        let site = tally_core::dims::referrer_site(Some(self.dict.as_ref()?.value(k)));
        let next = self.sites.len() as u32;
        let id = *self
            .site_ids
            .entry(Box::from(site.as_str()))
            .or_insert(next);
        if id == next {
            self.sites.push(site.into_boxed_str());
        }
        self.map[k] = id;
        Some(id)
    }

    /// The key id of a view of `url` (local id `lid`) referred from site `sid`.
    fn key(&mut self, lid: u32, sid: u32, url: &str) -> u32 {
        let pair = (u64::from(lid) << 32) | u64::from(sid);
        if let Some(k) = self.pairs.get(&pair) {
            return *k;
        }
        let host = tally_core::dims::unless_same_site(url, &self.sites[sid as usize]);
        let name = tally_core::dims::source_key(host, url);
        let next = self.names.len() as u32;
        let id = *self.by_name.entry(Box::from(name.as_str())).or_insert(next);
        if id == next {
            self.names.push(name.into_boxed_str());
        }
        self.pairs.insert(pair, id);
        id
    }
}

fn same_strings(a: &StringArray, b: &StringArray) -> bool {
    a.len() == b.len()
        && a.values().as_ptr() == b.values().as_ptr()
        && a.value_offsets().as_ptr() == b.value_offsets().as_ptr()
}

/// A schema error of the master file at `path`: the file does not hold what the scan reads.
fn schema_err(path: &Path, reason: &str) -> Error {
    Error::Schema {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Aggregates row group `rg` of `plan`'s file into a partial of (key, cell) counts (and visitor
/// pairs when `visitors`), counting only rows with `seq <= cutoff`: the read a batch at a time,
/// its decode and aggregation timed apart.
fn scan_row_group(
    plan: &FilePlan,
    rg: usize,
    cutoff: Seq,
    visitors: bool,
    progress: &Progress,
) -> Result<Partial> {
    let path = &plan.file.path;
    let mut reader = open_row_group(plan, rg)?;
    let mut scan = RowGroupScan::new(plan, cutoff, visitors);
    loop {
        let td = Instant::now();
        let batch = match reader.next() {
            None => break,
            Some(b) => b.map_err(|e| Error::parquet(path, e))?,
        };
        scan.part.decode_ns += td.elapsed().as_nanos() as u64;
        let ta = Instant::now();
        scan.part.rows += batch.num_rows() as u64;
        let columns = scan.columns(&batch)?;
        let events = scan.add_rows(&columns)?;
        scan.part.events += events;
        progress.events_done.fetch_add(events, Ordering::Relaxed);
        scan.part.agg_ns += ta.elapsed().as_nanos() as u64;
    }
    Ok(scan.finish())
}

/// A reader of row group `rg` of `plan`'s file, decoding only the planned columns. Each task
/// opens the file itself: row groups of one file are read by several threads at once.
fn open_row_group(plan: &FilePlan, rg: usize) -> Result<ParquetRecordBatchReader> {
    let path = &plan.file.path;
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    ParquetRecordBatchReaderBuilder::new_with_metadata(f, plan.meta.clone())
        .with_projection(plan.mask.clone())
        .with_row_groups(vec![rg])
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| Error::parquet(path, e))
}

/// The columns of one decoded batch that a scan reads, borrowed from the batch.
struct Columns<'b> {
    rows: usize,
    /// `url` dictionary keys, into the row group's current (last) dictionary.
    keys: &'b [i32],
    /// The number of that dictionary in [`Partial::dicts`].
    dict_no: u32,
    ts: &'b [i64],
    /// Only for files that straddle the cutoff ([`FilePlan::need_seq`]).
    seq: Option<&'b [u64]>,
    /// Only with sketches.
    visitor: Option<&'b StringArray>,
    /// `referrer` dictionary keys and their validity, only under [`Keying::Source`].
    referrer: Option<&'b [i32]>,
    ref_valid: Option<&'b NullBuffer>,
}

/// One row group's scan: the partial it builds and what it carries from batch to batch.
struct RowGroupScan<'a> {
    path: &'a Path,
    need_seq: bool,
    visitors: bool,
    cutoff: u64,
    part: Partial,
    /// URL -> local id, only built if the row group has more than one dictionary (a writer
    /// that fell back to plain pages); with one dictionary, distinct keys are distinct URLs.
    index: Option<HashMap<Box<str>, u32>>,
    /// Key -> local id for the current (last) dictionary (u32::MAX = not yet seen).
    map: Vec<u32>,
    /// The (key, cell) run being counted: rows come sorted by (url, ts), so equal keys are
    /// mostly adjacent and a run becomes one entry.
    prev_key: u64,
    prev_cnt: u64,
    sources: Option<SourceKeys>,
}

impl<'a> RowGroupScan<'a> {
    fn new(plan: &'a FilePlan, cutoff: Seq, visitors: bool) -> RowGroupScan<'a> {
        RowGroupScan {
            path: &plan.file.path,
            need_seq: plan.need_seq,
            visitors,
            cutoff: cutoff.get(),
            part: Partial::default(),
            index: None,
            map: Vec::new(),
            prev_key: u64::MAX,
            prev_cnt: 0,
            sources: (plan.keying == Keying::Source).then(SourceKeys::new),
        }
    }

    /// Checks and borrows the columns of `batch`, in the order the scan reads them. Its `url`
    /// and `referrer` dictionaries become the current ones.
    fn columns<'b>(&mut self, batch: &'b RecordBatch) -> Result<Columns<'b>> {
        let path = self.path;
        let keys = self.url_keys(batch)?;
        let dict_no = (self.part.dicts.len() - 1) as u32;
        let ts = ts_values(batch, path)?;
        let seq: Option<&[u64]> = if self.need_seq {
            let c = batch
                .column_by_name("seq")
                .ok_or_else(|| schema_err(path, "missing seq"))?;
            match c.data_type() {
                DataType::UInt64 => Some(c.as_primitive::<UInt64Type>().values()),
                _ => return Err(schema_err(path, "seq is not UInt64")),
            }
        } else {
            None
        };
        let visitor: Option<&StringArray> = if self.visitors {
            let c = batch
                .column_by_name("visitor")
                .ok_or_else(|| schema_err(path, "missing visitor"))?;
            Some(
                c.as_any()
                    .downcast_ref::<StringArray>()
                    .ok_or_else(|| schema_err(path, "visitor is not Utf8"))?,
            )
        } else {
            None
        };
        let (referrer, ref_valid) = match self.sources.as_mut() {
            None => (None, None),
            Some(src) => {
                let (keys, valid) = referrer_keys(batch, src, path)?;
                (Some(keys), valid)
            }
        };
        Ok(Columns {
            rows: batch.num_rows(),
            keys,
            dict_no,
            ts,
            seq,
            visitor,
            referrer,
            ref_valid,
        })
    }

    /// The `url` dictionary keys of `batch`. A dictionary not seen before (the reader hands
    /// the same one to every batch of a row group, unless the writer fell back to plain pages)
    /// is added to the partial and resets the key map; from the second one on, URLs are also
    /// indexed by string, so that one URL keeps one local id across dictionaries.
    fn url_keys<'b>(&mut self, batch: &'b RecordBatch) -> Result<&'b [i32]> {
        let path = self.path;
        let url = batch
            .column_by_name("url")
            .ok_or_else(|| schema_err(path, "missing url"))?;
        if url.null_count() > 0 {
            return Err(schema_err(path, "url has nulls"));
        }
        let Some(d) = url.as_any().downcast_ref::<DictionaryArray<Int32Type>>() else {
            return Err(schema_err(path, "url is not a string column"));
        };
        let values = d
            .values()
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| schema_err(path, "url dictionary values are not Utf8"))?;
        let part = &mut self.part;
        if !part
            .dicts
            .last()
            .is_some_and(|old| same_strings(old, values))
        {
            part.dictionaries += 1;
            self.map.clear();
            self.map.resize(values.len(), u32::MAX);
            if !part.dicts.is_empty() && self.index.is_none() {
                let idx = (0..part.urls.len())
                    .map(|l| (Box::from(part.url(l)), l as u32))
                    .collect();
                self.index = Some(idx);
            }
            part.dicts.push(values.clone());
        }
        Ok(d.keys().values())
    }

    /// Counts the rows of `c` at or below the cutoff into the partial, returning how many
    /// there were: per row its key's local id, its cell, and its visitor when there is one.
    fn add_rows(&mut self, c: &Columns<'_>) -> Result<u64> {
        let (path, cutoff) = (self.path, self.cutoff);
        let mut events = 0u64;
        for i in 0..c.rows {
            if let Some(seq) = c.seq {
                if seq[i] > cutoff {
                    continue;
                }
            }
            events += 1;
            let mut lid = self.local_id(c.keys[i] as usize, c.dict_no)?;
            if let (Some(src), Some(refs)) = (self.sources.as_mut(), c.referrer) {
                let sid = if c.ref_valid.is_none_or(|v| v.is_valid(i)) {
                    src.site(refs[i] as usize)
                        .ok_or_else(|| schema_err(path, "referrer dictionary key out of range"))?
                } else {
                    0
                };
                lid = src.key(lid, sid, self.part.url(lid as usize));
            }
            let t = c.ts[i];
            let cell =
                bias(t.div_euclid(CELL_MS)).ok_or_else(|| schema_err(path, "ts out of range"))?;
            let key = (u64::from(lid) << 32) | u64::from(cell);
            self.count(key);
            if let Some(v) = c.visitor {
                if v.is_valid(i) {
                    self.part
                        .visitors
                        .push((key, sketch::visitor_hash(v.value(i))));
                }
            }
        }
        Ok(events)
    }

    /// The local id of the URL under key `k` of the current dictionary (number `dict_no`),
    /// given on first sight: a new id, or with several dictionaries the id its string already
    /// has.
    #[inline]
    fn local_id(&mut self, k: usize, dict_no: u32) -> Result<u32> {
        let lid = *self
            .map
            .get(k)
            .ok_or_else(|| schema_err(self.path, "url dictionary key out of range"))?;
        if lid != u32::MAX {
            return Ok(lid);
        }
        let part = &mut self.part;
        let lid = match &mut self.index {
            None => {
                part.urls.push((dict_no, k as u32));
                (part.urls.len() - 1) as u32
            }
            Some(index) => {
                let s = part.dicts[dict_no as usize].value(k);
                match index.get(s) {
                    Some(&id) => id,
                    None => {
                        part.urls.push((dict_no, k as u32));
                        let id = (part.urls.len() - 1) as u32;
                        index.insert(Box::from(s), id);
                        id
                    }
                }
            }
        };
        self.map[k] = lid;
        Ok(lid)
    }

    /// Counts one row of `key`: extends the current run if it is the same key, else closes
    /// that run into the partial's cells and starts one.
    #[inline]
    fn count(&mut self, key: u64) {
        if key == self.prev_key {
            self.prev_cnt += 1;
        } else {
            if self.prev_cnt > 0 {
                self.part.cells.push((self.prev_key, self.prev_cnt));
            }
            self.prev_key = key;
            self.prev_cnt = 1;
        }
    }

    /// The finished partial: the last run closed, source keys named, and cells sorted with
    /// the counts of equal keys added (a key split over batches or dictionaries, or a source
    /// key met in several runs).
    fn finish(mut self) -> Partial {
        let ta = Instant::now();
        let part = &mut self.part;
        if self.prev_cnt > 0 {
            part.cells.push((self.prev_key, self.prev_cnt));
        }
        if let Some(src) = self.sources {
            // From here on the local ids are key ids: name them.
            let n = src.names.len() as u32;
            part.dicts = vec![StringArray::from_iter_values(src.names.iter())];
            part.urls = (0..n).map(|i| (0, i)).collect();
        }
        // Sorted input (the master's (url, ts) order) makes this a linear check.
        part.cells.sort_unstable_by_key(|c| c.0);
        tally_core::sum_runs(&mut part.cells);
        part.agg_ns += ta.elapsed().as_nanos() as u64;
        self.part
    }
}

/// The `ts` values of `batch` in milliseconds: a `Timestamp(ms)` column, or a plain `Int64`
/// one, without nulls.
fn ts_values<'b>(batch: &'b RecordBatch, path: &Path) -> Result<&'b [i64]> {
    let ts_col = batch
        .column_by_name("ts")
        .ok_or_else(|| schema_err(path, "missing ts"))?;
    if ts_col.null_count() > 0 {
        return Err(schema_err(path, "ts has nulls"));
    }
    match ts_col.data_type() {
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            Ok(ts_col.as_primitive::<TimestampMillisecondType>().values())
        }
        DataType::Int64 => Ok(ts_col.as_primitive::<Int64Type>().values()),
        _ => Err(schema_err(path, "ts is not Timestamp(ms)")),
    }
}

/// The `referrer` dictionary keys of `batch` and their validity (a null is "no referrer"); its
/// dictionary becomes `src`'s current one.
fn referrer_keys<'b>(
    batch: &'b RecordBatch,
    src: &mut SourceKeys,
    path: &Path,
) -> Result<(&'b [i32], Option<&'b NullBuffer>)> {
    let c = batch
        .column_by_name("referrer")
        .ok_or_else(|| schema_err(path, "missing referrer"))?;
    let d = c
        .as_any()
        .downcast_ref::<DictionaryArray<Int32Type>>()
        .ok_or_else(|| schema_err(path, "referrer is not a string column"))?;
    let values = d
        .values()
        .as_any()
        .downcast_ref::<StringArray>()
        .ok_or_else(|| schema_err(path, "referrer dictionary values are not Utf8"))?;
    src.set_dict(values);
    Ok((d.keys().values(), d.keys().nulls()))
}

/// Splits `buf` into consecutive mutable slices of the given lengths.
fn split_segments<'a, T>(mut buf: &'a mut [T], offsets: &[usize]) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(offsets.len().saturating_sub(1));
    for w in offsets.windows(2) {
        let (a, b) = std::mem::take(&mut buf).split_at_mut(w[1] - w[0]);
        out.push(a);
        buf = b;
    }
    out
}

/// One URL's visitors from its `(biased cell, hash)` pairs: per cell its distinct hashes, per
/// UTC day their union as a sketch.
#[derive(Default)]
struct UrlVisitors {
    /// Cells with visitors, ascending; cell `j` has `hashes[ends[j - 1]..ends[j]]`.
    cells: Vec<i64>,
    ends: Vec<u32>,
    hashes: Vec<u32>,
    days: Vec<(i64, VisitorSketch)>,
}

impl UrlVisitors {
    fn of(seg: &mut [(u32, u32)], precision: u8) -> UrlVisitors {
        // A stable sort merges the sorted runs it finds: each cached file partial gives one.
        seg.sort();
        // Sized up front: growing these by doubling was a tenth of a cached run's merge.
        let mut v = UrlVisitors {
            hashes: Vec::with_capacity(seg.len()),
            ..Default::default()
        };
        for (i, &(c, h)) in seg.iter().enumerate() {
            if i > 0 && seg[i - 1] == (c, h) {
                continue;
            }
            if i == 0 || seg[i - 1].0 != c {
                v.cells.push(unbias(c));
                v.ends.push(v.hashes.len() as u32);
            }
            v.hashes.push(h);
            // The cell's end so far.
            *v.ends.last_mut().expect("a cell was pushed") += 1;
        }
        let mut j = 0;
        while j < v.cells.len() {
            let day = v.cells[j].div_euclid(CELLS_PER_DAY);
            let k = j + v.cells[j..].partition_point(|c| c.div_euclid(CELLS_PER_DAY) == day);
            let (a, b) = (v.start(j), v.ends[k - 1] as usize);
            let mut hashes = v.hashes[a..b].to_vec();
            if k - j > 1 {
                hashes.sort();
                hashes.dedup();
            }
            v.days
                .push((day, VisitorSketch::from_sorted_distinct(precision, hashes)));
            j = k;
        }
        v
    }

    fn start(&self, j: usize) -> usize {
        match j {
            0 => 0,
            _ => self.ends[j - 1] as usize,
        }
    }

    /// The distinct visitors of the `j`-th cell.
    fn cell(&self, j: usize) -> &[u32] {
        &self.hashes[self.start(j)..self.ends[j] as usize]
    }
}

/// (key, cell) and (key, cell, visitor) entries merged per step: the merge holds one step's
/// entries decoded, besides the encoded partials and the view it builds.
const MERGE_STEP_ENTRIES: usize = 1 << 24;

/// Entries of partials are checked when encoded or loaded ([`Encoded::parse`]).
const CHECKED: &str = "a partial's entries were checked when it was made or loaded";

/// One section (cells or visitors) of one partial, read in order a key range at a time.
struct Stream<'a> {
    entries: Entries<'a>,
    left: usize,
    peeked: Option<(u64, u64)>,
}

impl<'a> Stream<'a> {
    fn new(entries: Entries<'a>, len: usize) -> Stream<'a> {
        Stream {
            entries,
            left: len,
            peeked: None,
        }
    }

    fn peek(&mut self) -> Option<(u64, u64)> {
        if self.peeked.is_none() && self.left > 0 {
            self.left -= 1;
            self.peeked = Some(self.entries.next_entry().expect(CHECKED));
        }
        self.peeked
    }

    /// Appends the entries of keys ranked below `r1` (and at or above `r0`: those below were
    /// taken by earlier steps) as `(rank - r0, biased cell, value)`. A partial's keys are
    /// ascending, so its ranks are too, and its entries are sorted by key.
    fn take_below(&mut self, l2r: &[u32], r0: u32, r1: u32, out: &mut Vec<(u32, u32, u64)>) {
        while let Some((k, v)) = self.peek() {
            let r = l2r[(k >> 32) as usize];
            if r >= r1 {
                break;
            }
            out.push((r - r0, k as u32, v));
            self.peeked = None;
        }
    }
}

/// The entries of one merge step, sorted by rank: segment `i` of the result holds rank
/// `r0 + i`'s `(biased cell, value)` pairs, one sorted run per partial that has the key.
fn gather<V: Copy + Default + Send>(
    streams: &mut [(Stream<'_>, &[u32])],
    r0: u32,
    r1: u32,
    value: fn(u64) -> V,
) -> (Vec<usize>, Vec<(u32, V)>) {
    let runs: Vec<Vec<(u32, u32, u64)>> = streams
        .par_iter_mut()
        .map(|(s, l2r)| {
            let mut run = Vec::new();
            s.take_below(l2r, r0, r1, &mut run);
            run
        })
        .collect();
    let n = (r1 - r0) as usize;
    let mut offsets = vec![0usize; n + 1];
    for run in &runs {
        for e in run {
            offsets[e.0 as usize + 1] += 1;
        }
    }
    for i in 0..n {
        offsets[i + 1] += offsets[i];
    }
    let mut buf: Vec<(u32, V)> = vec![(0, V::default()); offsets[n]];
    let mut pos = offsets.clone();
    for run in runs {
        for (r, c, v) in run {
            buf[pos[r as usize]] = (c, value(v));
            pos[r as usize] += 1;
        }
    }
    (offsets, buf)
}

/// A partial's keys: key `i` is `values[ends[i - 1]..ends[i]]` (from 0 for the first), and
/// its table shard.
struct DecodedKeys {
    values: String,
    ends: Vec<usize>,
    shard: Vec<u8>,
}

fn decode_keys(p: &Encoded, shards: usize) -> DecodedKeys {
    let mut keys = p.keys();
    let mut values = Vec::new();
    let mut ends = Vec::with_capacity(p.nkeys);
    for _ in 0..p.nkeys {
        values.extend_from_slice(keys.next_key().expect(CHECKED));
        ends.push(values.len());
    }
    // Each key is UTF-8 on its own (checked), so every end is a character boundary.
    let values = String::from_utf8(values).expect(CHECKED);
    let mut start = 0;
    let shard = ends
        .iter()
        .map(|&end| {
            let key = &values[start..end];
            start = end;
            // Bits the shard's own table uses neither for its bucket nor its control byte.
            ((FastState.hash_one(key) >> 40) % shards as u64) as u8
        })
        .collect();
    DecodedKeys {
        values,
        ends,
        shard,
    }
}

/// The distinct keys of `parts`, ascending, and per partial the rank of each of its keys.
///
/// Linear in the keys of all partials (a k-way merge of their sorted lists compared strings
/// Σ keys × log(partials) times): a few partials at a time are decoded in parallel, then
/// entered into a table split in one shard per thread, each filled by its own thread; the
/// distinct keys are sorted once at the end.
fn rank_keys(parts: &[Encoded]) -> (Vec<String>, Vec<Vec<u32>>) {
    let nshards = rayon::current_num_threads().clamp(1, 64);
    let total_keys: usize = parts.iter().map(|p| p.nkeys).sum();
    let mut shards: Vec<FastMap<Box<str>, u32>> = (0..nshards)
        .map(|_| {
            FastMap::with_capacity_and_hasher(
                (total_keys / nshards).min(1 << 21),
                Default::default(),
            )
        })
        .collect();
    // Per partial, per key: (shard << 32 | id in the shard), then the rank.
    let mut ids: Vec<Vec<u64>> = Vec::with_capacity(parts.len());
    for batch in parts.chunks(nshards * 2) {
        let decoded: Vec<DecodedKeys> = batch.par_iter().map(|p| decode_keys(p, nshards)).collect();
        let found: Vec<Vec<(u32, u32, u32)>> = shards
            .par_iter_mut()
            .enumerate()
            .map(|(s, table)| {
                let mut found = Vec::new();
                for (pi, d) in decoded.iter().enumerate() {
                    let mut start = 0;
                    for (j, &end) in d.ends.iter().enumerate() {
                        let key = &d.values[start..end];
                        start = end;
                        if d.shard[j] as usize != s {
                            continue;
                        }
                        let id = match table.get(key) {
                            Some(&id) => id,
                            None => {
                                let id = table.len() as u32;
                                table.insert(Box::from(key), id);
                                id
                            }
                        };
                        found.push((pi as u32, j as u32, id));
                    }
                }
                found
            })
            .collect();
        let first = ids.len();
        ids.extend(decoded.iter().map(|d| vec![0u64; d.ends.len()]));
        for (s, found) in found.into_iter().enumerate() {
            for (pi, j, id) in found {
                ids[first + pi as usize][j as usize] = ((s as u64) << 32) | u64::from(id);
            }
        }
    }
    // Each shard's ids are 0..its length: one rank slot per id.
    let mut rank_of: Vec<Vec<u32>> = shards.iter().map(|t| vec![0; t.len()]).collect();
    let mut distinct: Vec<(Box<str>, u64)> =
        Vec::with_capacity(shards.iter().map(|t| t.len()).sum());
    for (s, table) in shards.into_iter().enumerate() {
        distinct.extend(
            table
                .into_iter()
                .map(|(k, id)| (k, ((s as u64) << 32) | u64::from(id))),
        );
    }
    distinct.par_sort_unstable_by(|a, b| a.0.cmp(&b.0));
    for (r, (_, id)) in distinct.iter().enumerate() {
        rank_of[(id >> 32) as usize][*id as u32 as usize] = r as u32;
    }
    let l2r = ids
        .into_par_iter()
        .map(|local| {
            local
                .into_iter()
                .map(|id| rank_of[(id >> 32) as usize][id as u32 as usize])
                .collect()
        })
        .collect();
    let urls = distinct.into_iter().map(|(k, _)| k.into_string()).collect();
    (urls, l2r)
}

/// Merges the partials of every file into the view: keys ranked once, then the entries a range
/// of ranks at a time, each range by a counting sort on the rank (no string work per entry)
/// and a sort per key of its few runs, in parallel.
fn merge(parts: Vec<Encoded>, sketch_precision: Option<u8>, step_entries: usize) -> ViewData {
    let (stats, events) = merge_stats(&parts);
    // 1. Global key ranks: every partial's keys into one table of the distinct keys, then
    //    those sorted once ([`rank_keys`]).
    let t_ranks = Instant::now();
    let (urls, l2r) = rank_keys(&parts);
    tracing::debug!(
        keys = urls.len(),
        ms = ms(t_ranks),
        "batch merge: keys ranked"
    );
    let nurls = urls.len();

    // 2. A range of ranks at a time, sized so that a step decodes about `step_entries` entries:
    //    each partial's entries of the range are one contiguous run of it.
    let per_step = ranks_per_step(&parts, nurls, step_entries);
    let mut cells: Vec<(Stream, &[u32])> = parts
        .iter()
        .zip(&l2r)
        .map(|(p, l)| (Stream::new(p.cells(), p.ncells), l.as_slice()))
        .collect();
    let mut visitors: Vec<(Stream, &[u32])> = parts
        .iter()
        .zip(&l2r)
        .map(|(p, l)| (Stream::new(p.visitors(), p.nvisitors), l.as_slice()))
        .collect();
    let mut out = MergedView::new(nurls, sketch_precision);
    let mut r0 = 0;
    while r0 < nurls {
        let r1 = (r0 + per_step).min(nurls);
        // 3. The range's cells, then 4. its visitors (aligned on those cells).
        out.add_cells(&mut cells, r0, r1);
        out.add_visitors(&mut visitors, r0, r1);
        r0 = r1;
    }
    drop(cells);
    drop(visitors);
    drop(parts);

    ViewData {
        urls,
        offsets: out.offsets,
        cell: out.cell,
        views: out.views,
        sketches: out.sketches,
        sources: None,
        events,
        stats,
    }
}

/// The stats the partials carry from their scans (summed), and their events.
fn merge_stats(parts: &[Encoded]) -> (ComputeStats, u64) {
    let mut stats = ComputeStats::default();
    let mut events = 0u64;
    for p in parts {
        stats.rows_read += p.rows;
        stats.url_dictionaries += p.dictionaries;
        stats.read_decode_cpu_ms += p.decode_ns as f64 / 1e6;
        stats.aggregate_cpu_ms += p.agg_ns as f64 / 1e6;
        events += p.events;
    }
    (stats, events)
}

/// Key ranks per merge step, so that a step decodes about `step_entries` (key, cell) and
/// (key, cell, visitor) entries of `parts` (`nurls` distinct keys); at least one.
fn ranks_per_step(parts: &[Encoded], nurls: usize, step_entries: usize) -> usize {
    let entries: usize = parts.iter().map(|p| p.ncells + p.nvisitors).sum();
    let steps = entries.div_ceil(step_entries.max(1)).max(1);
    nurls.div_ceil(steps).max(1)
}

/// The view a merge builds, a range of ranks at a time: the columns of [`ViewData`], with the
/// keys of ranks below the next range done. `offsets` has one entry per done key and one more.
struct MergedView {
    cell: Vec<i64>,
    views: Vec<u64>,
    offsets: Vec<usize>,
    sketches: Option<SketchData>,
}

impl MergedView {
    fn new(nurls: usize, sketch_precision: Option<u8>) -> MergedView {
        let mut offsets = Vec::with_capacity(nurls + 1);
        offsets.push(0);
        let sketches = sketch_precision.map(|p| {
            let mut sd = SketchData::empty(p, 0, 0);
            sd.offsets.reserve_exact(nurls);
            sd
        });
        MergedView {
            cell: Vec::new(),
            views: Vec::new(),
            offsets,
            sketches,
        }
    }

    /// Adds the cells of the keys ranked `r0..r1` (the next ones): per key, its runs sorted by
    /// cell (a stable sort merges them) and the counts of a cell added.
    fn add_cells(&mut self, streams: &mut [(Stream<'_>, &[u32])], r0: usize, r1: usize) {
        let (offsets, mut buf) = gather(streams, r0 as u32, r1 as u32, |c| c);
        let lens: Vec<usize> = split_segments(&mut buf, &offsets)
            .into_par_iter()
            .map(add_up_cells)
            .collect();
        let added: usize = lens.iter().sum();
        self.cell.reserve(added);
        self.views.reserve(added);
        for (u, &len) in lens.iter().enumerate() {
            for &(h, c) in &buf[offsets[u]..offsets[u] + len] {
                self.cell.push(unbias(h));
                self.views.push(c);
            }
            self.offsets.push(self.cell.len());
        }
    }

    /// Adds the visitors of the keys ranked `r0..r1`, whose cells [`MergedView::add_cells`]
    /// has just added (nothing without sketches): per key sorted by (cell, hash), the distinct
    /// visitors of each cell, and of each day (the union of its cells) as a sketch.
    fn add_visitors(&mut self, streams: &mut [(Stream<'_>, &[u32])], r0: usize, r1: usize) {
        let Some(sd) = self.sketches.as_mut() else {
            return;
        };
        let precision = sd.precision;
        // A visitor entry's value is its 32-bit hash.
        let (soff, mut sbuf) = gather(streams, r0 as u32, r1 as u32, |h| h as u32);
        let per_url: Vec<UrlVisitors> = split_segments(&mut sbuf, &soff)
            .into_par_iter()
            .map(|seg| UrlVisitors::of(seg, precision))
            .collect();
        drop(sbuf);
        let days: usize = per_url.iter().map(|v| v.days.len()).sum();
        sd.days.reserve(days);
        sd.sketches.reserve(days);
        sd.cell_hashes
            .reserve(per_url.iter().map(|v| v.hashes.len()).sum());
        // The range's cells start where the done keys' cells ended.
        sd.cell_offsets.reserve(self.cell.len() - self.offsets[r0]);
        for (i, v) in per_url.into_iter().enumerate() {
            let u = r0 + i;
            add_key_visitors(sd, v, &self.cell[self.offsets[u]..self.offsets[u + 1]]);
        }
    }
}

/// Sorts one key's cell runs by cell (stable: a merge of the sorted runs) and adds up the counts
/// of equal cells in place, the distinct cells first: returns how many there are.
fn add_up_cells(seg: &mut [(u32, u64)]) -> usize {
    seg.sort_by_key(|c| c.0);
    let mut w = 0;
    for r in 0..seg.len() {
        if w > 0 && seg[w - 1].0 == seg[r].0 {
            seg[w - 1].1 += seg[r].1;
        } else {
            seg[w] = seg[r];
            w += 1;
        }
    }
    w
}

/// Appends one key's visitors to `sd`: its day sketches, and per cell of `cells` (the key's
/// counted cells) its distinct visitors, none for a cell without any.
fn add_key_visitors(sd: &mut SketchData, mut v: UrlVisitors, cells: &[i64]) {
    for (d, s) in std::mem::take(&mut v.days) {
        sd.days.push(d);
        sd.sketches.push(s);
    }
    sd.offsets.push(sd.days.len());
    // A key's visitor cells are among its counted cells (the same events): align.
    let mut j = 0;
    for &c in cells {
        if v.cells.get(j) == Some(&c) {
            sd.cell_hashes.extend_from_slice(v.cell(j));
            j += 1;
        }
        sd.cell_offsets.push(sd.cell_hashes.len() as u32);
    }
}

/// One master file's row-group partials as one canonical partial: one dictionary of its keys
/// in ascending order, cells sorted with their counts added, visitor pairs sorted and distinct
/// (what [`crate::partials`] stores, and what `merge` takes like any row group's partial).
fn merge_file(parts: Vec<Partial>) -> Partial {
    let mut names: Vec<(&str, u32, u32)> = Vec::new();
    for (pi, p) in parts.iter().enumerate() {
        for lid in 0..p.urls.len() {
            names.push((p.url(lid), pi as u32, lid as u32));
        }
    }
    names.sort_unstable();
    let mut remap: Vec<Vec<u32>> = parts.iter().map(|p| vec![0; p.urls.len()]).collect();
    let mut keys: Vec<&str> = Vec::new();
    for &(name, pi, lid) in &names {
        if keys.last() != Some(&name) {
            keys.push(name);
        }
        remap[pi as usize][lid as usize] = (keys.len() - 1) as u32;
    }
    let re =
        |pi: usize, k: u64| (u64::from(remap[pi][(k >> 32) as usize]) << 32) | (k & 0xffff_ffff);
    let mut cells: Vec<(u64, u64)> = Vec::with_capacity(parts.iter().map(|p| p.cells.len()).sum());
    let mut visitors: Vec<(u64, u32)> =
        Vec::with_capacity(parts.iter().map(|p| p.visitors.len()).sum());
    for (pi, p) in parts.iter().enumerate() {
        cells.extend(p.cells.iter().map(|&(k, c)| (re(pi, k), c)));
        visitors.extend(p.visitors.iter().map(|&(k, h)| (re(pi, k), h)));
    }
    cells.sort_unstable_by_key(|c| c.0);
    tally_core::sum_runs(&mut cells);
    visitors.sort_unstable();
    visitors.dedup();
    let nkeys = keys.len() as u32;
    let mut out = Partial {
        dicts: vec![StringArray::from_iter_values(keys)],
        urls: (0..nkeys).map(|i| (0, i)).collect(),
        cells,
        visitors,
        ..Default::default()
    };
    for p in &parts {
        out.rows += p.rows;
        out.events += p.events;
        out.dictionaries += p.dictionaries;
        out.decode_ns += p.decode_ns;
        out.agg_ns += p.agg_ns;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_testing::{write_master_file, MasterRow, Rng};

    /// A (key, cell) whose views pass 2^32 across files keeps every one of them.
    #[test]
    fn counts_past_two_to_the_32_add_up_across_partials() {
        let big = u64::from(u32::MAX);
        let part = |n: u64| Partial {
            dicts: vec![StringArray::from_iter_values(["a.com/"])],
            urls: vec![(0, 0)],
            cells: vec![(u64::from(bias(7).unwrap()), n)],
            events: n,
            ..Default::default()
        };
        let a = Encoded::new(&part(big), Keying::Url, false);
        let b = Encoded::new(&part(big + 5), Keying::Url, false);
        let b = Encoded::parse(b.bytes().to_vec(), Keying::Url, false).unwrap();
        let v = merge(vec![a, b], None, MERGE_STEP_ENTRIES);
        assert_eq!(
            (v.cell.as_slice(), v.views.as_slice()),
            (&[7][..], &[2 * big + 5][..])
        );
        assert_eq!(v.events, 2 * big + 5);
    }

    /// The merge a key range at a time gives the view a one-step merge gives, whatever the step
    /// (down to one key per step), with cached partials and fresh ones.
    #[test]
    fn a_merge_in_many_steps_equals_one_in_a_single_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng::new(7);
        let mut files = Vec::new();
        for f in 0..4u64 {
            let rows = (0..500u64)
                .map(|i| MasterRow {
                    seq: f * 500 + i + 1,
                    ts: 1_760_000_000_000 + rng.below(5 * tally_core::DAY_MS as u64) as i64,
                    url: format!("https://s{}.example/p{}", rng.below(3), rng.below(60)),
                    visitor: (rng.below(4) != 0).then(|| format!("v{}", rng.below(300))),
                    referrer: (rng.below(2) == 0)
                        .then(|| format!("https://r{}.example/", rng.below(5))),
                })
                .collect();
            files.push(write_master_file(&dir.path().join("master"), rows, 128).unwrap());
        }
        let cutoff = Seq(1_900);
        let cache = PartialCache::open(&dir.path().join("partials"), false).unwrap();
        for keying in [Keying::Url, Keying::Source] {
            let run = |step, cache| {
                compute_keyed(
                    &files,
                    cutoff,
                    Some(12),
                    &Progress::new(),
                    keying,
                    cache,
                    step,
                )
                .unwrap()
            };
            let one = run(MERGE_STEP_ENTRIES, None);
            assert!(one.urls.len() > 20 && one.events == 1_900);
            for step in [1, 7, 100, 5_000] {
                for cache in [None, Some(&cache)] {
                    let many = run(step, cache);
                    assert_eq!(
                        (
                            &many.urls,
                            &many.offsets,
                            &many.cell,
                            &many.views,
                            &many.sketches
                        ),
                        (
                            &one.urls,
                            &one.offsets,
                            &one.cell,
                            &one.views,
                            &one.sketches
                        ),
                        "{keying:?}, step {step}, cached: {}",
                        cache.is_some()
                    );
                }
            }
        }
    }
}
