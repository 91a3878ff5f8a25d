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
//!   epoch, UTC), `sketch` Binary ([`VisitorSketch::to_bytes`]); sorted by (url, day).
//! - `sources.parquet`, `source_sketches.parquet`: the same two layouts keyed by source key
//!   (`tally_core::dims::source_key`, `\x01{referrer host}\x01{url}`) instead of URL: the data
//!   of breakdowns (format 3 on; a format-2 view is discarded as not servable and recomputed).
//! - `manifest.json`: see [`Manifest`].
//! - `DISCARDED` (only after a discard): the reason; the data is kept for inspection.
//!
//! A version is written into `.tmp-<version>-<pid>`, every file and the directory fsynced, then
//! renamed into place and the parent fsynced. A directory without a valid manifest is garbage.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, DictionaryArray, Int32Array, Int64Array, ListArray,
    RecordBatch, StringArray, UInt32Array, UInt64Array,
};
use arrow::buffer::{OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{
    DataType, Field, Int32Type, Int64Type, Schema, SchemaRef, UInt32Type, UInt64Type,
};
use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};
use tally_core::Seq;

use crate::error::{Error, Result};
use crate::kernel::{SketchData, ViewData};
use crate::sketch::VisitorSketch;
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
const ROWS_PER_BATCH: usize = 256 * 1024;

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

/// Writes through to a file while hashing and counting.
struct HashingWriter {
    inner: BufWriter<File>,
    hasher: blake3::Hasher,
    size: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
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

fn writer_props() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(1).expect("valid zstd level"),
        ))
        .set_column_dictionary_page_size_limit(ColumnPath::from("url"), 256 << 20)
        // Only `url` benefits from a dictionary; hashing every cell/views/day value costs
        // more than it saves. Cells and days ascend within a URL: delta encoding.
        .set_column_dictionary_enabled(ColumnPath::from("cell"), false)
        .set_column_encoding(ColumnPath::from("cell"), Encoding::DELTA_BINARY_PACKED)
        .set_column_dictionary_enabled(ColumnPath::from("day"), false)
        .set_column_encoding(ColumnPath::from("day"), Encoding::DELTA_BINARY_PACKED)
        .set_column_dictionary_enabled(ColumnPath::from("views"), false)
        .set_column_dictionary_enabled(ColumnPath::from("sketch"), false)
        .set_column_dictionary_enabled(
            ColumnPath::from(vec!["visitors".into(), "list".into(), "item".into()]),
            false,
        )
        .set_max_row_group_row_count(Some(1 << 20))
        .build()
}

fn url_dict_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// Writes batches produced by `batches` to `path` through a hashing writer, fsynced.
fn write_parquet(
    path: &Path,
    schema: SchemaRef,
    mut batches: impl FnMut(&mut dyn FnMut(RecordBatch) -> Result<()>) -> Result<()>,
) -> Result<ManifestFile> {
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    let hw = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        hasher: blake3::Hasher::new(),
        size: 0,
    };
    let mut w = ArrowWriter::try_new(hw, schema, Some(writer_props()))
        .map_err(|e| Error::parquet(path, e))?;
    batches(&mut |b| w.write(&b).map_err(|e| Error::parquet(path, e)))?;
    let hw = w.into_inner().map_err(|e| Error::parquet(path, e))?;
    let HashingWriter {
        inner,
        hasher,
        size,
    } = hw;
    let file = inner
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(path, e))?;
    Ok(ManifestFile {
        name: path
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .to_string(),
        size,
        blake3: hasher.finalize().to_hex().to_string(),
    })
}

fn visitors_item() -> Arc<Field> {
    Arc::new(Field::new_list_field(DataType::UInt32, false))
}

