//! Files on disk: the master dataset's rows and schemas as the parquet crate reads them, and
//! view files to damage.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type, SchemaRef, UInt64Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// One row of the master dataset; times are epoch milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub seq: u64,
    pub ts: i64,
    pub url: String,
    pub visitor: Option<String>,
    pub referrer: Option<String>,
    pub id: Option<String>,
    pub received_at: i64,
}

/// The files matching `master/**/*.parquet` under `data_dir`, sorted.
pub fn master_files(data_dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&data_dir.join("master"), &mut out);
    out.sort();
    out
}

/// The Arrow schema of each master file, as a Parquet reader sees it.
pub fn master_schemas(data_dir: &Path) -> Vec<(PathBuf, SchemaRef)> {
    master_files(data_dir)
        .into_iter()
        .map(|path| {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            let builder = ParquetRecordBatchReaderBuilder::try_new(file)
                .unwrap_or_else(|e| panic!("read parquet footer of {}: {e}", path.display()));
            let schema = builder.schema().clone();
            (path, schema)
        })
        .collect()
}

/// Every row of `master/**/*.parquet` under `data_dir`, in file order.
pub fn read_master(data_dir: &Path) -> Vec<Row> {
    let mut rows = Vec::new();
    for path in master_files(data_dir) {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.build())
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        for batch in reader {
            let batch = batch.unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            append_rows(&path, &batch, &mut rows);
        }
    }
    rows
}

fn column(path: &Path, batch: &RecordBatch, name: &str, to: &DataType) -> Arc<dyn Array> {
    let col = batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("{} has no column {name:?}", path.display()));
    cast(col, to).unwrap_or_else(|e| panic!("{}: column {name:?} as {to}: {e}", path.display()))
}

fn append_rows(path: &Path, batch: &RecordBatch, rows: &mut Vec<Row>) {
    let seq = column(path, batch, "seq", &DataType::UInt64);
    let ts = column(path, batch, "ts", &DataType::Int64);
    let url = column(path, batch, "url", &DataType::Utf8);
    let visitor = column(path, batch, "visitor", &DataType::Utf8);
    let referrer = column(path, batch, "referrer", &DataType::Utf8);
    let id = column(path, batch, "id", &DataType::Utf8);
    let received_at = column(path, batch, "received_at", &DataType::Int64);
    let (seq, ts, received_at) = (
        seq.as_primitive::<UInt64Type>(),
        ts.as_primitive::<Int64Type>(),
        received_at.as_primitive::<Int64Type>(),
    );
    let (url, visitor, referrer, id) = (
        url.as_string::<i32>(),
        visitor.as_string::<i32>(),
        referrer.as_string::<i32>(),
        id.as_string::<i32>(),
    );
    let opt =
        |a: &arrow::array::StringArray, i: usize| a.is_valid(i).then(|| a.value(i).to_string());
    for i in 0..batch.num_rows() {
        assert!(
            seq.is_valid(i) && ts.is_valid(i) && url.is_valid(i) && received_at.is_valid(i),
            "{}: row {i} has a null in a required column",
            path.display()
        );
        rows.push(Row {
            seq: seq.value(i),
            ts: ts.value(i),
            url: url.value(i).to_string(),
            visitor: opt(visitor, i),
            referrer: opt(referrer, i),
            id: opt(id, i),
            received_at: received_at.value(i),
        });
    }
}

/// Rows counted per URL.
pub fn count_by_url(rows: &[Row]) -> HashMap<String, u64> {
    let mut counts = HashMap::new();
    for row in rows {
        *counts.entry(row.url.clone()).or_insert(0) += 1;
    }
    counts
}

/// The largest file of a view directory.
pub fn largest_file(dir: &Path) -> PathBuf {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .max_by_key(|e| e.metadata().unwrap().len())
        .expect("a view has files")
        .path()
}

/// Flips 16 bytes in the middle of a file (size unchanged).
pub fn flip_bytes(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    assert!(
        bytes.len() > 32,
        "{} is too small to corrupt",
        path.display()
    );
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid - 8..mid + 8] {
        *b ^= 0xA5;
    }
    fs::write(path, bytes).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_of_an_empty_dir_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_master(dir.path()).is_empty());
    }

    #[test]
    fn read_master_reads_the_contract_schema() {
        use arrow::array::{StringArray, TimestampMillisecondArray, UInt64Array};
        use arrow::datatypes::{Field, Schema, TimeUnit};
        let ts_type = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
        let schema = Arc::new(Schema::new(vec![
            Field::new("seq", DataType::UInt64, false),
            Field::new("ts", ts_type.clone(), false),
            Field::new("url", DataType::Utf8, false),
            Field::new("visitor", DataType::Utf8, true),
            Field::new("referrer", DataType::Utf8, true),
            Field::new("id", DataType::Utf8, true),
            Field::new("received_at", ts_type, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(UInt64Array::from(vec![1, 2])),
                Arc::new(TimestampMillisecondArray::from(vec![10, 20]).with_timezone("UTC")),
                Arc::new(StringArray::from(vec!["http://a.com/", "http://b.com/"])),
                Arc::new(StringArray::from(vec![Some("v"), None])),
                Arc::new(StringArray::from(vec![None::<&str>, None])),
                Arc::new(StringArray::from(vec![Some("e1"), Some("e2")])),
                Arc::new(TimestampMillisecondArray::from(vec![11, 21]).with_timezone("UTC")),
            ],
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("master").join("2026");
        fs::create_dir_all(&sub).unwrap();
        let file = File::create(sub.join("x.parquet")).unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        fs::write(sub.join("y.parquet.tmp"), b"junk").unwrap();

        let rows = read_master(dir.path());
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].url, "http://a.com/");
        assert_eq!(rows[0].visitor.as_deref(), Some("v"));
        assert_eq!(rows[1].visitor, None);
        assert_eq!((rows[1].seq, rows[1].ts, rows[1].received_at), (2, 20, 21));
        assert_eq!(master_schemas(dir.path())[0].1.fields(), schema.fields());
        assert_eq!(count_by_url(&rows)["http://b.com/"], 1);
    }
}
