//! The view store: `views/batch/<version>/` directories, each with `counts.parquet`, optionally
//! `sketches.parquet`, and `manifest.json` (the commit, written last); `views/batch/CURRENT`
//! names the serving version.
//!
//! Layout of a version directory:
//! - `counts.parquet`: `url` Utf8 (dictionary-encoded), `cell` Int64 (15-minute cells since the
//!   epoch, [`tally_core::CELL_MS`]), `views` UInt64; sorted by (url, cell); one row per
//!   non-zero cell; with sketches also `visitors` `List<UInt32>`, the cell's distinct
//!   [`crate::visitor_hash`]es, ascending (format 4 on: what uniques between local midnights
//!   that are not UTC midnights need). (Format 1 had hourly cells in a column `hour`; a view of
//!   an older format no longer loads, is discarded as not servable and recomputed.)
//! - `sketches.parquet` (when sketches were computed): `url` Utf8, `day` Int64 (days since the
//!   epoch, UTC), `sketch` Binary ([`crate::VisitorSketch::to_bytes`]); sorted by (url, day).
//! - `sources.parquet`, `source_sketches.parquet`: the same two layouts keyed by source key
//!   (`tally_core::dims::source_key`, `\x01{referrer host}\x01{url}`) instead of URL: the data
//!   of breakdowns (format 3 on; a format-2 view is discarded as not servable and recomputed).
//! - `manifest.json`: see [`Manifest`].
//! - `DISCARDED` (only after a discard): the reason; the data is kept for inspection.
//!
//! A version is written into `.tmp-<version>-<pid>`, every file and the directory fsynced, then
//! renamed into place and the parent fsynced. A directory without a valid manifest is garbage.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tally_core::Seq;

use crate::codec::{read_counts, read_sketches_of, write_counts, write_sketches};
use crate::error::{Error, Result};
use crate::kernel::ViewData;
use crate::view::BatchView;

pub const FORMAT_VERSION: u32 = 4;
pub const COUNTS_FILE: &str = "counts.parquet";
pub const SKETCHES_FILE: &str = "sketches.parquet";
pub const SOURCES_FILE: &str = "sources.parquet";
pub const SOURCE_SKETCHES_FILE: &str = "source_sketches.parquet";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const DISCARDED_FILE: &str = "DISCARDED";
pub const CURRENT_FILE: &str = "CURRENT";
const TMP_PREFIX: &str = ".tmp-";

/// One file of a version, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    pub name: String,
    pub size: u64,
    /// Hex BLAKE3 of the whole file.
    pub blake3: String,
}

/// `manifest.json`: the commit record of a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub version: String,
    pub cutoff_seq: Seq,
    pub events: u64,
    pub urls: u64,
    pub cells: u64,
    pub sketch_precision: Option<u8>,
    /// Source keys and their (key, cell) entries in `sources.parquet` (format 3 on).
    #[serde(default)]
    pub source_keys: u64,
    #[serde(default)]
    pub source_cells: u64,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub created_at_ms: i64,
    pub files: Vec<ManifestFile>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ViewStatus {
    /// A valid manifest and not discarded (checksums are checked by `verify`/`load`, not `list`).
    Good,
    Discarded,
    /// No valid manifest: garbage.
    Invalid,
}

/// A version as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewInfo {
    pub version: String,
    pub cutoff_seq: Seq,
    pub created_at: String,
    pub created_at_ms: i64,
    pub events: u64,
    pub urls: u64,
    pub size_bytes: u64,
    pub status: ViewStatus,
}

/// The name of a new version: `{cutoff:020}-{unix_ms:013}`, so that name order is cutoff order,
/// then creation order.
pub fn version_name(cutoff: Seq, unix_ms: i64) -> String {
    format!("{}-{:013}", cutoff.padded(), unix_ms.max(0))
}

