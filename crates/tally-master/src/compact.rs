//! Compaction: runs of small sealed files merged into one larger file.
//!
//! The sealer writes a file per closed WAL segment — every `ingest.seal_interval` under light
//! traffic, so a year holds hundreds of thousands of small files, and every reader (the batch
//! layer, a speed rebuild, DuckDB on the glob) pays per file. A pass finds runs of neighbouring
//! files (in `seq` order) smaller than `small_bytes`, at least `min_files` of them, their sizes
//! adding up to at most `target_bytes`, and for each run:
//!
//! 1. reads every event of the run's files and writes them as one file named by the run's whole
//!    range, `{first}-{last}.parquet` (rows sorted by (url, ts) as the sealer writes them):
//!    temporary name, fsync, rename, fsync of the directory — the merged file is durable;
//! 2. then, holding the files lock ([`crate::Master::pin_files`]) for writing, deletes the
//!    inputs.
//!
//! A reader never sees an event twice or misses one: a file whose range covers another's
//! supersedes it (`paths::drop_covered`, used by [`crate::list_master_files`]), so between 1
//! and 2 every listing leaves the inputs out, and a snapshot taken under the files lock keeps
//! its files until it is released.
//! `kill -9` at any point leaves either a temporary file (deleted at the next open) and the
//! inputs, or the merged file and some inputs (covered, so never read, and deleted by the next
//! pass). The merged file's name keeps the largest `last`, so `seq` still never goes back.
//! DuckDB and other tools that read the glob directly see the inputs and the merged file at once
//! only between steps 1 and 2 (milliseconds), and after a crash there until the next pass.

use std::fs;
use std::path::Path;

use tally_core::Seq;

use crate::paths::{drop_covered, fsync_dir, io_err, list_all_master_files, master_file_name};
use crate::{parquet_io, MasterFile, Result, SeqEvent};

/// When files are merged (config `storage.compact_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactConfig {
    /// Files smaller than this are merged with their small neighbours.
    pub small_bytes: u64,
    /// A merged file's inputs add up to at most this many bytes (it bounds the memory a
    /// merge takes: about ten times this).
    pub target_bytes: u64,
    /// Fewer small neighbours than this are left alone.
    pub min_files: usize,
    /// `storage.retention`: events older than this are dropped from the master dataset by
    /// each pass (`None`: kept forever).
    pub retention: Option<std::time::Duration>,
}

impl Default for CompactConfig {
    fn default() -> Self {
        CompactConfig {
            small_bytes: 8 << 20,
            target_bytes: 64 << 20,
            min_files: 4,
            retention: None,
        }
    }
}

/// What one compaction pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactOutcome {
    /// Merged files written.
    pub merged: usize,
    /// Input files the merged files replaced.
    pub inputs: usize,
    /// Events rewritten.
    pub events: u64,
    /// Files deleted because a merged file covered them (left by an interrupted pass).
    pub covered_deleted: usize,
    /// Events dropped because they were older than the retention.
    pub expired: u64,
}

/// Runs of neighbouring small files worth merging, in `seq` order.
pub(crate) fn plan(files: &[MasterFile], cfg: &CompactConfig) -> Vec<Vec<MasterFile>> {
    let mut groups = Vec::new();
    let mut run: Vec<MasterFile> = Vec::new();
    let mut bytes = 0u64;
    let close = |run: &mut Vec<MasterFile>, groups: &mut Vec<Vec<MasterFile>>| {
        if run.len() >= cfg.min_files.max(2) {
            groups.push(std::mem::take(run));
        } else {
            run.clear();
        }
    };
    for f in files {
        if f.size >= cfg.small_bytes {
            close(&mut run, &mut groups);
            bytes = 0;
            continue;
        }
        if !run.is_empty() && bytes + f.size > cfg.target_bytes {
            close(&mut run, &mut groups);
            bytes = 0;
        }
        bytes += f.size;
        run.push(f.clone());
    }
    close(&mut run, &mut groups);
    groups
}

/// The files a merged file covers (left by an interrupted pass): every file not in the
/// covering listing.
pub(crate) fn covered(master_dir: &Path) -> Result<Vec<MasterFile>> {
    let all = list_all_master_files(master_dir)?;
    let live = drop_covered(all.clone());
    Ok(all
        .into_iter()
        .filter(|f| !live.iter().any(|l| l.path == f.path))
        .collect())
}

/// Step 1 for one run: writes the merged file, durably. Returns it and its event count.
pub(crate) fn write_merged(
    master_dir: &Path,
    run: &[MasterFile],
    fsync: bool,
) -> Result<(MasterFile, u64)> {
    let first = run.first().map_or(Seq::ZERO, |f| f.first);
    let last = run.last().map_or(Seq::ZERO, |f| f.last);
    let mut events = Vec::new();
    for f in run {
        events.extend(parquet_io::read_master_file(&f.path)?);
    }
    let n = events.len() as u64;
    let path = master_dir.join(master_file_name(first, last));
    let size = parquet_io::write_parquet_atomic(&path, &events, fsync)?;
    Ok((
        MasterFile {
            path,
            first,
            last,
            size,
        },
        n,
    ))
}

/// Step 2: deletes `files` (covered by a durable merged file). Call with the files lock held
/// for writing.
pub(crate) fn delete(master_dir: &Path, files: &[MasterFile], fsync: bool) -> Result<()> {
    for f in files {
        match fs::remove_file(&f.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&f.path)(e)),
        }
    }
    if fsync && !files.is_empty() {
        fsync_dir(master_dir)?;
    }
    Ok(())
}

