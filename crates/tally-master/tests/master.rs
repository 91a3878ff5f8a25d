//! Integration tests of the master dataset: WAL replay, group commit, sealing, epochs.

// Test helpers fail by panicking, as the tests do.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, StringArray, TimestampMillisecondArray, UInt64Array};
use arrow::datatypes::{DataType, TimeUnit};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, Encoding};
use proptest::prelude::*;
use tally_core::{Event, Seq};
use tally_master::{Error, Master, MasterConfig, SeqEvent, SeqRange, Tail};

fn cfg(dir: &Path) -> MasterConfig {
    MasterConfig {
        data_dir: dir.to_path_buf(),
        seal_interval: Duration::from_secs(3600),
        seal_max_events: 1_000_000,
        fsync: true,
        tail_capacity: 1000,
    }
}

fn ev(i: u64) -> Event {
    Event {
        ts: 1_790_000_000_000 + (i as i64 % 97) * 1000,
        url: format!("http://example.com/p{}", i % 7),
        visitor: (i % 2 == 0).then(|| format!("v{i}")),
        referrer: (i % 3 == 0).then(|| "http://ref.com/".to_owned()),
        id: (i % 5 == 0).then(|| format!("id-{i}")),
        received_at: 1_790_000_000_000 + i as i64,
    }
}

fn evs(range: std::ops::Range<u64>) -> Vec<Event> {
    range.map(ev).collect()
}

fn seqs(events: &[SeqEvent]) -> Vec<u64> {
    events.iter().map(|e| e.seq.0).collect()
}

/// WAL segment files, ascending.
fn wal_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    v.sort();
    v
}

fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join("master"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn append_seal_reopen_smoke() {
    let dir = tempfile::tempdir().unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    let mut rx = m.subscribe();
    let r = m.append(evs(0..3)).await.unwrap();
    assert_eq!(
        r,
        SeqRange {
            first: Seq(1),
            last: Seq(3)
        }
    );
    assert_eq!(m.acked_seq(), Seq(3));
    rx.changed().await.unwrap();
    assert_eq!(*rx.borrow(), Seq(3));
    match m.tail_after(Seq(1), 10) {
        Tail::Events(e) => assert_eq!(e.iter().map(|e| e.seq.0).collect::<Vec<_>>(), vec![2, 3]),
        Tail::Gone => panic!("tail gone"),
    }
    assert_eq!(m.seal().await.unwrap(), Seq(3));
    let snap = m.snapshot().unwrap();
    assert_eq!(snap.len(), 1);
    assert_eq!((snap[0].first, snap[0].last), (Seq(1), Seq(3)));
    let r = m.append(evs(3..5)).await.unwrap();
    assert_eq!(
        r,
        SeqRange {
            first: Seq(4),
            last: Seq(5)
        }
    );
    let all = m.read_range(Seq(0), Seq(100)).unwrap();
    assert_eq!(seqs(&all), vec![1, 2, 3, 4, 5]);
    assert_eq!(all[3].event, ev(3));
    m.shutdown().await.unwrap();
    assert!(matches!(m.append(evs(0..1)).await, Err(Error::Closed)));
    assert!(matches!(m.cut_epoch().await, Err(Error::Closed)));

    let m = Master::open(cfg(dir.path())).unwrap();
    assert_eq!(m.acked_seq(), Seq(5));
    assert_eq!(m.status().sealed_seq, Seq(5));
    let r = m.append(evs(5..6)).await.unwrap();
    assert_eq!(r.first, Seq(6));
    let all = m.read_range(Seq(2), Seq(6)).unwrap();
    assert_eq!(seqs(&all), vec![3, 4, 5, 6]);
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// WAL replay

fn gen_event() -> impl Strategy<Value = Event> {
    (
        0i64..1_000_000,
        "[a-z]{1,12}",
        proptest::option::of("[a-zA-Z0-9]{0,20}"),
        proptest::option::of(".{0,30}"),
        proptest::option::of("[a-z0-9-]{0,10}"),
    )
        .prop_map(|(ts, path, visitor, referrer, id)| Event {
            ts: 1_790_000_000_000 + ts,
            url: format!("http://example.com/{path}"),
            visitor,
            referrer,
            id,
            received_at: 1_790_000_000_000,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random appends, a crash that cuts the segment at a random byte, reopen: exactly the
    /// records written whole before the cut come back, and new appends get larger seqs.
    #[test]
    fn wal_replay_matches_model_after_random_cut(
        batches in proptest::collection::vec(proptest::collection::vec(gen_event(), 1..8), 1..12),
        cut_frac in 0.0f64..=1.0,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let c = MasterConfig { fsync: false, ..cfg(dir.path()) };
            let m = Master::open(c.clone()).unwrap();
            // (end offset of the record in the segment, events of the record)
            let mut model: Vec<(u64, Vec<Event>)> = Vec::new();
            for b in &batches {
                m.append(b.clone()).await.unwrap();
                let seg = wal_files(dir.path()).pop().unwrap();
                model.push((fs::metadata(&seg).unwrap().len(), b.clone()));
            }
            m.close_unsealed().await;
            let seg = wal_files(dir.path()).pop().unwrap();
            let len = fs::metadata(&seg).unwrap().len();
            let cut = (len as f64 * cut_frac) as u64;
            OpenOptions::new().write(true).open(&seg).unwrap().set_len(cut).unwrap();

            let expected: Vec<Event> = model
                .iter()
                .filter(|(end, _)| *end <= cut)
                .flat_map(|(_, b)| b.clone())
                .collect();
            let m = Master::open(c).unwrap();
            let n = expected.len() as u64;
            prop_assert_eq!(m.acked_seq(), Seq(n));
            let got = m.read_range(Seq(0), Seq(u64::MAX)).unwrap();
            prop_assert_eq!(seqs(&got), (1..=n).collect::<Vec<_>>());
            prop_assert_eq!(got.into_iter().map(|e| e.event).collect::<Vec<_>>(), expected);
            let r = m.append(evs(0..2)).await.unwrap();
            prop_assert_eq!(r, SeqRange { first: Seq(n + 1), last: Seq(n + 2) });
            m.close_unsealed().await;
            // And once more: the repaired segment replays cleanly.
            let m = Master::open(MasterConfig { fsync: false, ..cfg(dir.path()) }).unwrap();
            prop_assert_eq!(m.acked_seq(), Seq(n + 2));
            m.shutdown().await.unwrap();
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn segment_torn_during_creation_gets_a_header_again() {
    for len in [0usize, 5] {
        let dir = tempfile::tempdir().unwrap();
        let m = Master::open(cfg(dir.path())).unwrap();
        m.append(evs(0..3)).await.unwrap();
        m.close_unsealed().await;
        // A crash right after creating the next segment, before its header was written.
        fs::write(
            dir.path().join("wal/00000000000000000004.wal"),
            &b"TALLYWAL"[..len],
        )
        .unwrap();
        let m = Master::open(cfg(dir.path())).unwrap();
        assert_eq!(m.acked_seq(), Seq(3));
        assert_eq!(m.append(evs(3..4)).await.unwrap().first, Seq(4));
        m.close_unsealed().await;
        let m = Master::open(cfg(dir.path())).unwrap();
        assert_eq!(m.acked_seq(), Seq(4));
        let got = m.read_range(Seq(0), Seq(100)).unwrap();
        assert_eq!(
            got.into_iter().map(|e| e.event).collect::<Vec<_>>(),
            evs(0..4)
        );
        m.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn corruption_in_the_middle_is_an_error_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    let mut ends = Vec::new();
    for i in 0..3 {
        m.append(evs(i * 4..i * 4 + 4)).await.unwrap();
        ends.push(
            fs::metadata(wal_files(dir.path()).pop().unwrap())
                .unwrap()
                .len(),
        );
    }
    m.close_unsealed().await;
    let seg = wal_files(dir.path()).pop().unwrap();
    let mut bytes = fs::read(&seg).unwrap();
    // Flip a payload byte of the second record.
    let second = ends[0] as usize;
    bytes[second + 30] ^= 0xff;
    fs::write(&seg, &bytes).unwrap();
    match Master::open(cfg(dir.path())) {
        Err(Error::CorruptWal { file, offset, .. }) => {
            assert_eq!(file, seg);
            assert_eq!(offset, ends[0]);
        }
        other => panic!("expected CorruptWal, got {other:?}"),
    }
    // The same damage in the LAST record is a torn tail: truncated away.
    bytes[second + 30] ^= 0xff;
    let third = ends[1] as usize;
    bytes[third + 30] ^= 0xff;
    fs::write(&seg, &bytes).unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    assert_eq!(m.acked_seq(), Seq(8));
    assert_eq!(fs::metadata(&seg).unwrap().len(), ends[1]);
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Group commit

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_get_unique_increasing_seqs_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    let mut tasks = Vec::new();
    for t in 0..32u64 {
        let m = m.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for k in 0..20u64 {
                let base = t * 1000 + k * 10;
                let n = 1 + (t + k) % 5;
                let r = m.append(evs(base..base + n)).await.unwrap();
                assert_eq!(r.last.0 - r.first.0 + 1, n);
                out.push((r, base));
            }
            out
        }));
    }
    let mut all: Vec<(SeqRange, u64)> = Vec::new();
    for t in tasks {
        let mine = t.await.unwrap();
        // One client's appends get increasing seqs.
        assert!(mine.windows(2).all(|w| w[0].0.last < w[1].0.first));
        all.extend(mine);
    }
    all.sort_by_key(|(r, _)| r.first);
    let mut next = 1;
    let mut expected: HashMap<u64, Event> = HashMap::new();
    for (r, base) in &all {
        assert_eq!(
            r.first.0, next,
            "ranges must tile 1..=N without gaps or overlaps"
        );
        for (i, s) in (r.first.0..=r.last.0).enumerate() {
            expected.insert(s, ev(base + i as u64));
        }
        next = r.last.0 + 1;
    }
    let total = next - 1;
    assert_eq!(m.acked_seq(), Seq(total));
    m.close_unsealed().await;

    let m = Master::open(cfg(dir.path())).unwrap();
    assert_eq!(m.acked_seq(), Seq(total));
    let got = m.read_range(Seq(0), Seq(total)).unwrap();
    assert_eq!(got.len() as u64, total);
    for e in got {
        assert_eq!(Some(&e.event), expected.get(&e.seq.0));
    }
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Sealing

#[tokio::test]
async fn seal_writes_parquet_with_every_event_once_and_the_right_columns() {
    let dir = tempfile::tempdir().unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    let mut expected: HashMap<u64, Event> = HashMap::new();
    for b in 0..10u64 {
        let r = m.append(evs(b * 50..b * 50 + 50)).await.unwrap();
        for (i, s) in (r.first.0..=r.last.0).enumerate() {
            expected.insert(s, ev(b * 50 + i as u64));
        }
    }
    assert_eq!(m.seal().await.unwrap(), Seq(500));
    assert_eq!(m.status().sealed_seq, Seq(500));
    // The closed segment is gone; only the new, empty open segment remains.
    let wal = wal_files(dir.path());
    assert!(
        wal.iter().all(|p| fs::metadata(p).unwrap().len() <= 12),
        "{wal:?}"
    );

    let files = parquet_files(dir.path());
    assert_eq!(files.len(), 1);
    assert!(files[0].ends_with("master/00000000000000000001-00000000000000000500.parquet"));
    let file = fs::File::open(&files[0]).unwrap();
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let schema = builder.schema().clone();
    let utc = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    let want = [
        ("seq", DataType::UInt64, false),
        ("ts", utc.clone(), false),
        ("url", DataType::Utf8, false),
        ("visitor", DataType::Utf8, true),
        ("referrer", DataType::Utf8, true),
        ("id", DataType::Utf8, true),
        ("received_at", utc, false),
    ];
    assert_eq!(schema.fields().len(), want.len());
    for (f, (name, ty, nullable)) in schema.fields().iter().zip(want) {
        assert_eq!(
            (f.name().as_str(), f.data_type(), f.is_nullable()),
            (name, &ty, nullable)
        );
    }
    let meta = builder.metadata().clone();
    let url_col = meta.row_group(0).column(2);
    assert!(matches!(url_col.compression(), Compression::ZSTD(_)));
    assert!(
        url_col
            .encodings()
            .any(|e| e == Encoding::RLE_DICTIONARY || e == Encoding::PLAIN_DICTIONARY),
        "url must be dictionary-encoded"
    );
    let mut rows: Vec<(u64, Event)> = Vec::new();
    for batch in builder.build().unwrap() {
        let batch = batch.unwrap();
        let col = |n: &str| batch.column_by_name(n).unwrap().clone();
        let seq = col("seq");
        let seq = seq.as_any().downcast_ref::<UInt64Array>().unwrap();
        let ts = col("ts");
        let ts = ts
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .unwrap();
        let rec = col("received_at");
        let rec = rec
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .unwrap();
        let s = |n: &str| {
            col(n)
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .clone()
        };
        let (url, visitor, referrer, id) = (s("url"), s("visitor"), s("referrer"), s("id"));
        let opt = |a: &StringArray, i| a.is_valid(i).then(|| a.value(i).to_owned());
        for i in 0..batch.num_rows() {
            rows.push((
                seq.value(i),
                Event {
                    ts: ts.value(i),
                    url: url.value(i).to_owned(),
                    visitor: opt(&visitor, i),
                    referrer: opt(&referrer, i),
                    id: opt(&id, i),
                    received_at: rec.value(i),
                },
            ));
        }
    }
    assert_eq!(rows.len(), 500);
    // Sorted by (url, ts).
    assert!(rows
        .windows(2)
        .all(|w| (&w[0].1.url, w[0].1.ts) <= (&w[1].1.url, w[1].1.ts)));
    let mut by_seq: HashMap<u64, Event> = HashMap::new();
    for (s, e) in rows {
        assert!(by_seq.insert(s, e).is_none(), "seq {s} twice");
    }
    assert_eq!(by_seq, expected);
    // The helper reads the same thing.
    assert_eq!(
        tally_master::read_master_file(&files[0]).unwrap().len(),
        500
    );
    m.shutdown().await.unwrap();
}

#[tokio::test]
async fn tmp_files_are_swept_and_seq_survives_everything_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    m.append(evs(0..7)).await.unwrap();
    m.shutdown().await.unwrap();
    assert_eq!(parquet_files(dir.path()).len(), 1);
    // Leftovers of a crash mid-seal, and no WAL at all.
    fs::write(
        dir.path()
            .join("master/00000000000000000008-00000000000000000009.parquet.tmp"),
        b"junk",
    )
    .unwrap();
    fs::create_dir_all(dir.path().join("master/sub")).unwrap();
    fs::write(dir.path().join("master/sub/x.parquet.tmp"), b"junk").unwrap();
    fs::remove_dir_all(dir.path().join("wal")).unwrap();

    let m = Master::open(cfg(dir.path())).unwrap();
    assert!(!dir
        .path()
        .join("master/00000000000000000008-00000000000000000009.parquet.tmp")
        .exists());
    assert!(!dir.path().join("master/sub/x.parquet.tmp").exists());
    assert_eq!(m.acked_seq(), Seq(7));
    assert_eq!(m.append(evs(7..9)).await.unwrap().first, Seq(8));
    m.shutdown().await.unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    assert_eq!(m.append(evs(9..10)).await.unwrap().first, Seq(10));
    assert_eq!(
        seqs(&m.read_range(Seq(0), Seq(10)).unwrap()),
        (1..=10).collect::<Vec<_>>()
    );
    m.shutdown().await.unwrap();
}

#[tokio::test]
async fn segment_already_sealed_is_removed_at_open() {
    // A crash between the Parquet rename and the segment delete.
    let dir = tempfile::tempdir().unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    m.append(evs(0..5)).await.unwrap();
    m.close_unsealed().await;
    let seg = wal_files(dir.path()).pop().unwrap();
    let saved = fs::read(&seg).unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    m.shutdown().await.unwrap();
    assert!(!seg.exists());
    fs::write(&seg, saved).unwrap();

    let m = Master::open(cfg(dir.path())).unwrap();
    assert!(!seg.exists(), "the sealed segment must be deleted at open");
    assert_eq!(m.acked_seq(), Seq(5));
    assert_eq!(
        seqs(&m.read_range(Seq(0), Seq(5)).unwrap()),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(m.append(evs(5..6)).await.unwrap().first, Seq(6));
    m.shutdown().await.unwrap();
}

#[tokio::test]
async fn size_and_interval_triggers_seal() {
    let dir = tempfile::tempdir().unwrap();
    let c = MasterConfig {
        seal_max_events: 10,
        ..cfg(dir.path())
    };
    let m = Master::open(c).unwrap();
    for i in 0..5 {
        m.append(evs(i * 5..i * 5 + 5)).await.unwrap();
    }
    wait_for(|| parquet_files(dir.path()).len() >= 2).await;
    m.shutdown().await.unwrap();
    assert_eq!(
        seqs(
            &Master::open(cfg(dir.path()))
                .unwrap()
                .read_range(Seq(0), Seq(25))
                .unwrap()
        ),
        (1..=25).collect::<Vec<_>>()
    );

    let dir = tempfile::tempdir().unwrap();
    let c = MasterConfig {
        seal_interval: Duration::from_millis(50),
        ..cfg(dir.path())
    };
    let m = Master::open(c).unwrap();
    m.append(evs(0..3)).await.unwrap();
    wait_for(|| parquet_files(dir.path()).len() == 1).await;
    wait_for(|| m.status().sealed_seq == Seq(3)).await;
    m.shutdown().await.unwrap();
}

async fn wait_for(mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached in 5 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_range_across_sealed_and_unsealed_also_while_sealing() {
    let dir = tempfile::tempdir().unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    m.append(evs(0..10)).await.unwrap();
    m.seal().await.unwrap();
    m.append(evs(10..20)).await.unwrap();
    let got = m.read_range(Seq(5), Seq(15)).unwrap();
    assert_eq!(seqs(&got), (6..=15).collect::<Vec<_>>());
    assert_eq!(got[0].event, ev(5));
    assert_eq!(got[9].event, ev(14));
    assert!(m.read_range(Seq(20), Seq(30)).unwrap().is_empty());
    // through is capped at the acknowledged seq.
    assert_eq!(m.read_range(Seq(18), Seq(1000)).unwrap().len(), 2);

    // Appends and seals racing with readers: always exactly 1..=acked.
    let writer = {
        let m = m.clone();
        tokio::spawn(async move {
            for i in 0..30u64 {
                m.append(evs(100 + i * 3..103 + i * 3)).await.unwrap();
                if i % 3 == 0 {
                    m.seal().await.unwrap();
                }
            }
        })
    };
    for _ in 0..40 {
        let m2 = m.clone();
        let (acked, got) = tokio::task::spawn_blocking(move || {
            let acked = m2.acked_seq();
            (acked, m2.read_range(Seq(0), acked).unwrap())
        })
        .await
        .unwrap();
        assert_eq!(seqs(&got), (1..=acked.0).collect::<Vec<_>>());
    }
    writer.await.unwrap();
    let snap = m.snapshot().unwrap();
    assert!(snap.windows(2).all(|w| w[0].last < w[1].first));
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Epochs, tail, failures

#[tokio::test]
async fn cut_epoch_is_durable_and_never_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    assert_eq!(m.epochs(), vec![Seq(1)]);
    assert_eq!(m.cut_epoch().await.unwrap(), Seq(0));
    assert_eq!(m.epochs(), vec![Seq(1)]);
    m.append(evs(0..5)).await.unwrap();
    assert_eq!(m.cut_epoch().await.unwrap(), Seq(5));
    assert_eq!(m.cut_epoch().await.unwrap(), Seq(5));
    assert_eq!(m.epochs(), vec![Seq(1), Seq(6)]);
    m.append(evs(5..8)).await.unwrap();
    m.close_unsealed().await;

    let m = Master::open(cfg(dir.path())).unwrap();
    assert_eq!(m.epochs(), vec![Seq(1), Seq(6)]);
    assert_eq!(m.cut_epoch().await.unwrap(), Seq(8));
    m.forget_epochs_before(Seq(6)).unwrap();
    assert_eq!(m.epochs(), vec![Seq(6), Seq(9)]);
    m.shutdown().await.unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    assert_eq!(m.epochs(), vec![Seq(6), Seq(9)]);
    assert_eq!(m.append(evs(0..1)).await.unwrap().first, Seq(9));
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_epoch_is_atomic_with_appends() {
    let dir = tempfile::tempdir().unwrap();
    let m = Master::open(MasterConfig {
        fsync: false,
        ..cfg(dir.path())
    })
    .unwrap();
    let appender = {
        let m = m.clone();
        tokio::spawn(async move {
            let mut ranges = Vec::new();
            for i in 0..200 {
                ranges.push(m.append(evs(i..i + 3)).await.unwrap());
            }
            ranges
        })
    };
    let mut cuts = Vec::new();
    for _ in 0..20 {
        cuts.push(m.cut_epoch().await.unwrap());
        tokio::task::yield_now().await;
    }
    let ranges = appender.await.unwrap();
    // No append straddles a cut: each cut falls on a record boundary.
    for c in &cuts {
        assert!(
            ranges.iter().all(|r| !(r.first <= *c && *c < r.last)),
            "cut {c} splits a record"
        );
    }
    let e = m.epochs();
    assert!(e.windows(2).all(|w| w[0] < w[1]));
    m.shutdown().await.unwrap();
}

#[tokio::test]
async fn tail_after_serves_recent_events_or_says_gone() {
    let dir = tempfile::tempdir().unwrap();
    let m = Master::open(MasterConfig {
        tail_capacity: 5,
        ..cfg(dir.path())
    })
    .unwrap();
    assert!(matches!(m.tail_after(Seq(0), 10), Tail::Events(v) if v.is_empty()));
    m.append(evs(0..10)).await.unwrap();
    assert!(matches!(m.tail_after(Seq(0), 10), Tail::Gone));
    assert!(matches!(m.tail_after(Seq(4), 10), Tail::Gone));
    match m.tail_after(Seq(5), 3) {
        Tail::Events(v) => {
            assert_eq!(v.iter().map(|e| e.seq.0).collect::<Vec<_>>(), vec![6, 7, 8]);
            assert_eq!(v[0].event, ev(5));
        }
        Tail::Gone => panic!("gone"),
    }
    assert!(matches!(m.tail_after(Seq(10), 3), Tail::Events(v) if v.is_empty()));
    m.close_unsealed().await;
    // After a restart the tail is preloaded from the WAL.
    let m = Master::open(MasterConfig {
        tail_capacity: 5,
        ..cfg(dir.path())
    })
    .unwrap();
    assert!(matches!(m.tail_after(Seq(7), 10), Tail::Events(v) if v.len() == 3));
    m.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stopped_writer_thread_is_reported_and_appends_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    m.append(evs(0..4)).await.unwrap();
    assert!(m.stopped_threads().is_empty());
    m.inject_writer_panic();
    // The append that meets the panic is not acknowledged; later ones are refused with the
    // reason, not as "closed".
    assert!(m.append(evs(100..101)).await.is_err());
    wait_for(|| !m.stopped_threads().is_empty()).await;
    assert_eq!(m.stopped_threads(), vec![tally_master::WAL_WRITER]);
    assert!(matches!(
        m.append(evs(100..101)).await,
        Err(Error::ThreadStopped(t)) if t == tally_master::WAL_WRITER
    ));
    assert_eq!(m.acked_seq(), Seq(4));
    m.close_unsealed().await;
    assert!(m.stopped_threads().is_empty(), "none after close");
    // A restart replays the WAL: the acknowledged events are all there.
    let m = Master::open(cfg(dir.path())).unwrap();
    assert_eq!(m.acked_seq(), Seq(4));
    assert_eq!(m.read_range(Seq(0), Seq(100)).unwrap().len(), 4);
    m.shutdown().await.unwrap();
}

#[tokio::test]
async fn write_failure_is_unavailable_then_recovers_without_losing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    m.append(evs(0..4)).await.unwrap();
    m.inject_write_failures(2);
    assert!(matches!(
        m.append(evs(100..110)).await,
        Err(Error::Unavailable { .. })
    ));
    assert!(matches!(
        m.append(evs(100..110)).await,
        Err(Error::Unavailable { .. })
    ));
    assert_eq!(m.acked_seq(), Seq(4));
    // Nothing of the failed records is left in the segment.
    let r = m.append(evs(4..6)).await.unwrap();
    assert_eq!(
        r,
        SeqRange {
            first: Seq(5),
            last: Seq(6)
        }
    );
    let watch = Arc::new(m.subscribe());
    assert_eq!(*watch.borrow(), Seq(6));
    m.close_unsealed().await;

    let m = Master::open(cfg(dir.path())).unwrap();
    assert_eq!(m.acked_seq(), Seq(6));
    let got = m.read_range(Seq(0), Seq(100)).unwrap();
    assert_eq!(
        got.into_iter().map(|e| e.event).collect::<Vec<_>>(),
        evs(0..6)
    );
    m.shutdown().await.unwrap();
    assert_eq!(parquet_files(dir.path()).len(), 1);
}

#[tokio::test]
async fn snapshot_leaves_out_files_covered_by_a_compacted_one() {
    let dir = tempfile::tempdir().unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    m.append(evs(0..10)).await.unwrap();
    m.seal().await.unwrap();
    m.append(evs(10..20)).await.unwrap();
    m.seal().await.unwrap();
    let before = m.snapshot().unwrap();
    assert_eq!(
        before
            .iter()
            .map(|f| (f.first.0, f.last.0))
            .collect::<Vec<_>>(),
        vec![(1, 10), (11, 20)]
    );
    // What compaction would do: one file covering both, inputs still present.
    let all = m.read_range(Seq(0), Seq(20)).unwrap();
    let merged = tally_master::write_master_file(&dir.path().join("master"), &all).unwrap();
    assert_eq!((merged.first, merged.last), (Seq(1), Seq(20)));
    let snap = m.snapshot().unwrap();
    assert_eq!(snap, vec![merged]);
    assert_eq!(tally_master::list_master_files(dir.path()).unwrap(), snap);
    m.append(evs(20..22)).await.unwrap();
    assert_eq!(
        seqs(&m.read_range(Seq(0), Seq(22)).unwrap()),
        (1..=22).collect::<Vec<_>>()
    );
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// A real crash: `kill -9` of a process that is appending and sealing.

const CHILD_ENV: &str = "TALLY_MASTER_CRASH_CHILD_DIR";
const CHILD_BATCH: u64 = 7;

/// The child side of `kill_9_loses_no_acknowledged_event_and_stores_no_partial_append`: a
/// no-op unless started by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child_appends_until_killed() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let c = MasterConfig {
        seal_max_events: 300,
        ..cfg(Path::new(&dir))
    };
    let m = Master::open(c).unwrap();
    let start = m.acked_seq().0;
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let m = m.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let b = start * 10 + t + i * 4; // unique batch id
                let events = (0..CHILD_BATCH)
                    .map(|k| Event {
                        id: Some(format!("b{b}-{k}")),
                        ..ev(b)
                    })
                    .collect();
                let r = m.append(events).await.unwrap();
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                writeln!(out, "acked {} {}", r.last.0, b).unwrap();
                out.flush().unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[test]
fn kill_9_loses_no_acknowledged_event_and_stores_no_partial_append() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let mut max_acked = 0u64;
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child_appends_until_killed",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acks = 0;
        while acks < 150 + round * 50 {
            let line = lines.next().expect("child output").unwrap();
            if let Some(rest) = line.strip_prefix("acked ") {
                let last: u64 = rest.split(' ').next().unwrap().parse().unwrap();
                max_acked = max_acked.max(last);
                acks += 1;
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Everything the child printed after this point was acknowledged too; read it.
        for line in lines.map_while(|l| l.ok()) {
            if let Some(rest) = line.strip_prefix("acked ") {
                max_acked = max_acked.max(rest.split(' ').next().unwrap().parse().unwrap());
            }
        }

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let m = Master::open(cfg(dir.path())).unwrap();
            let acked = m.acked_seq().0;
            assert!(
                acked >= max_acked,
                "acked {acked} < acknowledged {max_acked}"
            );
            let got = m.read_range(Seq(0), Seq(acked)).unwrap();
            assert_eq!(seqs(&got), (1..=acked).collect::<Vec<_>>());
            // Every append is there whole: ids b{batch}-0..CHILD_BATCH on consecutive seqs.
            let mut per_batch: HashMap<String, Vec<u64>> = HashMap::new();
            for e in &got {
                let id = e.event.id.clone().unwrap();
                let (b, _) = id.split_once('-').unwrap();
                per_batch.entry(b.to_owned()).or_default().push(e.seq.0);
            }
            for (b, s) in per_batch {
                assert_eq!(s.len() as u64, CHILD_BATCH, "append {b} is partial");
                assert!(s.windows(2).all(|w| w[1] == w[0] + 1));
            }
            m.close_unsealed().await;
            // (The sealer may be writing a temporary file while it runs; once stopped, none.)
            for entry in fs::read_dir(dir.path().join("master")).unwrap() {
                let name = entry.unwrap().file_name().to_string_lossy().into_owned();
                assert!(!name.ends_with(".tmp"), "tmp file {name} left behind");
            }
        });
    }
}

/// Every event the master dataset holds, read as a batch run reads it: the snapshot's files.
fn snapshot_seqs(m: &Master) -> Vec<u64> {
    let mut out = Vec::new();
    for f in m.snapshot().unwrap() {
        out.extend(seqs(&tally_master::read_master_file(&f.path).unwrap()));
    }
    out.sort_unstable();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_merges_small_files_and_every_reader_sees_each_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    // Ten small files, then a large one, then three small ones.
    for i in 0..10u64 {
        m.append(evs(i * 10..i * 10 + 10)).await.unwrap();
        m.seal().await.unwrap();
    }
    m.append(evs(100..3100)).await.unwrap();
    m.seal().await.unwrap();
    for i in 0..3u64 {
        m.append(evs(3100 + i * 5..3105 + i * 5)).await.unwrap();
        m.seal().await.unwrap();
    }
    let all: Vec<u64> = (1..=3115).collect();
    assert_eq!(m.snapshot().unwrap().len(), 14);
    let big = m.snapshot().unwrap()[10].size;
    let compact = tally_master::CompactConfig {
        small_bytes: big,
        target_bytes: big * 100,
        min_files: 4,
        retention: None,
    };
    // A pinned snapshot keeps its files until the pin goes: compaction waits for it.
    let pin = m.pin_files().await;
    let files = m.snapshot().unwrap();
    let pass = {
        let (m, c) = (m.clone(), compact.clone());
        tokio::spawn(async move { m.compact(&c).await })
    };
    // The merged file is written while the pin is held; its inputs stay until the pin goes.
    let merged_path = dir
        .path()
        .join("master")
        .join(tally_master::master_file_name(Seq(1), Seq(100)));
    wait_for(|| merged_path.exists()).await;
    assert!(
        files.iter().all(|f| f.path.exists()),
        "pinned files deleted"
    );
    assert_eq!(snapshot_seqs(&m), all);
    drop(pin);
    let out = pass.await.unwrap().unwrap();
    assert_eq!((out.merged, out.inputs, out.events), (1, 10, 100));
    assert_eq!(m.snapshot().unwrap().len(), 5);
    assert_eq!(parquet_files(dir.path()).len(), 5);
    assert_eq!(m.status().master_files, 5);
    assert_eq!(snapshot_seqs(&m), all);
    assert_eq!(seqs(&m.read_range(Seq(0), Seq(3115)).unwrap()).len(), 3115);
    let merged = &m.snapshot().unwrap()[0];
    assert_eq!((merged.first, merged.last), (Seq(1), Seq(100)));
    // The merged file holds the same events as its inputs, sorted by (url, ts) like a sealed file.
    let events = tally_master::read_master_file(&merged.path).unwrap();
    let mut by_seq = events.clone();
    by_seq.sort_by_key(|e| e.seq);
    assert_eq!(
        by_seq.iter().map(|e| e.event.clone()).collect::<Vec<_>>(),
        evs(0..100)
    );
    assert!(events
        .windows(2)
        .all(|w| (&w[0].event.url, w[0].event.ts) <= (&w[1].event.url, w[1].event.ts)));

    // Nothing more to do: the three small files at the end are fewer than min_files.
    let again = m.compact(&compact).await.unwrap();
    assert_eq!(again, tally_master::CompactOutcome::default());

    // `kill -9` between writing a merged file and deleting its inputs: both on disk. Readers
    // leave the covered inputs out; after a restart the next pass deletes them, and `seq` goes on
    // after the largest name.
    let tail: Vec<_> = m.snapshot().unwrap()[2..].to_vec();
    m.compact_write_merged_only(&tail).unwrap();
    assert_eq!(parquet_files(dir.path()).len(), 6);
    assert_eq!(snapshot_seqs(&m), all);
    assert_eq!(seqs(&m.read_range(Seq(0), Seq(3115)).unwrap()).len(), 3115);
    m.shutdown().await.unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    assert_eq!(snapshot_seqs(&m), all);
    let out = m.compact(&compact).await.unwrap();
    assert_eq!(out.covered_deleted, 3);
    assert_eq!(parquet_files(dir.path()).len(), 3);
    assert_eq!(snapshot_seqs(&m), all);
    let r = m.append(evs(0..1)).await.unwrap();
    assert_eq!(r.first, Seq(3116));
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_and_retention_rewrite_files_without_the_events_and_keep_their_names() {
    let dir = tempfile::tempdir().unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    let now = tally_core::now_ms();
    let day = tally_core::DAY_MS;
    // Files of old events, of new ones, and of both; one visitor everywhere.
    let event = |i: u64, ts: i64| Event {
        ts,
        url: format!("https://site{}.example/p{}", i % 3, i % 5),
        visitor: Some(if i % 4 == 0 {
            "alice".into()
        } else {
            format!("v{i}")
        }),
        referrer: None,
        id: None,
        received_at: now,
    };
    let mut all = Vec::new();
    for (n, age_days) in [(0u64, 90i64), (1, 1), (2, 0)] {
        let batch: Vec<Event> = (n * 100..n * 100 + 100)
            .map(|i| event(i, now - age_days * day - (i as i64 % 2) * 40 * day))
            .collect();
        all.extend(batch.clone());
        m.append(batch).await.unwrap();
        m.seal().await.unwrap();
    }
    let names = parquet_files(dir.path());
    assert_eq!(names.len(), 3);
    let held = |m: &Master| -> Vec<Event> {
        let mut out: Vec<SeqEvent> = Vec::new();
        for f in m.snapshot().unwrap() {
            out.extend(tally_master::read_master_file(&f.path).unwrap());
        }
        out.sort_by_key(|e| e.seq);
        out.into_iter().map(|e| e.event).collect()
    };

    let refused = tally_master::Forget::url_prefix("https://");
    assert!(refused.is_err());
    let site1 = tally_master::Forget::url_prefix("https://site1.example/").unwrap();
    let (files, dropped) = m.forget(&site1).await.unwrap();
    let want: Vec<Event> = all
        .iter()
        .filter(|e| !e.url.starts_with("https://site1.example/"))
        .cloned()
        .collect();
    assert_eq!((files, dropped as usize), (3, all.len() - want.len()));
    assert_eq!(held(&m), want);
    assert_eq!(
        parquet_files(dir.path()),
        names,
        "names (seq ranges) are kept"
    );

    let alice = tally_master::Forget::visitor("alice").unwrap();
    m.forget(&alice).await.unwrap();
    let want: Vec<Event> = want
        .into_iter()
        .filter(|e| e.visitor.as_deref() != Some("alice"))
        .collect();
    assert_eq!(held(&m), want);

    // Retention of 30 days: a compaction pass drops what is older, and only that.
    let keep = tally_master::CompactConfig {
        retention: Some(Duration::from_secs(30 * 86_400)),
        ..Default::default()
    };
    let out = m.compact(&keep).await.unwrap();
    let horizon = tally_core::now_ms() - 30 * day;
    let want: Vec<Event> = want.into_iter().filter(|e| e.ts >= horizon).collect();
    assert!(out.expired > 0);
    assert_eq!(held(&m), want);
    assert_eq!(m.compact(&keep).await.unwrap().expired, 0);
    // The first file held only old events: it stays, empty, so that seq never goes back.
    assert_eq!(parquet_files(dir.path()), names);
    m.shutdown().await.unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    assert_eq!(m.append(evs(0..1)).await.unwrap().first, Seq(301));
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// seqs given by the cluster log: gaps, redelivery, cuts at markers

fn tail_seqs(m: &Master, after: u64, max: usize) -> Option<Vec<u64>> {
    match m.tail_after(Seq(after), max) {
        Tail::Events(e) => Some(e.iter().map(|e| e.seq.0).collect()),
        Tail::Gone => None,
    }
}

#[tokio::test]
async fn log_given_seqs_with_gaps_are_kept_across_redelivery_cuts_sealing_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    // Queued one after another without awaiting: written in that order.
    let a = m.append_at(Seq(100), evs(0..3));
    let b = m.append_at(Seq(200), evs(3..5));
    let again = m.append_at(Seq(100), evs(0..3));
    let cut = m.cut_epoch_at(Seq(300));
    assert_eq!(
        a.await.unwrap(),
        SeqRange {
            first: Seq(100),
            last: Seq(102)
        }
    );
    assert_eq!(b.await.unwrap().last, Seq(201));
    // Delivered again: acknowledged, nothing written.
    assert_eq!(again.await.unwrap().first, Seq(100));
    assert_eq!(cut.await.unwrap(), Seq(300));
    assert_eq!(m.epochs(), vec![Seq(1), Seq(301)]);
    // The marker delivered again changes nothing.
    assert_eq!(m.cut_epoch_at(Seq(300)).await.unwrap(), Seq(300));
    assert_eq!(m.epochs(), vec![Seq(1), Seq(301)]);
    m.append_at(Seq(400), evs(5..6)).await.unwrap();
    // A cut behind what was appended is refused, as corruption of the log's order.
    let late = m.cut_epoch_at(Seq(350)).await.unwrap_err();
    assert!(matches!(late, Error::OutOfOrder(_)), "{late}");
    // After a refused cut, log appends wait until the follower starts over.
    assert!(m.append_at(Seq(450), evs(9..10)).await.is_err());
    m.resume_log().await.unwrap();
    assert_eq!(m.acked_seq(), Seq(400));

    // The tail finds the event after any seq, across the gaps.
    assert_eq!(
        tail_seqs(&m, 0, 10).unwrap(),
        vec![100, 101, 102, 200, 201, 400]
    );
    assert_eq!(tail_seqs(&m, 102, 10).unwrap(), vec![200, 201, 400]);
    assert_eq!(tail_seqs(&m, 150, 2).unwrap(), vec![200, 201]);
    assert_eq!(tail_seqs(&m, 201, 10).unwrap(), vec![400]);
    assert_eq!(tail_seqs(&m, 400, 10).unwrap(), Vec::<u64>::new());
    // Lag in events, counted across the gaps.
    assert_eq!(m.events_between(Seq(0), Seq(400)), 6);
    assert_eq!(m.events_between(Seq(101), Seq(300)), 3);
    assert_eq!(m.events_between(Seq(201), Seq(9999)), 1);
    assert_eq!(m.events_between(Seq(400), Seq(400)), 0);

    // Sealed through the cut, then the rest replayed from the WAL after a restart.
    assert!(m.seal().await.unwrap() >= Seq(300));
    m.append_at(Seq(500), evs(6..8)).await.unwrap();
    m.close_unsealed().await;
    let m = Master::open(cfg(dir.path())).unwrap();
    assert_eq!(m.acked_seq(), Seq(501));
    assert_eq!(m.epochs(), vec![Seq(1), Seq(301)]);
    let all = m.read_range(Seq(0), Seq(1000)).unwrap();
    assert_eq!(seqs(&all), vec![100, 101, 102, 200, 201, 400, 500, 501]);
    assert_eq!(all[5].event, ev(5));
    // Before the replayed tail's first event the tail cannot say what is missing: storage does
    // (and the lag is the seq difference, an upper bound).
    assert_eq!(tail_seqs(&m, 0, 10), None);
    assert_eq!(m.events_between(Seq(0), Seq(501)), 501);
    assert_eq!(m.events_between(Seq(499), Seq(501)), 2);
    assert_eq!(tail_seqs(&m, 499, 10).unwrap(), vec![500, 501]);
    // Redelivered after the restart: still nothing written twice.
    m.append_at(Seq(400), evs(5..6)).await.unwrap();
    m.append_at(Seq(600), evs(8..9)).await.unwrap();
    let all = m.read_range(Seq(0), Seq(1000)).unwrap();
    assert_eq!(
        seqs(&all),
        vec![100, 101, 102, 200, 201, 400, 500, 501, 600]
    );
    m.seal().await.unwrap();
    let files = m.snapshot().unwrap();
    let held: u64 = files
        .iter()
        .map(|f| read_master_seqs(&f.path).len() as u64)
        .sum();
    assert_eq!(held, 9);
    m.shutdown().await.unwrap();
}

fn read_master_seqs(path: &Path) -> Vec<u64> {
    let file = fs::File::open(path).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let col = batch.column_by_name("seq").unwrap();
        let col = col.as_any().downcast_ref::<UInt64Array>().unwrap();
        out.extend(col.values().iter().copied());
    }
    out
}

#[test]
fn events_encoded_for_the_log_decode_to_themselves_and_damage_is_refused() {
    let events = evs(0..20);
    let bytes = tally_master::encode_events(&events);
    assert_eq!(tally_master::decode_events(&bytes).unwrap(), events);
    for i in [0, 5, 9, bytes.len() / 2, bytes.len() - 1] {
        let mut bad = bytes.clone();
        bad[i] ^= 0x40;
        assert_eq!(tally_master::decode_events(&bad), None, "flipped byte {i}");
    }
    assert_eq!(tally_master::decode_events(&bytes[..bytes.len() - 1]), None);
    assert_eq!(tally_master::decode_events(b""), None);
}

#[tokio::test]
async fn after_a_failed_log_append_later_ones_wait_for_the_follower_to_start_over() {
    let dir = tempfile::tempdir().unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    m.inject_write_failures(1);
    let first = m.append_at(Seq(100), evs(0..2));
    let second = m.append_at(Seq(200), evs(2..3));
    let cut = m.cut_epoch_at(Seq(300));
    assert!(matches!(first.await, Err(Error::Unavailable { .. })));
    // Written after the gap, the next message would hide it from a follower resuming after
    // the last seq written: refused instead, the cut too.
    assert!(matches!(second.await, Err(Error::Unavailable { .. })));
    assert!(matches!(cut.await, Err(Error::Unavailable { .. })));
    assert_eq!(m.acked_seq(), Seq(0));
    assert_eq!(m.epochs(), vec![Seq(1)]);
    // The follower starts over from where the WAL ends.
    m.resume_log().await.unwrap();
    m.append_at(Seq(100), evs(0..2)).await.unwrap();
    m.append_at(Seq(200), evs(2..3)).await.unwrap();
    m.cut_epoch_at(Seq(300)).await.unwrap();
    let all = m.read_range(Seq(0), Seq(1000)).unwrap();
    assert_eq!(seqs(&all), vec![100, 101, 200]);
    assert_eq!(m.epochs(), vec![Seq(1), Seq(301)]);
    m.shutdown().await.unwrap();
}

/// Cluster mode's `seq`s are sparse (message `n`'s events at `n << 17`): a storage read of a
/// fixed `seq` span could bring two events or a whole file. `storage_window` sizes each read in
/// events, from the files' row counts, so a reader walks the history in few reads, every event
/// once and in order.
#[tokio::test]
async fn storage_windows_count_events_not_seqs_when_seqs_are_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let m = Master::open(cfg(dir.path())).unwrap();
    let mut expected = Vec::new();
    let mut next = 0u64;
    for n in 1..=300u64 {
        // Two hundred one-event messages, then a hundred of fifty events.
        let k = if n <= 200 { 1 } else { 50 };
        let first = n << 17;
        m.append_at(Seq(first), evs(next..next + k)).await.unwrap();
        expected.extend((0..k).map(|i| first + i));
        next += k;
        if n == 150 || n == 250 {
            m.seal().await.unwrap();
        }
    }
    assert!(m.snapshot().unwrap().len() >= 2);
    let acked = m.acked_seq();
    let (mut pos, mut read, mut reads) = (Seq::ZERO, Vec::new(), 0);
    while pos < acked {
        let through = m.storage_window(pos, 1_000).unwrap();
        assert!(through > pos, "no progress after {pos}");
        let events = m.read_range(pos, through).unwrap();
        assert!(events.len() <= 2_500, "{} events in one read", events.len());
        read.extend(seqs(&events));
        pos = through;
        reads += 1;
    }
    assert_eq!(read, expected);
    // 5 200 events: a few reads per file and the WAL (a 250 000-seq span would take 150).
    assert!(reads <= 15, "{reads} reads");
}
