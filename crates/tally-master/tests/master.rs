//! Integration tests of the master dataset: WAL replay, group commit, sealing, epochs.

use std::path::Path;
use std::time::Duration;

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

fn wal_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
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
    assert_eq!(
        all.iter().map(|e| e.seq.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(all[3].event, ev(3));
    m.shutdown().await.unwrap();
    assert!(matches!(m.append(evs(0..1)).await, Err(Error::Closed)));

    let m = Master::open(cfg(dir.path())).unwrap();
    assert_eq!(m.acked_seq(), Seq(5));
    assert_eq!(m.status().sealed_seq, Seq(5));
    let r = m.append(evs(5..6)).await.unwrap();
    assert_eq!(r.first, Seq(6));
    let all: Vec<SeqEvent> = m.read_range(Seq(2), Seq(6)).unwrap();
    assert_eq!(
        all.iter().map(|e| e.seq.0).collect::<Vec<_>>(),
        vec![3, 4, 5, 6]
    );
    m.shutdown().await.unwrap();
    let _ = wal_files(dir.path());
}
