//! The master file format: Arrow schema, writing a sealed file, reading one back.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arrow::array::{
    Array, ArrayRef, StringArray, StringBuilder, TimestampMillisecondArray, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use tally_core::{Event, Seq};

use crate::paths::{fsync_dir, io_err, master_file_name, TMP_SUFFIX};
use crate::{Error, MasterFile, Result, SeqEvent};

/// Rows per Parquet row group.
pub const ROW_GROUP_ROWS: usize = 1 << 20;
/// Rows per Arrow batch when writing and reading.
const BATCH_ROWS: usize = 64 * 1024;

/// The Arrow schema of every master file: `seq` UInt64, `ts` Timestamp(ms, UTC), `url` Utf8,
/// `visitor`/`referrer`/`id` nullable Utf8, `received_at` Timestamp(ms, UTC).
pub fn master_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
            Arc::new(Schema::new(vec![
                Field::new("seq", DataType::UInt64, false),
                Field::new("ts", ts.clone(), false),
                Field::new("url", DataType::Utf8, false),
                Field::new("visitor", DataType::Utf8, true),
                Field::new("referrer", DataType::Utf8, true),
                Field::new("id", DataType::Utf8, true),
                Field::new("received_at", ts, false),
            ]))
        })
        .clone()
}

fn writer_props() -> WriterProperties {
    let sorted = |column_idx| SortingColumn {
        column_idx,
        descending: false,
        nulls_first: false,
    };
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(1).expect("valid zstd level"),
        ))
        .set_dictionary_enabled(true)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        // Rows are sorted by (url, ts): columns 2 then 1.
        .set_sorting_columns(Some(vec![sorted(2), sorted(1)]))
        .set_created_by("tally".to_owned());
    // Unique or near-unique columns gain nothing from a dictionary.
    for col in ["seq", "ts", "received_at", "id"] {
        b = b.set_column_dictionary_enabled(ColumnPath::from(col), false);
    }
    // Keep `url` dictionary-encoded for a whole row group even with ~100k distinct URLs: the
    // batch kernel aggregates on dictionary keys, and the default 1 MiB dictionary page limit
    // falls back to plain pages (measured: scan 3x slower over 5M events, 100k URLs).
    b = b.set_column_dictionary_page_size_limit(ColumnPath::from("url"), 64 << 20);
    b.build()
}

fn pq_err(path: &Path) -> impl FnOnce(parquet::errors::ParquetError) -> Error + '_ {
    move |e| Error::Parquet {
        path: path.to_path_buf(),
        source: Box::new(e),
    }
}

fn arrow_err(path: &Path) -> impl FnOnce(arrow::error::ArrowError) -> Error + '_ {
    move |e| Error::Parquet {
        path: path.to_path_buf(),
        source: Box::new(e),
    }
}

/// Builds one Arrow batch of the events at `idx` (in that order).
fn build_batch<E: Borrow<SeqEvent>>(
    events: &[E],
    idx: &[u32],
) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
    let n = idx.len();
    let mut seq = Vec::with_capacity(n);
    let mut ts = Vec::with_capacity(n);
    let mut rec = Vec::with_capacity(n);
    // Size every string buffer up front: growing them by doubling copied each one several
    // times per batch (memmove was the sealer's top function in the ingest profile).
    let (mut url_bytes, mut visitor_bytes, mut referrer_bytes, mut id_bytes) = (0, 0, 0, 0);
    for &i in idx {
        let e = &events[i as usize].borrow().event;
        url_bytes += e.url.len();
        visitor_bytes += e.visitor.as_ref().map_or(0, String::len);
        referrer_bytes += e.referrer.as_ref().map_or(0, String::len);
        id_bytes += e.id.as_ref().map_or(0, String::len);
    }
    let mut url = StringBuilder::with_capacity(n, url_bytes);
    let mut visitor = StringBuilder::with_capacity(n, visitor_bytes);
    let mut referrer = StringBuilder::with_capacity(n, referrer_bytes);
    let mut id = StringBuilder::with_capacity(n, id_bytes);
    for &i in idx {
        let e = events[i as usize].borrow();
        seq.push(e.seq.0);
        ts.push(e.event.ts);
        rec.push(e.event.received_at);
        url.append_value(&e.event.url);
        visitor.append_option(e.event.visitor.as_deref());
        referrer.append_option(e.event.referrer.as_deref());
        id.append_option(e.event.id.as_deref());
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from(seq)),
        Arc::new(TimestampMillisecondArray::from(ts).with_timezone("UTC")),
        Arc::new(url.finish()),
        Arc::new(visitor.finish()),
        Arc::new(referrer.finish()),
        Arc::new(id.finish()),
        Arc::new(TimestampMillisecondArray::from(rec).with_timezone("UTC")),
    ];
    RecordBatch::try_new(master_schema(), cols)
}

