//! Where each kind of file lives under `data_dir`, how it is named and parsed.
//!
//! Sequence numbers are zero-padded to 20 digits so that listing order is sequence order.

use std::fs;
use std::path::{Path, PathBuf};

use tally_core::Seq;

use crate::{Error, MasterFile, Result};

/// Directory of the WAL segments.
pub const WAL_DIR: &str = "wal";
/// Directory of the master dataset (sealed Parquet files).
pub const MASTER_DIR: &str = "master";
/// Durable list of speed-layer epoch starts.
pub const EPOCHS_FILE: &str = "epochs.json";
/// Suffix of every temporary file; never matches `**/*.parquet`.
pub(crate) const TMP_SUFFIX: &str = ".tmp";

const WAL_EXT: &str = ".wal";
const PARQUET_EXT: &str = ".parquet";

/// The directories and files of one `data_dir`.
#[derive(Debug, Clone)]
pub(crate) struct DataPaths {
    pub(crate) root: PathBuf,
    pub(crate) wal: PathBuf,
    pub(crate) master: PathBuf,
    pub(crate) epochs: PathBuf,
}

impl DataPaths {
    pub(crate) fn new(root: &Path) -> DataPaths {
        DataPaths {
            root: root.to_path_buf(),
            wal: root.join(WAL_DIR),
            master: root.join(MASTER_DIR),
            epochs: root.join(EPOCHS_FILE),
        }
    }

    pub(crate) fn create_dirs(&self) -> Result<()> {
        for d in [&self.root, &self.wal, &self.master] {
            fs::create_dir_all(d).map_err(io_err(d))?;
        }
        Ok(())
    }
}

/// A WAL segment file: `wal/{first_seq:020}.wal`, where `first_seq` is the first `seq` the
/// segment holds (or will hold, while it is empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentPath {
    pub(crate) first: Seq,
    pub(crate) path: PathBuf,
}

impl SegmentPath {
    pub(crate) fn new(wal_dir: &Path, first: Seq) -> SegmentPath {
        SegmentPath {
            first,
            path: wal_dir.join(format!("{}{WAL_EXT}", first.padded())),
        }
    }

    pub(crate) fn parse(wal_dir: &Path, name: &str) -> Option<SegmentPath> {
        let stem = name.strip_suffix(WAL_EXT)?;
        Seq::parse_padded(stem).map(|first| SegmentPath::new(wal_dir, first))
    }
}

/// The file name of a sealed master file holding `first..=last`.
pub fn master_file_name(first: Seq, last: Seq) -> String {
    format!("{}-{}{PARQUET_EXT}", first.padded(), last.padded())
}

/// Parses a name written by [`master_file_name`].
pub fn parse_master_file_name(name: &str) -> Option<(Seq, Seq)> {
    let stem = name.strip_suffix(PARQUET_EXT)?;
    let (a, b) = stem.split_once('-')?;
    let (first, last) = (Seq::parse_padded(a)?, Seq::parse_padded(b)?);
    (first <= last).then_some((first, last))
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// fsyncs a directory so that a rename or create/delete in it is durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    let f = fs::File::open(dir).map_err(io_err(dir))?;
    f.sync_all().map_err(io_err(dir))
}

/// The WAL segments in `wal_dir`, ascending by first seq.
pub(crate) fn list_segments(wal_dir: &Path) -> Result<Vec<SegmentPath>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(wal_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(wal_dir)(e)),
    };
    for entry in rd {
        let entry = entry.map_err(io_err(wal_dir))?;
        if let Some(name) = entry.file_name().to_str() {
            if let Some(seg) = SegmentPath::parse(wal_dir, name) {
                out.push(seg);
            }
        }
    }
    out.sort_by_key(|s| s.first);
    Ok(out)
}

/// Every `*.parquet` file under `master_dir` (recursively) whose name parses, covered or not.
pub(crate) fn list_all_master_files(master_dir: &Path) -> Result<Vec<MasterFile>> {
    let mut out = Vec::new();
    walk(master_dir, &mut |path, name, size| {
        if let Some((first, last)) = parse_master_file_name(name) {
            out.push(MasterFile {
                path: path.to_path_buf(),
                first,
                last,
                size,
            });
        }
    })?;
    out.sort_by(|a, b| a.first.cmp(&b.first).then(b.last.cmp(&a.last)));
    Ok(out)
}

/// Drops the files whose range is covered by another file's (a compacted file supersedes its
/// inputs). `files` must be sorted by `first` ascending, then `last` descending.
pub(crate) fn drop_covered(files: Vec<MasterFile>) -> Vec<MasterFile> {
    let mut out: Vec<MasterFile> = Vec::with_capacity(files.len());
    let mut max_last: Option<Seq> = None;
    for f in files {
        if max_last.is_some_and(|m| f.last <= m) {
            continue;
        }
        max_last = Some(f.last);
        out.push(f);
    }
    out
}

/// The sealed files of the master dataset under `data_dir` (files covered by a compacted file
/// left out), ordered by `first`. Works without an open [`crate::Master`] (e.g. the batch CLI
/// with the server stopped).
pub fn list_master_files(data_dir: &Path) -> Result<Vec<MasterFile>> {
    Ok(drop_covered(list_all_master_files(
        &data_dir.join(MASTER_DIR),
    )?))
}

/// Removes every `*.tmp` file under `dir` (recursively). Returns how many were removed.
pub(crate) fn sweep_tmp(dir: &Path) -> Result<usize> {
    let mut victims = Vec::new();
    walk(dir, &mut |path, name, _| {
        if name.ends_with(TMP_SUFFIX) {
            victims.push(path.to_path_buf());
        }
    })?;
    for v in &victims {
        match fs::remove_file(v) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(v)(e)),
        }
    }
    Ok(victims.len())
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path, &str, u64)) -> Result<()> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    for entry in rd {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let ft = entry.file_type().map_err(io_err(&path))?;
        if ft.is_dir() {
            walk(&path, f)?;
        } else if ft.is_file() {
            let size = match entry.metadata() {
                Ok(m) => m.len(),
                // Renamed or removed concurrently: skip it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path)(e)),
            };
            if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                f(&path, name, size);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let n = master_file_name(Seq(1), Seq(42));
        assert_eq!(n, "00000000000000000001-00000000000000000042.parquet");
        assert_eq!(parse_master_file_name(&n), Some((Seq(1), Seq(42))));
        assert_eq!(parse_master_file_name("x.parquet"), None);
        assert_eq!(parse_master_file_name(&format!("{n}.tmp")), None);
        let s = SegmentPath::new(Path::new("w"), Seq(7));
        assert_eq!(s.path, Path::new("w/00000000000000000007.wal"));
        assert_eq!(
            SegmentPath::parse(Path::new("w"), "00000000000000000007.wal"),
            Some(s)
        );
    }

    #[test]
    fn covered_files_are_left_out() {
        let f = |a, b| MasterFile {
            path: PathBuf::new(),
            first: Seq(a),
            last: Seq(b),
            size: 0,
        };
        let mut files = vec![f(1, 10), f(1, 30), f(11, 20), f(31, 40)];
        files.sort_by(|a, b| a.first.cmp(&b.first).then(b.last.cmp(&a.last)));
        let kept: Vec<_> = drop_covered(files)
            .iter()
            .map(|m| (m.first.0, m.last.0))
            .collect();
        assert_eq!(kept, vec![(1, 30), (31, 40)]);
    }
}