/// Which events a rewrite drops: a deletion request (`tally master forget`) or the retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forget {
    /// Events whose (normalised) URL starts with this.
    UrlPrefix(String),
    /// Events of this visitor id.
    Visitor(String),
    /// Events with `ts` before this (ms since the epoch): `storage.retention`.
    Before(i64),
}

impl Forget {
    /// A deletion request for the URLs starting with `prefix`; refused unless it names a scheme
    /// and a host, as URLs are stored (a shorter prefix would match every URL).
    pub fn url_prefix(prefix: &str) -> std::result::Result<Forget, &'static str> {
        let rest = prefix
            .strip_prefix("https://")
            .or_else(|| prefix.strip_prefix("http://"));
        match rest {
            Some(host) if !host.is_empty() => Ok(Forget::UrlPrefix(prefix.to_string())),
            _ => Err(
                "url_prefix must start with http:// or https:// and a host, as URLs are stored.",
            ),
        }
    }

    /// A deletion request for one visitor id.
    pub fn visitor(id: &str) -> std::result::Result<Forget, &'static str> {
        match id {
            "" => Err("visitor must not be empty."),
            v => Ok(Forget::Visitor(v.to_string())),
        }
    }

    /// One line a log message carries (cluster mode: a deletion request every node applies);
    /// [`Forget::decode`] reads it back. Retention is each node's own, never sent.
    pub fn encode(&self) -> Option<String> {
        match self {
            Forget::UrlPrefix(p) => Some(format!("url_prefix\n{p}")),
            Forget::Visitor(v) => Some(format!("visitor\n{v}")),
            Forget::Before(_) => None,
        }
    }

    /// [`Forget::encode`]'s line back, checked as a request is.
    pub fn decode(text: &str) -> Option<Forget> {
        match text.split_once('\n')? {
            ("url_prefix", p) => Forget::url_prefix(p).ok(),
            ("visitor", v) => Forget::visitor(v).ok(),
            _ => None,
        }
    }

    pub fn matches(&self, e: &SeqEvent) -> bool {
        match self {
            Forget::UrlPrefix(p) => e.event.url.starts_with(p.as_str()),
            Forget::Visitor(v) => e.event.visitor.as_deref() == Some(v.as_str()),
            Forget::Before(t) => e.event.ts < *t,
        }
    }
}

/// The smallest `ts` of a master file, from its footer's statistics (`None`: no rows or no
/// statistics, so the file must be read to know).
pub(crate) fn min_ts(path: &Path) -> Result<Option<i64>> {
    use parquet::file::reader::FileReader;
    use parquet::file::statistics::Statistics;
    let f = fs::File::open(path).map_err(io_err(path))?;
    let reader = parquet::file::serialized_reader::SerializedFileReader::new(f).map_err(|e| {
        crate::Error::Parquet {
            path: path.to_path_buf(),
            source: Box::new(e),
        }
    })?;
    let meta = reader.metadata();
    let Some(col) = meta
        .file_metadata()
        .schema_descr()
        .columns()
        .iter()
        .position(|c| c.name() == "ts")
    else {
        return Ok(None);
    };
    let mut min: Option<i64> = None;
    for rg in meta.row_groups() {
        match rg.column(col).statistics() {
            Some(Statistics::Int64(s)) => match s.min_opt() {
                Some(&m) => min = Some(min.map_or(m, |x: i64| x.min(m))),
                None => return Ok(None),
            },
            _ => return Ok(None),
        }
    }
    Ok(min)
}

/// Rewrites `file` without the events `forget` matches, under the same name (its `seq` range
/// still bounds what it holds; a file left empty stays, so that the largest name is kept):
/// temporary file, fsync, rename over the old one, fsync of the directory. Call with the files
/// lock held for writing. Returns the events dropped (0: the file was left untouched).
pub(crate) fn rewrite_without(
    file: &MasterFile,
    forget: &Forget,
    through: Seq,
    fsync: bool,
) -> Result<u64> {
    let events = parquet_io::read_master_file(&file.path)?;
    let before = events.len();
    let kept: Vec<SeqEvent> = events
        .into_iter()
        .filter(|e| e.seq > through || !forget.matches(e))
        .collect();
    let dropped = (before - kept.len()) as u64;
    if dropped > 0 {
        parquet_io::write_parquet_atomic(&file.path, &kept, fsync)?;
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn f(first: u64, last: u64, size: u64) -> MasterFile {
        MasterFile {
            path: PathBuf::from(master_file_name(Seq(first), Seq(last))),
            first: Seq(first),
            last: Seq(last),
            size,
        }
    }

    fn ranges(groups: &[Vec<MasterFile>]) -> Vec<(u64, u64, usize)> {
        groups
            .iter()
            .map(|g| (g[0].first.0, g[g.len() - 1].last.0, g.len()))
            .collect()
    }

    #[test]
    fn runs_of_small_neighbours_up_to_the_target_are_merged() {
        let cfg = CompactConfig {
            small_bytes: 10,
            target_bytes: 20,
            min_files: 3,
            retention: None,
        };
        let files = vec![
            f(1, 1, 5),
            f(2, 2, 5),
            f(3, 3, 5),
            f(4, 4, 5),
            f(5, 5, 5),  // the fifth would pass 20 bytes: a new run
            f(6, 6, 50), // large: ends the run (1 file, left alone)
            f(7, 7, 1),
            f(8, 8, 1), // 2 files: fewer than min_files
            f(9, 9, 99),
            f(10, 10, 1),
            f(11, 11, 1),
            f(12, 12, 1),
        ];
        assert_eq!(ranges(&plan(&files, &cfg)), vec![(1, 4, 4), (10, 12, 3)]);
        assert!(plan(
            &files[..3],
            &CompactConfig {
                min_files: 4,
                ..cfg
            }
        )
        .is_empty());
    }
}
