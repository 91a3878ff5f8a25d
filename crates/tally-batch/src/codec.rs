//! The Parquet codec of a batch view's files (layouts in [`crate::store`]'s module docs):
//! writing `counts`/`sources` and `sketches`/`source_sketches` through a hashing writer (the
//! manifest's checksums), and reading them back into [`ViewData`] and [`SketchData`] with
//! vectors sized from the footers.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
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

use crate::error::{Error, Result};
use crate::kernel::{SketchData, ViewData};
use crate::sketch::VisitorSketch;
use crate::store::{Manifest, ManifestFile};

const ROWS_PER_BATCH: usize = 256 * 1024;

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

pub(crate) fn write_counts(path: &Path, data: &ViewData) -> Result<ManifestFile> {
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
    let urls = UrlColumn::new(data.urls.iter(), &data.offsets);
    write_parquet(path, schema.clone(), |sink| {
        let n = data.cell.len();
        let mut start = 0;
        while start < n {
            let end = (start + ROWS_PER_BATCH).min(n);
            let url = urls.rows(start, end)?;
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

/// The `url` column of a view file: each URL once in the dictionary, and per row the index of
/// its URL (the rows of URL `u` are `offsets[u]..offsets[u + 1]`).
struct UrlColumn {
    values: ArrayRef,
    keys: Vec<i32>,
}

impl UrlColumn {
    fn new<S: AsRef<str>>(urls: impl Iterator<Item = S>, offsets: &[usize]) -> UrlColumn {
        let values: ArrayRef = Arc::new(StringArray::from_iter_values(urls));
        let mut keys = Vec::with_capacity(offsets.last().copied().unwrap_or(0));
        for (u, w) in offsets.windows(2).enumerate() {
            keys.extend(std::iter::repeat_n(u as i32, w[1] - w[0]));
        }
        UrlColumn { values, keys }
    }

    /// The column of rows `[start, end)`.
    fn rows(&self, start: usize, end: usize) -> Result<DictionaryArray<Int32Type>> {
        DictionaryArray::<Int32Type>::try_new(
            Int32Array::from(self.keys[start..end].to_vec()),
            self.values.clone(),
        )
        .map_err(|e| Error::Internal(e.to_string()))
    }
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

pub(crate) fn write_sketches(path: &Path, urls: &[String], s: &SketchData) -> Result<ManifestFile> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("url", url_dict_type(), false),
        Field::new("day", DataType::Int64, false),
        Field::new("sketch", DataType::Binary, false),
    ]));
    let urls = UrlColumn::new(urls.iter(), &s.offsets);
    write_parquet(path, schema.clone(), |sink| {
        let n = s.days.len();
        let mut start = 0;
        while start < n {
            let end = (start + ROWS_PER_BATCH / 4).min(n);
            let url = urls.rows(start, end)?;
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
pub(crate) fn read_counts(path: &Path) -> Result<(ViewData, Option<CellVisitors>)> {
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
pub(crate) fn read_sketches_of(
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
