//! The master dataset: the write-ahead log (append with group commit, replay), sealing WAL
//! segments into immutable Parquet files under `data_dir/master/`, and reading a snapshot.
//!
//! This file pins the public API that the rest of tally is written against. Bodies marked
//! `unimplemented!` are filled in by the implementation; signatures change only by agreement.

use std::path::PathBuf;
use std::time::Duration;

use tally_core::{Event, Seq};
use thiserror::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum Error {
    /// The events could not be made durable (disk full, I/O error). Nothing of that append is
    /// acknowledged; the caller answers 503. The store recovers by itself when writes succeed again.
    #[error("events could not be made durable: {0}")]
    Unavailable(String),
    /// The store is shutting down or closed.
    #[error("the store is closed")]
    Closed,
    /// A WAL record with a bad checksum that is not the torn tail.
    #[error("corrupt WAL record in {file} at offset {offset}: {reason}")]
    CorruptWal { file: PathBuf, offset: u64, reason: String },
    #[error("i/o error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("parquet error on {path}: {message}")]
    Parquet { path: PathBuf, message: String },
}

/// How the master dataset is run (from the `storage` and `ingest` config sections).
#[derive(Debug, Clone)]
pub struct MasterConfig {
    pub data_dir: PathBuf,
    /// Seal the open WAL segment after this long (default 60 s).
    pub seal_interval: Duration,
    /// Seal the open WAL segment once it holds this many events.
    pub seal_max_events: usize,
    /// `true`: fsync before acknowledging (the default and the contract). `false` only for
    /// benchmarks that say so.
    pub fsync: bool,
    /// How many recent events the in-memory tail keeps for the speed layer.
    pub tail_capacity: usize,
}

/// The `seq` range given to one append: `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRange {
    pub first: Seq,
    pub last: Seq,
}

/// An event with the `seq` the WAL gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqEvent {
    pub seq: Seq,
    pub event: Event,
}

/// One sealed Parquet file of the master dataset holding the events `first..=last`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterFile {
    pub path: PathBuf,
    pub first: Seq,
    pub last: Seq,
    pub size: u64,
}

/// What the in-memory tail can give a reader that wants the events after some `seq`.
#[derive(Debug)]
pub enum Tail {
    /// The events after the requested `seq`, in order, at most the requested number (possibly
    /// empty when the reader is caught up).
    Events(Vec<std::sync::Arc<SeqEvent>>),
    /// The tail no longer holds the event right after the requested `seq`: read from storage
    /// with [`Master::read_range`].
    Gone,
}

/// Counters for `/v1/admin/status` and `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct MasterStatus {
    pub acked_seq: Seq,
    pub sealed_seq: Seq,
    pub wal_bytes: u64,
    pub master_files: usize,
}

/// Handle to the master dataset. Cheap to clone; all clones share one WAL writer.
#[derive(Clone)]
pub struct Master {
    _private: (),
}

impl Master {
    /// Opens the store under `cfg.data_dir`: removes leftover temporary files, replays the WAL
    /// (truncating a torn tail), and starts the writer and sealer. Must be called inside a
    /// tokio runtime.
    pub fn open(cfg: MasterConfig) -> Result<Master> {
        let _ = cfg;
        unimplemented!()
    }

    /// Appends the events as one all-or-nothing record. Resolves after the fsync that covers
    /// them (group commit: concurrent appends share one fsync).
    pub async fn append(&self, events: Vec<Event>) -> Result<SeqRange> {
        let _ = events;
        unimplemented!()
    }

    /// Closes the open speed-layer epoch: returns `C`, the last `seq` appended so far, and
    /// durably records that a new epoch starts at `C + 1`. Atomic with respect to appends.
    pub async fn cut_epoch(&self) -> Result<Seq> {
        unimplemented!()
    }

    /// Start `seq`s of the known epochs, ascending. The first epoch starts at `Seq(1)`.
    pub fn epochs(&self) -> Vec<Seq> {
        unimplemented!()
    }

    /// Forgets the epochs that end at or before `start` (every epoch with a start below it,
    /// except that the list always keeps the epoch containing `start`).
    pub fn forget_epochs_before(&self, start: Seq) -> Result<()> {
        let _ = start;
        unimplemented!()
    }

    /// Seals everything acknowledged so far into Parquet; returns the sealed-through `seq`.
    pub async fn seal(&self) -> Result<Seq> {
        unimplemented!()
    }

    /// The last acknowledged (durable) `seq`.
    pub fn acked_seq(&self) -> Seq {
        unimplemented!()
    }

    /// Notified with the acknowledged `seq` after every group commit.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Seq> {
        unimplemented!()
    }

    /// Recent events after `after`, from memory.
    pub fn tail_after(&self, after: Seq, max: usize) -> Tail {
        let _ = (after, max);
        unimplemented!()
    }

    /// The events with `after < seq <= through`, in `seq` order, read from the sealed files and
    /// the WAL. Blocking: call from `spawn_blocking`.
    pub fn read_range(&self, after: Seq, through: Seq) -> Result<Vec<SeqEvent>> {
        let _ = (after, through);
        unimplemented!()
    }

    /// The sealed files that make up the master dataset now (files covered by a compacted file
    /// are left out), ordered by `first`.
    pub fn snapshot(&self) -> Result<Vec<MasterFile>> {
        unimplemented!()
    }

    pub fn status(&self) -> MasterStatus {
        unimplemented!()
    }

    /// Seals what is left and stops the writer. Appends after this fail with `Closed`.
    pub async fn shutdown(&self) -> Result<()> {
        unimplemented!()
    }
}