/// The order of `events` by (url, ts, seq). URLs repeat a lot, so each distinct URL gets its
/// rank once and the sort compares plain integers.
fn sort_order<E: Borrow<SeqEvent>>(events: &[E]) -> Vec<u32> {
    let mut ids: HashMap<&str, u32> = HashMap::new();
    let url_id: Vec<u32> = events
        .iter()
        .map(|e| {
            let next = ids.len() as u32;
            *ids.entry(e.borrow().event.url.as_str()).or_insert(next)
        })
        .collect();
    let mut distinct: Vec<(&str, u32)> = ids.into_iter().collect();
    distinct.sort_unstable();
    let mut rank = vec![0u32; distinct.len()];
    for (r, (_, id)) in distinct.iter().enumerate() {
        rank[*id as usize] = r as u32;
    }
    let mut keyed: Vec<(u32, i64, u64, u32)> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let e = e.borrow();
            (rank[url_id[i] as usize], e.event.ts, e.seq.0, i as u32)
        })
        .collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|k| k.3).collect()
}

/// Writes `events` (any order, non-empty, unique seqs) to `path` as a master file: rows sorted
/// by (url, ts), zstd, ~1M-row row groups. Writes `path.tmp`, fsyncs, renames, fsyncs the
/// directory. Returns the file's size.
pub(crate) fn write_parquet_atomic<E: Borrow<SeqEvent>>(
    path: &Path,
    events: &[E],
    fsync: bool,
) -> Result<u64> {
    let idx = sort_order(events);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(TMP_SUFFIX);
    let tmp = PathBuf::from(tmp);
    let res = (|| {
        let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
        let mut w = ArrowWriter::try_new(&mut file, master_schema(), Some(writer_props()))
            .map_err(pq_err(&tmp))?;
        for chunk in idx.chunks(BATCH_ROWS) {
            let batch = build_batch(events, chunk).map_err(arrow_err(&tmp))?;
            w.write(&batch).map_err(pq_err(&tmp))?;
        }
        w.close().map_err(pq_err(&tmp))?;
        if fsync {
            file.sync_all().map_err(io_err(&tmp))?;
        }
        let size = file.metadata().map_err(io_err(&tmp))?.len();
        drop(file);
        fs::rename(&tmp, path).map_err(io_err(path))?;
        if fsync {
            if let Some(dir) = path.parent() {
                fsync_dir(dir)?;
            }
        }
        Ok(size)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Writes `events` (any order, non-empty, unique seqs) as a sealed master file in `master_dir`,
/// named by its seq range, atomically and durably. For tools and tests that need master files.
pub fn write_master_file(master_dir: &Path, events: &[SeqEvent]) -> Result<MasterFile> {
    let first = events.iter().map(|e| e.seq).min().unwrap_or(Seq::ZERO);
    let last = events.iter().map(|e| e.seq).max().unwrap_or(Seq::ZERO);
    if events.is_empty() {
        return Err(Error::Schema {
            path: master_dir.to_path_buf(),
            reason: "a master file cannot be empty".into(),
        });
    }
    fs::create_dir_all(master_dir).map_err(io_err(master_dir))?;
    let path = master_dir.join(master_file_name(first, last));
    let size = write_parquet_atomic(&path, events, true)?;
    Ok(MasterFile {
        path,
        first,
        last,
        size,
    })
}

fn utf8_column(batch: &RecordBatch, name: &str, path: &Path) -> Result<StringArray> {
    let col = batch.column_by_name(name).ok_or_else(|| Error::Schema {
        path: path.to_path_buf(),
        reason: format!("column {name} is missing"),
    })?;
    let col = if col.data_type() == &DataType::Utf8 {
        col.clone()
    } else {
        arrow::compute::cast(col, &DataType::Utf8).map_err(arrow_err(path))?
    };
    Ok(col
        .as_any()
        .downcast_ref::<StringArray>()
        .expect("cast to Utf8")
        .clone())
}

fn typed_column<'a, T: Array + 'static>(
    batch: &'a RecordBatch,
    name: &str,
    path: &Path,
) -> Result<&'a T> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| Error::Schema {
            path: path.to_path_buf(),
            reason: format!("column {name} is missing or has the wrong type"),
        })
}