fn write_counts(path: &Path, data: &ViewData) -> Result<ManifestFile> {
    let visitors = data
        .sketches
        .as_ref()
        .filter(|s| !s.cell_offsets.is_empty());
    let mut fields = vec![
        Field::new("url", url_dict_type(), false),
        Field::new("cell", DataType::Int64, false),
        Field::new("views", DataType::UInt64, false),
    ];
    if visitors.is_some() {
        fields.push(Field::new(
            "visitors",
            DataType::List(visitors_item()),
            false,
        ));
    }
    let schema = Arc::new(Schema::new(fields));
    let values: ArrayRef = Arc::new(StringArray::from_iter_values(data.urls.iter()));
    // Row -> URL index.
    let mut keys: Vec<i32> = Vec::with_capacity(data.cell.len());
    for u in 0..data.urls.len() {
        keys.extend(std::iter::repeat_n(
            u as i32,
            data.offsets[u + 1] - data.offsets[u],
        ));
    }
    write_parquet(path, schema.clone(), |sink| {
        let n = data.cell.len();
        let mut start = 0;
        while start < n {
            let end = (start + ROWS_PER_BATCH).min(n);
            let url = DictionaryArray::<Int32Type>::try_new(
                Int32Array::from(keys[start..end].to_vec()),
                values.clone(),
            )
            .map_err(|e| Error::Internal(e.to_string()))?;
            let mut columns: Vec<ArrayRef> = vec![
                Arc::new(url),
                Arc::new(Int64Array::from(data.cell[start..end].to_vec())),
                Arc::new(UInt64Array::from(data.views[start..end].to_vec())),
            ];
            if let Some(s) = visitors {
                columns.push(Arc::new(visitor_lists(s, start, end)?));
            }
            let b = RecordBatch::try_new(schema.clone(), columns)
                .map_err(|e| Error::Internal(e.to_string()))?;
            sink(b)?;
            start = end;
        }
        Ok(())
    })
}

/// The `visitors` lists of the cells `[start, end)`.
fn visitor_lists(s: &SketchData, start: usize, end: usize) -> Result<ListArray> {
    let (a, b) = (s.cell_offsets[start], s.cell_offsets[end]);
    let offsets: Vec<i32> = s.cell_offsets[start..=end]
        .iter()
        .map(|&o| i32::try_from(o - a))
        .collect::<Result<_, _>>()
        .map_err(|_| Error::Internal("more than 2^31 visitors in one batch of cells".into()))?;
    let values = UInt32Array::from(s.cell_hashes[a as usize..b as usize].to_vec());
    ListArray::try_new(
        visitors_item(),
        OffsetBuffer::new(ScalarBuffer::from(offsets)),
        Arc::new(values),
        None,
    )
    .map_err(|e| Error::Internal(e.to_string()))
}

fn write_sketches(path: &Path, urls: &[String], s: &SketchData) -> Result<ManifestFile> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("url", url_dict_type(), false),
        Field::new("day", DataType::Int64, false),
        Field::new("sketch", DataType::Binary, false),
    ]));
    let values: ArrayRef = Arc::new(StringArray::from_iter_values(urls.iter()));
    let mut keys: Vec<i32> = Vec::with_capacity(s.days.len());
    for u in 0..urls.len() {
        keys.extend(std::iter::repeat_n(
            u as i32,
            s.offsets[u + 1] - s.offsets[u],
        ));
    }
    write_parquet(path, schema.clone(), |sink| {
        let n = s.days.len();
        let mut start = 0;
        while start < n {
            let end = (start + ROWS_PER_BATCH / 4).min(n);
            let url = DictionaryArray::<Int32Type>::try_new(
                Int32Array::from(keys[start..end].to_vec()),
                values.clone(),
            )
            .map_err(|e| Error::Internal(e.to_string()))?;
            let bytes: Vec<Vec<u8>> = s.sketches[start..end]
                .iter()
                .map(|k| k.to_bytes())
                .collect();
            let b = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(url),
                    Arc::new(Int64Array::from(s.days[start..end].to_vec())),
                    Arc::new(BinaryArray::from_iter_values(bytes.iter())),
                ],
            )
            .map_err(|e| Error::Internal(e.to_string()))?;
            sink(b)?;
            start = end;
        }
        Ok(())
    })
}

/// Reads a view file with `url` as a dictionary; calls `f(url_changed_to, batch)` per batch.
/// What a view file holds, from its footer: what its reader reserves up front, so that loading
/// a view neither grows its vectors by doubling (copying each and faulting its pages twice: a
/// quarter of a 100 M-event view's load) nor keeps their slack.
#[derive(Debug, Clone, Copy)]
struct FileSizes {
    rows: usize,
    /// Values of the `visitors` lists (one more per empty list).
    visitor_values: usize,
}

/// The [`FileSizes`] of a view file, from its footer. Sizes only steer reservations: bounded by
/// the file's length (a row takes more than a sixteenth of a byte), so a footer that lies cannot
/// ask for absurd memory.
fn view_file_sizes(path: &Path) -> Result<FileSizes> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let bound = usize::try_from(len)
        .unwrap_or(usize::MAX)
        .saturating_mul(16);
    let plain =
        parquet::arrow::arrow_reader::ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
            .map_err(|e| Error::parquet(path, e))?;
    let meta = plain.metadata();
    let size = |n: i64| usize::try_from(n).unwrap_or(0).min(bound);
    let visitor_values: i64 = meta
        .row_groups()
        .iter()
        .flat_map(|rg| rg.columns())
        .filter(|c| c.column_path().parts().first().map(String::as_str) == Some("visitors"))
        .map(|c| c.num_values())
        .sum();
    Ok(FileSizes {
        rows: size(meta.file_metadata().num_rows()),
        visitor_values: size(visitor_values),
    })
}

