//! Test and benchmark support, kept out of the production crates: write master files the way
//! tally-master does (`master/{first:020}-{last:020}.parquet`, rows sorted by (url, ts), `url`
//! dictionary-encoded, zstd, row groups up to ~1M rows) with any row-group size and dictionary
//! limit, and a small seeded generator. A dev-dependency only.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray, TimestampMillisecondArray, UInt64Array};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use tally_core::Seq;
use tally_master::MasterFile;

use tally_master::{Error, Result};

/// One master row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterRow {
    pub seq: u64,
    pub ts: i64,
    pub url: String,
    pub visitor: Option<String>,
    pub referrer: Option<String>,
}

/// The master file schema: the one tally-master writes.
pub use tally_master::master_schema;

/// Writes `rows` (any order; a contiguous or gappy seq range) as one master file under
/// `master_dir`, sorted by (url, ts), with row groups of at most `row_group_rows`.
pub fn write_master_file(
    master_dir: &Path,
    rows: Vec<MasterRow>,
    row_group_rows: usize,
) -> Result<MasterFile> {
    write_master_file_with(master_dir, rows, row_group_rows, 256 << 20)
}

/// [`write_master_file`] with a given dictionary page size limit for `url` (a small limit makes
/// the writer fall back to plain pages, as the default 1 MiB does with many long URLs).
pub fn write_master_file_with(
    master_dir: &Path,
    mut rows: Vec<MasterRow>,
    row_group_rows: usize,
    url_dictionary_limit: usize,
) -> Result<MasterFile> {
    std::fs::create_dir_all(master_dir).map_err(|e| io(master_dir, e))?;
    let first = rows.iter().map(|r| r.seq).min().unwrap_or(0);
    let last = rows.iter().map(|r| r.seq).max().unwrap_or(0);
    rows.sort_by(|a, b| a.url.cmp(&b.url).then(a.ts.cmp(&b.ts)));
    let path = master_dir.join(format!("{:020}-{:020}.parquet", first, last));
    let mut props = WriterProperties::builder();
    if url_dictionary_limit < 1 << 20 {
        // Small pages, so that the fallback to plain pages happens within a row group.
        props = props
            .set_data_page_row_count_limit(4096)
            .set_write_batch_size(1024);
    }
    let props = props
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("level")))
        .set_column_dictionary_page_size_limit(ColumnPath::from("url"), url_dictionary_limit)
        .set_max_row_group_row_count(Some(row_group_rows.max(1)))
        .build();
    let schema = master_schema();
    let file = File::create(&path).map_err(|e| io(&path, e))?;
    let mut w =
        ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(|e| parquet(&path, e))?;
    for chunk in rows.chunks(256 * 1024) {
        let cols: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from_iter_values(chunk.iter().map(|r| r.seq))),
            Arc::new(
                TimestampMillisecondArray::from_iter_values(chunk.iter().map(|r| r.ts))
                    .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter_values(
                chunk.iter().map(|r| r.url.as_str()),
            )),
            Arc::new(StringArray::from_iter(
                chunk.iter().map(|r| r.visitor.as_deref()),
            )),
            Arc::new(StringArray::from_iter(
                chunk.iter().map(|r| r.referrer.as_deref()),
            )),
            Arc::new(StringArray::from_iter(chunk.iter().map(|_| None::<&str>))),
            Arc::new(
                TimestampMillisecondArray::from_iter_values(chunk.iter().map(|r| r.ts))
                    .with_timezone("UTC"),
            ),
        ];
        let b = RecordBatch::try_new(schema.clone(), cols).map_err(|e| parquet(&path, e))?;
        w.write(&b).map_err(|e| parquet(&path, e))?;
    }
    w.close().map_err(|e| parquet(&path, e))?;
    let size = std::fs::metadata(&path).map_err(|e| io(&path, e))?.len();
    Ok(MasterFile {
        path,
        first: Seq(first),
        last: Seq(last),
        size,
    })
}

/// A small deterministic PRNG (xorshift64*), so tests and benches need no extra crate.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn parquet(path: &Path, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Parquet {
        path: path.to_path_buf(),
        source: Box::new(e),
    }
}