/// The number of events in a master file, from its footer alone.
pub(crate) fn row_count(path: &Path) -> Result<u64> {
    let file = File::open(path).map_err(io_err(path))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(pq_err(path))?;
    Ok(builder.metadata().file_metadata().num_rows().max(0) as u64)
}

/// Reads the events of a master file with `after < seq <= through`, in file order.
pub fn read_master_file_range(path: &Path, after: Seq, through: Seq) -> Result<Vec<SeqEvent>> {
    let file = File::open(path).map_err(io_err(path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(pq_err(path))?
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(pq_err(path))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(arrow_err(path))?;
        let seq = typed_column::<UInt64Array>(&batch, "seq", path)?;
        let ts = typed_column::<TimestampMillisecondArray>(&batch, "ts", path)?;
        let rec = typed_column::<TimestampMillisecondArray>(&batch, "received_at", path)?;
        let url = utf8_column(&batch, "url", path)?;
        let visitor = utf8_column(&batch, "visitor", path)?;
        let referrer = utf8_column(&batch, "referrer", path)?;
        let id = utf8_column(&batch, "id", path)?;
        let opt = |a: &StringArray, i: usize| a.is_valid(i).then(|| a.value(i).to_owned());
        for i in 0..batch.num_rows() {
            let s = Seq(seq.value(i));
            if s <= after || s > through {
                continue;
            }
            out.push(SeqEvent {
                seq: s,
                event: Event {
                    ts: ts.value(i),
                    url: url.value(i).to_owned(),
                    visitor: opt(&visitor, i),
                    referrer: opt(&referrer, i),
                    id: opt(&id, i),
                    received_at: rec.value(i),
                },
            });
        }
    }
    Ok(out)
}

/// Reads every event of a master file, in file order (sorted by url, ts).
pub fn read_master_file(path: &Path) -> Result<Vec<SeqEvent>> {
    read_master_file_range(path, Seq::ZERO, Seq(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::error::ErrorKind;

    /// A file that is not Parquet, and an empty write, are corruption or a bad request of their
    /// own kind, and the Parquet error keeps its cause.
    #[test]
    fn unreadable_master_files_are_corruption_that_keeps_its_cause() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("not-parquet.parquet");
        std::fs::write(&path, b"this is not a parquet file").expect("write");
        let e = read_master_file(&path).expect_err("not parquet");
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(matches!(e, Error::Parquet { .. }), "{e:?}");
        assert!(
            std::error::Error::source(&e).is_some(),
            "the cause is kept: {e:?}"
        );
        let empty = write_master_file(dir.path(), &[]).expect_err("empty");
        assert!(matches!(empty, Error::Schema { .. }), "{empty:?}");
        let gone = read_master_file(&dir.path().join("missing.parquet")).expect_err("missing");
        assert_eq!(gone.kind(), ErrorKind::Transient, "{gone}");
    }
}