fn read_view_file(
    path: &Path,
    mut f: impl FnMut(&StringArray, &[i32], &RecordBatch) -> Result<()>,
) -> Result<()> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let plain =
        parquet::arrow::arrow_reader::ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
            .map_err(|e| Error::parquet(path, e))?;
    let fields: Vec<Field> = plain
        .schema()
        .fields()
        .iter()
        .map(|fl| {
            if fl.name() == "url" && matches!(fl.data_type(), DataType::Utf8) {
                fl.as_ref().clone().with_data_type(url_dict_type())
            } else {
                fl.as_ref().clone()
            }
        })
        .collect();
    let opts = ArrowReaderOptions::new().with_schema(Arc::new(Schema::new(fields)));
    let reader = ParquetRecordBatchReaderBuilder::try_new_with_options(file, opts)
        .and_then(|b| b.with_batch_size(ROWS_PER_BATCH).build())
        .map_err(|e| Error::parquet(path, e))?;
    for b in reader {
        let b = b.map_err(|e| Error::parquet(path, e))?;
        let url = b
            .column_by_name("url")
            .and_then(|c| c.as_any().downcast_ref::<DictionaryArray<Int32Type>>())
            .ok_or_else(|| Error::corrupt(path, "no url dictionary column"))?;
        let values = url
            .values()
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| Error::corrupt(path, "url values are not Utf8"))?;
        if url.null_count() > 0 {
            return Err(Error::corrupt(path, "url has nulls"));
        }
        f(values, url.keys().values(), &b)?;
    }
    Ok(())
}

fn i64_col<'a>(path: &Path, b: &'a RecordBatch, name: &str) -> Result<&'a [i64]> {
    let c = b
        .column_by_name(name)
        .ok_or_else(|| Error::corrupt(path, format!("no {name} column")))?;
    if c.data_type() != &DataType::Int64 || c.null_count() > 0 {
        return Err(Error::corrupt(
            path,
            format!("{name} is not a non-null Int64"),
        ));
    }
    Ok(c.as_primitive::<Int64Type>().values())
}

/// The cells' visitor lists of a counts file: `(cell_offsets, cell_hashes)` of [`SketchData`].
type CellVisitors = (Vec<u32>, Vec<u32>);

/// The counts of a counts file, and its cells' visitor lists when it has them.
fn read_counts(path: &Path) -> Result<(ViewData, Option<CellVisitors>)> {
    let mut d = ViewData {
        offsets: vec![0],
        ..Default::default()
    };
    let n = view_file_sizes(path)?;
    d.cell.reserve_exact(n.rows);
    d.views.reserve_exact(n.rows);
    let mut visitors: Option<CellVisitors> = None;
    read_view_file(path, |values, keys, b| {
        if let Some(c) = b.column_by_name("visitors") {
            let lists = c
                .as_list_opt::<i32>()
                .filter(|l| l.null_count() == 0 && l.values().null_count() == 0)
                .ok_or_else(|| Error::corrupt(path, "visitors is not a non-null List<UInt32>"))?;
            let hashes = lists
                .values()
                .as_primitive_opt::<UInt32Type>()
                .ok_or_else(|| Error::corrupt(path, "visitors is not a non-null List<UInt32>"))?;
            let (offs, all) = visitors.get_or_insert_with(|| {
                let mut offs = Vec::with_capacity(n.rows + 1);
                offs.push(0);
                (offs, Vec::with_capacity(n.visitor_values))
            });
            if offs.len() != d.cell.len() + 1 {
                return Err(Error::corrupt(path, "visitors are missing in some rows"));
            }
            for w in lists.value_offsets().windows(2) {
                let list = &hashes.values()[w[0] as usize..w[1] as usize];
                if !list.windows(2).all(|p| p[0] < p[1]) {
                    return Err(Error::corrupt(path, "a cell's visitors are not ascending"));
                }
                all.extend_from_slice(list);
                let end = u32::try_from(all.len())
                    .map_err(|_| Error::corrupt(path, "more than 2^32 cell visitors"))?;
                offs.push(end);
            }
        }
        let hours = i64_col(path, b, "cell")?;
        let vc = b
            .column_by_name("views")
            .ok_or_else(|| Error::corrupt(path, "no views column"))?;
        if vc.data_type() != &DataType::UInt64 || vc.null_count() > 0 {
            return Err(Error::corrupt(path, "views is not a non-null UInt64"));
        }
        let views = vc.as_primitive::<UInt64Type>().values();
        let mut prev_key = -1i32;
        for i in 0..keys.len() {
            let k = keys[i];
            if k != prev_key {
                let u = values.value(k as usize);
                prev_key = k;
                if d.urls.last().map(String::as_str) != Some(u) {
                    if d.urls.last().is_some_and(|last| last.as_str() >= u) {
                        return Err(Error::corrupt(path, "urls are not sorted"));
                    }
                    if !d.urls.is_empty() {
                        d.offsets.push(d.cell.len());
                    }
                    d.urls.push(u.to_string());
                }
            }
            let start = *d.offsets.last().expect("non-empty");
            if d.cell.len() > start && d.cell[d.cell.len() - 1] >= hours[i] {
                return Err(Error::corrupt(path, "cells are not sorted"));
            }
            if views[i] == 0 {
                return Err(Error::corrupt(path, "a cell has zero views"));
            }
            d.cell.push(hours[i]);
            d.views.push(views[i]);
        }
        Ok(())
    })?;
    if !d.urls.is_empty() {
        d.offsets.push(d.cell.len());
    }
    if visitors
        .as_ref()
        .is_some_and(|(offs, _)| offs.len() != d.cell.len() + 1)
    {
        return Err(Error::corrupt(path, "visitors are missing in some rows"));
    }
    Ok((d, visitors))
}