/// Parses a version name into `(cutoff, unix_ms)`.
pub fn parse_version(name: &str) -> Option<(Seq, i64)> {
    let (a, b) = name.split_once('-')?;
    let cutoff = Seq::parse_padded(a)?;
    if b.len() != 13 || !b.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some((cutoff, b.parse().ok()?))
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// The batch view store under `data_dir/views/batch`.
#[derive(Debug, Clone)]
pub struct ViewStore {
    root: PathBuf,
}

impl ViewStore {
    /// Opens (creating it if needed) the store at `root` (normally `data_dir/views/batch`).
    pub fn open(root: impl Into<PathBuf>) -> Result<ViewStore> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
        Ok(ViewStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn version_dir(&self, version: &str) -> PathBuf {
        self.root.join(version)
    }

    /// Writes `data` as a new version (not yet CURRENT) and returns it.
    pub fn write(&self, data: &ViewData, cutoff: Seq, created_at_ms: i64) -> Result<ViewInfo> {
        let mut ms = created_at_ms;
        let mut version = version_name(cutoff, ms);
        while self.version_dir(&version).exists() {
            ms += 1;
            version = version_name(cutoff, ms);
        }
        let tmp = self
            .root
            .join(format!("{TMP_PREFIX}{version}-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let result = self.write_into(&tmp, &version, data, cutoff, ms);
        let manifest = match result {
            Ok(m) => m,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let dst = self.version_dir(&version);
        fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
        fsync_dir(&self.root)?;
        let size_bytes = manifest.files.iter().map(|f| f.size).sum::<u64>();
        tracing::info!(version = %version, cutoff_seq = cutoff.get(), events = data.events, urls = data.urls.len(), size_bytes, "batch view written");
        Ok(info_of(&manifest, size_bytes, ViewStatus::Good))
    }

    fn write_into(
        &self,
        dir: &Path,
        version: &str,
        data: &ViewData,
        cutoff: Seq,
        created_at_ms: i64,
    ) -> Result<Manifest> {
        let counts_path = dir.join(COUNTS_FILE);
        let sketch_path = dir.join(SKETCHES_FILE);
        let (counts, sketches) = rayon::join(
            || write_counts(&counts_path, data),
            || match &data.sketches {
                Some(s) if !s.days.is_empty() => {
                    write_sketches(&sketch_path, &data.urls, s).map(Some)
                }
                _ => Ok(None),
            },
        );
        let mut files = vec![counts?];
        files.extend(sketches?);
        let empty = ViewData {
            offsets: vec![0],
            ..Default::default()
        };
        let sources = data.sources.as_deref().unwrap_or(&empty);
        let (counts, sketches) = rayon::join(
            || write_counts(&dir.join(SOURCES_FILE), sources),
            || match &sources.sketches {
                Some(s) if !s.days.is_empty() => {
                    write_sketches(&dir.join(SOURCE_SKETCHES_FILE), &sources.urls, s).map(Some)
                }
                _ => Ok(None),
            },
        );
        files.push(counts?);
        files.extend(sketches?);
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            version: version.to_string(),
            cutoff_seq: cutoff,
            events: data.events,
            urls: data.urls.len() as u64,
            cells: data.cell.len() as u64,
            sketch_precision: data.sketches.as_ref().map(|s| s.precision),
            source_keys: sources.urls.len() as u64,
            source_cells: sources.cell.len() as u64,
            created_at: tally_core::format_rfc3339(created_at_ms),
            created_at_ms,
            files,
        };
        let mpath = dir.join(MANIFEST_FILE);
        let json =
            serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Internal(e.to_string()))?;
        write_file_synced(&mpath, &json)?;
        fsync_dir(dir)?;
        Ok(manifest)
    }

    /// Points `CURRENT` at `version` atomically (temp file, fsync, rename, fsync directory).
    pub fn set_current(&self, version: &str) -> Result<()> {
        let m = self.read_manifest(version)?;
        if self.is_discarded(version) {
            return Err(Error::Invalid(format!("version {version} is discarded")));
        }
        // Unique per call: two publishes/discards in one process must not share a temp file.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.root.join(format!(
            "{TMP_PREFIX}{CURRENT_FILE}-{}-{n}",
            std::process::id()
        ));
        write_file_synced(&tmp, format!("{}\n", m.version).as_bytes())?;
        let dst = self.root.join(CURRENT_FILE);
        fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
        fsync_dir(&self.root)?;
        tracing::info!(version, "batch view is current");
        Ok(())
    }

    /// The version `CURRENT` names, if any.
    pub fn current(&self) -> Result<Option<String>> {
        let p = self.root.join(CURRENT_FILE);
        match fs::read_to_string(&p) {
            Ok(s) => {
                let v = s.trim();
                Ok((!v.is_empty()).then(|| v.to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&p, e)),
        }
    }

    fn clear_current(&self) -> Result<()> {
        let p = self.root.join(CURRENT_FILE);
        match fs::remove_file(&p) {
            Ok(()) => fsync_dir(&self.root),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&p, e)),
        }
    }

    /// Reads and checks the manifest of `version` (missing or invalid: `Corrupt`).
    pub fn read_manifest(&self, version: &str) -> Result<Manifest> {
        let dir = self.version_dir(version);
        if !dir.is_dir() {
            return Err(Error::NoSuchVersion(version.to_string()));
        }
        let p = dir.join(MANIFEST_FILE);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::corrupt(&p, "manifest is missing"))
            }
            Err(e) => return Err(Error::io(&p, e)),
        };
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt(&p, format!("manifest is not valid: {e}")))?;
        if m.format_version != FORMAT_VERSION {
            return Err(Error::corrupt(
                &p,
                format!("unknown format_version {}", m.format_version),
            ));
        }
        if m.version != version {
            return Err(Error::corrupt(
                &p,
                format!("manifest names version {}", m.version),
            ));
        }
        if ![COUNTS_FILE, SOURCES_FILE]
            .iter()
            .all(|name| m.files.iter().any(|f| f.name == *name))
            || m.files
                .iter()
                .any(|f| f.name.contains(['/', '\\']) || f.name.starts_with('.'))
        {
            return Err(Error::corrupt(&p, "manifest file list is not valid"));
        }
        Ok(m)
    }

    /// Checks every file of `version` against the manifest (size and BLAKE3).
    pub fn verify(&self, version: &str) -> Result<Manifest> {
        let m = self.read_manifest(version)?;
        let dir = self.version_dir(version);
        for f in &m.files {
            let p = dir.join(&f.name);
            let mut file = match File::open(&p) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::corrupt(&p, "file is missing"))
                }
                Err(e) => return Err(Error::io(&p, e)),
            };
            let size = file.metadata().map_err(|e| Error::io(&p, e))?.len();
            if size != f.size {
                return Err(Error::corrupt(
                    &p,
                    format!("size is {size}, manifest says {}", f.size),
                ));
            }
            let mut h = blake3::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file.read(&mut buf).map_err(|e| Error::io(&p, e))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            let got = h.finalize().to_hex().to_string();
            if got != f.blake3 {
                return Err(Error::corrupt(&p, "checksum does not match the manifest"));
            }
        }
        Ok(m)
    }

    pub fn is_discarded(&self, version: &str) -> bool {
        self.version_dir(version).join(DISCARDED_FILE).exists()
    }

    /// Verifies `version`, then loads it into memory. A discarded version is refused.
    pub fn load(&self, version: &str) -> Result<BatchView> {
        let m = self.verify(version)?;
        if self.is_discarded(version) {
            return Err(Error::Invalid(format!("version {version} is discarded")));
        }
        let dir = self.version_dir(version);
        let (mut data, visitors) = read_counts(&dir.join(COUNTS_FILE))?;
        if data.urls.len() as u64 != m.urls || data.cell.len() as u64 != m.cells {
            return Err(Error::corrupt(
                dir.join(COUNTS_FILE),
                "url or cell count differs from the manifest",
            ));
        }
        data.events = m.events;
        data.sketches = read_sketches_of(&m, &dir, SKETCHES_FILE, (&data, visitors))?;
        let (mut sources, visitors) = read_counts(&dir.join(SOURCES_FILE))?;
        if sources.urls.len() as u64 != m.source_keys || sources.cell.len() as u64 != m.source_cells
        {
            return Err(Error::corrupt(
                dir.join(SOURCES_FILE),
                "key or cell count differs from the manifest",
            ));
        }
        sources.events = m.events;
        sources.sketches = read_sketches_of(&m, &dir, SOURCE_SKETCHES_FILE, (&sources, visitors))?;
        data.sources = Some(Box::new(sources));
        Ok(BatchView::from_data(
            m.version,
            m.cutoff_seq,
            m.created_at_ms,
            data,
        ))
    }

    /// Marks `version` discarded (keeps its files). If it was `CURRENT`, `CURRENT` moves to the
    /// newest good earlier version, or is removed. Returns the version `CURRENT` names after.
    pub fn discard(&self, version: &str, reason: &str) -> Result<Option<String>> {
        let dir = self.version_dir(version);
        if !dir.is_dir() {
            return Err(Error::NoSuchVersion(version.to_string()));
        }
        write_file_synced(&dir.join(DISCARDED_FILE), format!("{reason}\n").as_bytes())?;
        fsync_dir(&dir)?;
        tracing::warn!(version, reason, "batch view discarded");
        let current = self.current()?;
        if current.as_deref() == Some(version) {
            match self.newest_good_before(version)? {
                Some(prev) => {
                    self.set_current(&prev)?;
                    Ok(Some(prev))
                }
                None => {
                    self.clear_current()?;
                    Ok(None)
                }
            }
        } else {
            Ok(current)
        }
    }

    /// The newest good version whose name sorts before `version`.
    pub fn newest_good_before(&self, version: &str) -> Result<Option<String>> {
        Ok(self
            .list()?
            .into_iter()
            .rev()
            .find(|v| v.status == ViewStatus::Good && v.version.as_str() < version)
            .map(|v| v.version))
    }

    /// The newest good version.
    pub fn newest_good(&self) -> Result<Option<String>> {
        Ok(self
            .list()?
            .into_iter()
            .rev()
            .find(|v| v.status == ViewStatus::Good)
            .map(|v| v.version))
    }

    /// Every version directory, ascending by name. Temporary directories are not listed.
    pub fn list(&self) -> Result<Vec<ViewInfo>> {
        let mut out = Vec::new();
        let rd = fs::read_dir(&self.root).map_err(|e| Error::io(&self.root, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| Error::io(&self.root, e))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            let size_bytes = dir_size(&entry.path());
            let info = match self.read_manifest(&name) {
                Ok(m) => {
                    let status = if self.is_discarded(&name) {
                        ViewStatus::Discarded
                    } else {
                        ViewStatus::Good
                    };
                    info_of(&m, size_bytes, status)
                }
                Err(_) => {
                    let (cutoff_seq, ms) = parse_version(&name).unwrap_or_default();
                    ViewInfo {
                        version: name.clone(),
                        cutoff_seq,
                        created_at: tally_core::format_rfc3339(ms),
                        created_at_ms: ms,
                        events: 0,
                        urls: 0,
                        size_bytes,
                        status: ViewStatus::Invalid,
                    }
                }
            };
            out.push(info);
        }
        out.sort_by(|a, b| a.version.cmp(&b.version));
        Ok(out)
    }

    /// Deletes good versions older than the newest `keep_versions` good ones (never `CURRENT`)
    /// and leftover temporary directories and files. Discarded and invalid versions are kept
    /// for inspection. Returns the deleted version names.
    pub fn gc(&self, keep_versions: usize) -> Result<Vec<String>> {
        let current = self.current()?;
        let mut deleted = Vec::new();
        let rd = fs::read_dir(&self.root).map_err(|e| Error::io(&self.root, e))?;
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with(TMP_PREFIX) {
                let p = entry.path();
                let r = if p.is_dir() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
                if let Err(e) = r {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove temporary view file");
                }
            }
        }
        let good: Vec<ViewInfo> = self
            .list()?
            .into_iter()
            .filter(|v| v.status == ViewStatus::Good)
            .collect();
        let n = good.len();
        for v in good.into_iter().take(n.saturating_sub(keep_versions)) {
            if current.as_deref() == Some(v.version.as_str()) {
                continue;
            }
            let p = self.version_dir(&v.version);
            fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            deleted.push(v.version);
        }
        if !deleted.is_empty() {
            fsync_dir(&self.root)?;
            tracing::info!(deleted = deleted.len(), "old batch views deleted");
        }
        Ok(deleted)
    }
}

fn info_of(m: &Manifest, size_bytes: u64, status: ViewStatus) -> ViewInfo {
    ViewInfo {
        version: m.version.clone(),
        cutoff_seq: m.cutoff_seq,
        created_at: m.created_at.clone(),
        created_at_ms: m.created_at_ms,
        events: m.events,
        urls: m.urls,
        size_bytes,
        status,
    }
}

fn dir_size(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(path, e))
}