/// The sketches of the keys of `data` from file `name` of a version, with the cell visitors
/// read with the counts: `None` when the view has none, empty ones when the file is absent (no
/// key had a visitor).
fn read_sketches_of(
    m: &Manifest,
    dir: &Path,
    name: &str,
    (data, cell_visitors): (&ViewData, Option<CellVisitors>),
) -> Result<Option<SketchData>> {
    let Some(p) = m.sketch_precision else {
        return Ok(None);
    };
    let mut s = if m.files.iter().any(|f| f.name == name) {
        read_sketches(&dir.join(name), &data.urls, p)?
    } else {
        SketchData::empty(p, data.urls.len(), 0)
    };
    (s.cell_offsets, s.cell_hashes) = match cell_visitors {
        Some(v) => v,
        // Only a view without cells has no visitor lists.
        None if data.cell.is_empty() => (vec![0], Vec::new()),
        None => return Err(Error::corrupt(dir, "the counts have no visitors column")),
    };
    Ok(Some(s))
}

fn read_sketches(path: &Path, urls: &[String], precision: u8) -> Result<SketchData> {
    let mut s = SketchData {
        precision,
        offsets: vec![0; urls.len() + 1],
        ..Default::default()
    };
    // Sketch rows are sorted by url; walk the URL list alongside.
    let mut ui = 0usize;
    let mut counts = vec![0usize; urls.len()];
    let n = view_file_sizes(path)?;
    s.days.reserve_exact(n.rows);
    s.sketches.reserve_exact(n.rows);
    read_view_file(path, |values, keys, b| {
        let days = i64_col(path, b, "day")?;
        let sc = b
            .column_by_name("sketch")
            .and_then(|c| c.as_any().downcast_ref::<BinaryArray>())
            .ok_or_else(|| Error::corrupt(path, "no sketch Binary column"))?;
        for i in 0..keys.len() {
            let u = values.value(keys[i] as usize);
            while ui < urls.len() && urls[ui].as_str() < u {
                ui += 1;
            }
            if ui == urls.len() || urls[ui] != u {
                return Err(Error::corrupt(
                    path,
                    "sketch url is unknown or out of order",
                ));
            }
            if counts[ui] > 0 && s.days.last().is_some_and(|&d| d >= days[i]) {
                return Err(Error::corrupt(path, "days are not sorted"));
            }
            let sk = VisitorSketch::from_bytes(sc.value(i))
                .map_err(|e| Error::corrupt(path, e.to_string()))?;
            if sk.precision() != precision {
                return Err(Error::corrupt(
                    path,
                    "sketch precision differs from the manifest",
                ));
            }
            counts[ui] += 1;
            s.days.push(days[i]);
            s.sketches.push(sk);
        }
        Ok(())
    })?;
    for (i, c) in counts.iter().enumerate() {
        s.offsets[i + 1] = s.offsets[i] + c;
    }
    Ok(s)
}
