//! The master dataset: the write-ahead log (append with group commit, replay), sealing WAL
//! segments into immutable Parquet files under `data_dir/master/`, and reading a snapshot.
//!
//! This file is the public API the rest of tally is written against: the other crates use
//! nothing else of the master dataset.
//!
//! Layout under `data_dir`:
//!
//! - `wal/{first_seq:020}.wal` — WAL segments (framing in [`wal`](self) docs: header, then
//!   `len | crc32c | first_seq | payload` records, one per [`Master::append`]);
//! - `master/{first:020}-{last:020}.parquet` — sealed files, schema [`master_schema`];
//! - `epochs.json` — the speed-layer epoch starts.
//!
//! Threads: one writer (`writer.rs`) assigns `seq`, owns the open segment and does group
//! commit (one write + one `fdatasync` per group); one sealer (`seal.rs`) turns closed
//! segments into Parquet. The async methods only talk to them through channels.
//!
//! `seq` never goes back across restarts: at open the next `seq` is the largest of the WAL
//! contents, the segment names (the open segment is named by the next `seq` even while
//! empty), the sealed file names and the last epoch start. Sealed files are deleted only by
//! compaction ([`Master::compact`]), whose merged file keeps the largest name, so no separate
//! high-water mark file is needed.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tally_core::{Event, Seq};
use thiserror::Error;
use tokio::sync::{oneshot, watch};

pub mod compact;
mod dataset_id;
mod epochs;
pub mod metrics;
mod parquet_io;
mod paths;
mod recovery;
mod seal;
mod wal;
mod writer;

pub use compact::{CompactConfig, CompactOutcome, Forget};
pub use dataset_id::DATASET_ID_FILE;
pub use parquet_io::{
    master_schema, read_master_file, read_master_file_range, write_master_file, ROW_GROUP_ROWS,
};
pub use paths::{
    list_master_files, master_file_name, parse_master_file_name, EPOCHS_FILE, MASTER_DIR, WAL_DIR,
};
pub use wal::{decode_events, encode_events};

use epochs::Epochs;
use paths::DataPaths;
use recovery::recover;
use seal::{Sealer, SealerCmd};
use writer::{Writer, WriterCmd};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Name of the WAL writer thread in [`Master::stopped_threads`] and [`Error::ThreadStopped`].
pub const WAL_WRITER: &str = "WAL writer";
/// Name of the sealer thread in [`Master::stopped_threads`].
pub const SEALER: &str = "sealer";

#[derive(Debug, Error)]
pub enum Error {
    /// The events could not be made durable (disk full, I/O error). Nothing of that append is
    /// acknowledged; the caller answers 503. The store recovers by itself when writes succeed again.
    #[error("events could not be made durable: {what}")]
    Unavailable {
        /// What failed, and on which file.
        what: String,
        /// Shared: a failed group write answers every append of the group with it.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The store is shutting down or closed.
    #[error("the store is closed")]
    Closed,
    /// One of the store's threads (the WAL writer, the sealer) stopped while the store is open:
    /// a bug (a panic), logged where it happened. Nothing more can be made durable until the
    /// process restarts (which replays the WAL: nothing acknowledged is lost).
    #[error("the {0} thread stopped; restart tally")]
    ThreadStopped(&'static str),
    /// The log delivered a cut marker behind events already appended: a bug or a log that
    /// lost order; nothing is changed.
    #[error("out of order: {0}")]
    OutOfOrder(String),
    /// A WAL record with a bad checksum that is not the torn tail.
    #[error("corrupt WAL record in {file} at offset {offset}: {reason}")]
    CorruptWal {
        file: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file could not be read or written as Parquet (the source says why).
    #[error("parquet error on {path}: {source}")]
    Parquet {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A master file lacks a column or has one of the wrong type, or would be empty.
    #[error("unexpected master file {path}: {reason}")]
    Schema { path: PathBuf, reason: String },
}

impl Error {
    /// Whether this failure is corruption, transient, or the caller's mistake.
    pub fn kind(&self) -> tally_core::error::ErrorKind {
        use tally_core::error::ErrorKind;
        match self {
            Error::CorruptWal { .. }
            | Error::Parquet { .. }
            | Error::Schema { .. }
            | Error::OutOfOrder(_) => ErrorKind::Corrupt,
            Error::Unavailable { .. }
            | Error::Closed
            | Error::ThreadStopped(_)
            | Error::Io { .. } => ErrorKind::Transient,
        }
    }
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

/// State shared by the handle, the writer thread and the sealer thread.
pub(crate) struct Shared {
    pub(crate) paths: DataPaths,
    /// Random id of this master dataset's history (`data_dir/dataset_id`).
    pub(crate) dataset_id: String,
    pub(crate) fsync: bool,
    pub(crate) acked: AtomicU64,
    pub(crate) sealed: AtomicU64,
    pub(crate) wal_bytes: AtomicU64,
    pub(crate) master_files: AtomicUsize,
    /// First seq of the open segment: every segment named below it is closed.
    pub(crate) open_first: AtomicU64,
    /// Recent acknowledged events; `acked` is stored under this lock too.
    pub(crate) tail: Mutex<TailBuf>,
    pub(crate) tail_capacity: usize,
    pub(crate) epochs: Epochs,
    pub(crate) watch: watch::Sender<Seq>,
    pub(crate) closed: AtomicBool,
    /// Test hook: fail this many group writes (see [`Master::inject_write_failures`]).
    pub(crate) fail_writes: AtomicUsize,
    /// Test hook: the writer panics at its next commit.
    pub(crate) panic_writer: AtomicBool,
    /// Events handed from the writer to the sealer in memory and not sealed yet.
    pub(crate) handed_over: AtomicUsize,
    /// Held for reading by whoever reads a snapshot's files ([`Master::pin_files`]), for
    /// writing by compaction while it deletes files.
    pub(crate) files_lock: Arc<tokio::sync::RwLock<()>>,
    /// One rewrite of the master files at a time: a deletion request (its listing and every
    /// file it rewrites) and a compaction merge (reading its inputs until they are deleted).
    /// Otherwise a merge that read a file before a deletion rewrote it would bring the deleted
    /// events back in the merged file.
    pub(crate) rewrites: tokio::sync::Mutex<()>,
}

/// The in-memory tail: every acknowledged event after `complete_after`, in `seq` order. (With
/// `seq`s given by the cluster log, `seq`s have gaps, so the tail's first event alone does not
/// say whether an event before it is missing.)
#[derive(Default)]
pub(crate) struct TailBuf {
    pub(crate) events: VecDeque<Arc<SeqEvent>>,
    pub(crate) complete_after: Seq,
}

/// While held, no master file is deleted (see [`Master::pin_files`]).
pub type FilesPin = tokio::sync::OwnedRwLockReadGuard<()>;

struct Inner {
    shared: Arc<Shared>,
    writer: mpsc::Sender<WriterCmd>,
    sealer: mpsc::Sender<SealerCmd>,
    /// The store's threads, by name, until shutdown joins them.
    threads: Mutex<Vec<(&'static str, JoinHandle<()>)>>,
}

/// Handle to the master dataset. Cheap to clone; all clones share one WAL writer.
#[derive(Clone)]
pub struct Master {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Master")
            .field("data_dir", &self.inner.shared.paths.root)
            .field("acked_seq", &self.acked_seq())
            .finish()
    }
}

impl Master {
    /// Opens the store under `cfg.data_dir`: removes leftover temporary files, replays the WAL
    /// (truncating a torn tail), and starts the writer and sealer. Must be called inside a
    /// tokio runtime.
    pub fn open(cfg: MasterConfig) -> Result<Master> {
        let paths = DataPaths::new(&cfg.data_dir);
        paths.create_dirs()?;
        let swept = paths::sweep_tmp(&paths.master)? + paths::sweep_tmp(&paths.wal)?;
        let epochs_tmp = paths.root.join(format!("{EPOCHS_FILE}.tmp"));
        let _ = std::fs::remove_file(&epochs_tmp);
        if swept > 0 {
            tracing::info!(files = swept, "removed leftover temporary files");
        }
        let dataset_id = dataset_id::load_or_create(&paths.root)?;
        let epochs = Epochs::load(&paths.epochs)?;
        let rec = recover(&paths, &cfg, &epochs)?;
        let acked = rec.next_seq - 1;
        let sealed = rec.oldest_unsealed.map_or(acked, |s| s.0 - 1);
        let master_files = list_master_files(&paths.root)?.len();
        let open_first = rec.open.as_ref().map_or(rec.next_seq, |o| o.seg.first.0);
        tracing::info!(
            acked_seq = acked,
            sealed_seq = sealed,
            master_files,
            "master dataset opened"
        );

        let (watch_tx, _) = watch::channel(Seq(acked));
        let shared = Arc::new(Shared {
            paths,
            dataset_id,
            fsync: cfg.fsync,
            acked: AtomicU64::new(acked),
            sealed: AtomicU64::new(sealed),
            wal_bytes: AtomicU64::new(rec.wal_bytes),
            master_files: AtomicUsize::new(master_files),
            open_first: AtomicU64::new(open_first),
            tail: Mutex::new(rec.tail),
            tail_capacity: cfg.tail_capacity,
            epochs,
            watch: watch_tx,
            closed: AtomicBool::new(false),
            fail_writes: AtomicUsize::new(0),
            panic_writer: AtomicBool::new(false),
            handed_over: AtomicUsize::new(0),
            files_lock: Arc::new(tokio::sync::RwLock::new(())),
            rewrites: tokio::sync::Mutex::new(()),
        });
        let (sealer_tx, sealer_rx) = mpsc::channel();
        let (writer_tx, writer_rx) = mpsc::channel();
        let sealer = Sealer {
            shared: shared.clone(),
            retry: cfg.seal_interval.max(Duration::from_millis(10)),
            handed: std::collections::HashMap::new(),
        };
        let writer = Writer {
            shared: shared.clone(),
            seal_interval: cfg.seal_interval,
            seal_max_events: cfg.seal_max_events.max(1) as u64,
            seg: rec.open,
            next_seq: rec.next_seq,
            needs_repair: false,
            log_failed: false,
            sealer: sealer_tx.clone(),
            buf: Vec::with_capacity(1 << 20),
            // The recovered open segment's events are only partly in memory: read it back.
            seg_events: None,
        };
        let spawn_err = |e| Error::Io {
            path: cfg.data_dir.clone(),
            source: e,
        };
        let h1 = std::thread::Builder::new()
            .name("tally-sealer".into())
            .spawn(move || sealer.run(sealer_rx))
            .map_err(spawn_err)?;
        let h2 = std::thread::Builder::new()
            .name("tally-wal-writer".into())
            .spawn(move || writer.run(writer_rx))
            .map_err(spawn_err)?;
        if rec.closed_segments > 0 {
            let _ = sealer_tx.send(SealerCmd::Kick);
        }
        Ok(Master {
            inner: Arc::new(Inner {
                shared,
                writer: writer_tx,
                sealer: sealer_tx,
                threads: Mutex::new(vec![(SEALER, h1), (WAL_WRITER, h2)]),
            }),
        })
    }

    async fn ask_writer<T: Send + 'static>(
        &self,
        cmd: impl FnOnce(oneshot::Sender<Result<T>>) -> WriterCmd,
    ) -> Result<T> {
        self.queue_to_writer(cmd).await
    }

    /// The store's threads that stopped while it is open (by a panic): `"WAL writer"` (then
    /// appends fail with [`Error::ThreadStopped`]) or `"sealer"` (then the WAL grows unsealed).
    /// Empty while they run, and after shutdown.
    pub fn stopped_threads(&self) -> Vec<&'static str> {
        if self.inner.shared.closed.load(Ordering::SeqCst) {
            return Vec::new();
        }
        tally_core::sync::lock(&self.inner.threads)
            .iter()
            .filter(|(_, h)| h.is_finished())
            .map(|(name, _)| *name)
            .collect()
    }

    async fn ask_sealer(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .sealer
            .send(SealerCmd::SealNow { reply: tx })
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Appends the events as one all-or-nothing record. Resolves after the fsync that covers
    /// them (group commit: concurrent appends share one fsync).
    pub async fn append(&self, events: Vec<Event>) -> Result<SeqRange> {
        self.ask_writer(|reply| WriterCmd::Append {
            events,
            at: None,
            reply,
        })
        .await
    }

    /// Appends events whose `seq`s the cluster log gave: `first..first + len`. `first` must be
    /// above every `seq` appended so far, or the append is one delivered again, which is
    /// acknowledged without writing anything (the log redelivers after a reconnect).
    ///
    /// Queued to the writer when called, not when the future is first polled: calls made one
    /// after another are written in that order, so a follower of the log can keep many in
    /// flight (and share fsyncs) without awaiting each.
    pub fn append_at(
        &self,
        first: Seq,
        events: Vec<Event>,
    ) -> impl std::future::Future<Output = Result<SeqRange>> + Send + 'static {
        self.queue_to_writer(move |reply| WriterCmd::Append {
            events,
            at: Some(first),
            reply,
        })
    }

    /// Closes the open epoch at `c`, a cut marker's position in the cluster log: every event
    /// appended so far must be at or below it. A cut already made (the marker delivered again)
    /// returns `c` and changes nothing. Queued when called, like [`Master::append_at`].
    pub fn cut_epoch_at(
        &self,
        c: Seq,
    ) -> impl std::future::Future<Output = Result<Seq>> + Send + 'static {
        self.queue_to_writer(move |reply| WriterCmd::CutEpoch { at: Some(c), reply })
    }

    /// Takes appends and cuts with log seqs again after one failed (until then the writer
    /// refuses them, so that none lands after the gap the failure left). The log's follower
    /// calls it when it starts over, before it asks where to resume; queued behind whatever it
    /// had in flight.
    pub async fn resume_log(&self) -> Result<()> {
        self.ask_writer(|reply| WriterCmd::ResumeLog { reply })
            .await
    }

    /// Sends `cmd` to the writer now; the future resolves with its answer.
    fn queue_to_writer<T: Send + 'static>(
        &self,
        cmd: impl FnOnce(oneshot::Sender<Result<T>>) -> WriterCmd,
    ) -> impl std::future::Future<Output = Result<T>> + Send + 'static {
        let shared = self.inner.shared.clone();
        let gone = move || {
            if shared.closed.load(Ordering::SeqCst) {
                Error::Closed
            } else {
                Error::ThreadStopped(WAL_WRITER)
            }
        };
        let (tx, rx) = oneshot::channel();
        let sent = if self.inner.shared.closed.load(Ordering::SeqCst) {
            Err(Error::Closed)
        } else {
            self.inner.writer.send(cmd(tx)).map_err(|_| gone())
        };
        async move {
            sent?;
            rx.await.map_err(|_| gone())?
        }
    }

    /// Closes the open speed-layer epoch: returns `C`, the last `seq` appended so far, and
    /// durably records that a new epoch starts at `C + 1`. Atomic with respect to appends.
    pub async fn cut_epoch(&self) -> Result<Seq> {
        self.ask_writer(|reply| WriterCmd::CutEpoch { at: None, reply })
            .await
    }

    /// The random id of this master dataset's history, created with it (`data_dir/dataset_id`).
    /// Derived state kept elsewhere is tagged with it so that state of another history is
    /// never mistaken for this one's.
    pub fn dataset_id(&self) -> &str {
        &self.inner.shared.dataset_id
    }

    /// Start `seq`s of the known epochs, ascending. The first epoch starts at `Seq(1)`.
    pub fn epochs(&self) -> Vec<Seq> {
        self.inner.shared.epochs.get()
    }

    /// Forgets the epochs that end at or before `start` (every epoch with a start below it,
    /// except that the list always keeps the epoch containing `start`). Writes `epochs.json`
    /// durably (a small blocking write).
    pub fn forget_epochs_before(&self, start: Seq) -> Result<()> {
        self.inner.shared.epochs.forget_before(start)
    }

    /// Seals everything acknowledged so far into Parquet; returns the sealed-through `seq`.
    pub async fn seal(&self) -> Result<Seq> {
        let info = self.ask_writer(|reply| WriterCmd::Rotate { reply }).await?;
        self.ask_sealer().await?;
        Ok(info.through)
    }

    /// The last acknowledged (durable) `seq`.
    pub fn acked_seq(&self) -> Seq {
        Seq(self.inner.shared.acked.load(Ordering::SeqCst))
    }

    /// Notified with the acknowledged `seq` after every group commit.
    pub fn subscribe(&self) -> watch::Receiver<Seq> {
        self.inner.shared.watch.subscribe()
    }

    /// Recent events after `after`, from memory.
    pub fn tail_after(&self, after: Seq, max: usize) -> Tail {
        let tail = tally_core::sync::lock(&self.inner.shared.tail);
        let acked = self.inner.shared.acked.load(Ordering::SeqCst);
        if after.0 >= acked {
            return Tail::Events(Vec::new());
        }
        if after < tail.complete_after {
            return Tail::Gone;
        }
        let events = &tail.events;
        // Dense `seq`s (one node): the index is the offset from the front.
        let start = match events.front() {
            Some(front) if after >= front.seq => {
                let guess = (after.0 + 1 - front.seq.0) as usize;
                if events
                    .get(guess.wrapping_sub(1))
                    .is_some_and(|e| e.seq == after)
                {
                    guess
                } else {
                    events.partition_point(|e| e.seq <= after)
                }
            }
            _ => 0,
        };
        let end = events.len().min(start.saturating_add(max));
        Tail::Events(events.range(start..end).cloned().collect())
    }

    /// When the oldest acknowledged event not yet in a master file was received (ms since the
    /// epoch): how far sealing — cluster mode's archiving — is behind, in time. `None` when
    /// every event is sealed. When unsealed events reach back beyond the in-memory tail, the
    /// tail's oldest: a lower bound of the lag, never a zero.
    pub fn oldest_unsealed_received_at(&self) -> Option<i64> {
        let sealed = Seq(self.inner.shared.sealed.load(Ordering::SeqCst));
        let acked = Seq(self.inner.shared.acked.load(Ordering::SeqCst));
        if sealed >= acked {
            return None;
        }
        let tail = tally_core::sync::lock(&self.inner.shared.tail);
        let i = tail.events.partition_point(|e| e.seq <= sealed);
        tail.events.get(i).map(|e| e.event.received_at)
    }

    /// How many acknowledged events have a `seq` in `after..=through`: counted in the tail
    /// while it holds them (the usual case), else the `seq` difference — exact for one node,
    /// whose `seq`s are dense; an upper bound with the cluster log's gaps.
    pub fn events_between(&self, after: Seq, through: Seq) -> u64 {
        let tail = tally_core::sync::lock(&self.inner.shared.tail);
        let through = through.min(Seq(self.inner.shared.acked.load(Ordering::SeqCst)));
        if through <= after {
            return 0;
        }
        if after < tail.complete_after {
            return through.0 - after.0;
        }
        let from = tail.events.partition_point(|e| e.seq <= after);
        let to = tail.events.partition_point(|e| e.seq <= through);
        (to - from) as u64
    }

    /// The end of the next window to read from storage after `after` so that
    /// [`read_range`](Self::read_range) brings about `events` events (never more than one
    /// master file's, or the rest of the WAL): `seq`s are dense on a single node but not in
    /// cluster mode, where 250 000 `seq`s may hold two events or 250 000. A master file's row
    /// count (its Parquet footer) and `seq` range give the density within it; the WAL is read to
    /// the end of the segment holding the next `seq` (a segment is bounded by the seal
    /// threshold). Blocking.
    pub fn storage_window(&self, after: Seq, events: usize) -> Result<Seq> {
        let acked = self.acked_seq();
        let mut attempt = 0;
        let next_file = loop {
            attempt += 1;
            let files = list_master_files(&self.inner.shared.paths.root)?;
            let Some(f) = files.into_iter().find(|f| f.last > after) else {
                break None;
            };
            if f.first > after.next() {
                // A gap before the next file: events there (if any) are in the WAL.
                return Ok(Seq(f.first.0 - 1));
            }
            match parquet_io::row_count(&f.path) {
                // Compaction merged it into a file the next listing finds.
                Err(Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound && attempt < 10 => {}
                Err(e) => return Err(e),
                Ok(rows) => break Some((f, rows)),
            }
        };
        if let Some((f, rows)) = next_file {
            let rows = rows.max(1);
            let seqs_per_event = (f.last.0 - f.first.0 + 1) as f64 / rows as f64;
            let span = (events.max(1) as f64 * seqs_per_event).ceil() as u64;
            return Ok(Seq(after.0.saturating_add(span.max(1)).min(f.last.0)));
        }
        let segments = paths::list_segments(&self.inner.shared.paths.wal)?;
        let end = segments
            .iter()
            .enumerate()
            .map(|(i, seg)| {
                segments
                    .get(i + 1)
                    .map_or(acked, |s| Seq(s.first.0 - 1))
                    .max(seg.first)
            })
            .find(|&end| end > after)
            .unwrap_or(acked);
        Ok(end.min(acked).max(after))
    }

    /// The events with `after < seq <= through`, in `seq` order, read from the sealed files and
    /// the WAL. Blocking: call from `spawn_blocking`. `through` is capped at the acknowledged
    /// `seq`.
    pub fn read_range(&self, after: Seq, through: Seq) -> Result<Vec<SeqEvent>> {
        let through = through.min(self.acked_seq());
        if through <= after {
            return Ok(Vec::new());
        }
        let paths = &self.inner.shared.paths;
        let mut attempt = 0;
        'retry: loop {
            attempt += 1;
            // Segments first, then files: a segment sealed in between is then found as a file.
            let segments = paths::list_segments(&paths.wal)?;
            let files = list_master_files(&paths.root)?;
            let mut out = Vec::new();
            for f in files
                .iter()
                .filter(|f| f.last > after && f.first <= through)
            {
                match read_master_file_range(&f.path, after, through) {
                    Ok(events) => out.extend(events),
                    // Compaction merged it into a file the next listing finds.
                    Err(Error::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound && attempt < 10 =>
                    {
                        continue 'retry
                    }
                    Err(e) => return Err(e),
                }
            }
            let in_file = |seq: Seq| {
                let i = files.partition_point(|f| f.first <= seq);
                i > 0 && files[i - 1].last >= seq
            };
            for (i, seg) in segments.iter().enumerate() {
                let next_first = segments.get(i + 1).map_or(u64::MAX, |s| s.first.0);
                if seg.first > through || next_first <= after.0 + 1 {
                    continue;
                }
                match wal::read_segment_events(seg, after, through)? {
                    Some((_, events)) => out.extend(events.into_iter().filter(|e| !in_file(e.seq))),
                    None if attempt < 10 => continue 'retry,
                    None => {
                        return Err(Error::Io {
                            path: seg.path.clone(),
                            source: std::io::Error::new(
                                std::io::ErrorKind::NotFound,
                                "wal segment vanished while reading",
                            ),
                        })
                    }
                }
            }
            out.sort_unstable_by_key(|e| e.seq);
            return Ok(out);
        }
    }

    /// The sealed files that make up the master dataset now (files covered by a compacted file
    /// are left out), ordered by `first`.
    pub fn snapshot(&self) -> Result<Vec<MasterFile>> {
        list_master_files(&self.inner.shared.paths.root)
    }

    /// Keeps every master file on disk until the pin is dropped: take it before
    /// [`snapshot`](Self::snapshot) and hold it while reading the snapshot's files (compaction
    /// deletes the files it merged only when no pin is held).
    pub async fn pin_files(&self) -> FilesPin {
        self.inner.shared.files_lock.clone().read_owned().await
    }

    /// Rewrites `file` without the events `forget` matches, holding the files lock for writing
    /// (no batch run reads it meanwhile). Returns the events dropped.
    async fn rewrite(
        &self,
        file: &MasterFile,
        forget: &Forget,
        through: Seq,
        reason: &'static str,
    ) -> Result<u64> {
        let shared = &self.inner.shared;
        let _w = shared.files_lock.clone().write_owned().await;
        let (f, what, fsync) = (file.clone(), forget.clone(), shared.fsync);
        let dropped = blocking(&file.path, move || {
            compact::rewrite_without(&f, &what, through, fsync)
        })
        .await?;
        if dropped > 0 {
            ::metrics::counter!(metrics::EVENTS_DROPPED, "reason" => reason).increment(dropped);
            tracing::warn!(
                file = %file.path.display(),
                events = dropped,
                reason,
                "master file rewritten without events"
            );
        }
        Ok(dropped)
    }

    /// A deletion request (`tally master forget`): seals everything acknowledged, then rewrites
    /// every master file that holds an event `forget` matches without those events — the one
    /// deliberate exception to "immutable". Returns `(files rewritten, events dropped)`. The
    /// views still count them until the next batch run (which reads only the rewritten files
    /// again: their partials no longer match).
    pub async fn forget(&self, forget: &Forget) -> Result<(usize, u64)> {
        self.forget_through(forget, Seq(u64::MAX)).await
    }

    /// [`forget`](Self::forget) of the events with `seq <= through` only: cluster mode applies
    /// a deletion request at its place in the log, so every node drops the same events whatever
    /// it has read beyond. Every event up to `through` must be acknowledged here already.
    pub async fn forget_through(&self, forget: &Forget, through: Seq) -> Result<(usize, u64)> {
        self.seal().await?;
        let _one = self.inner.shared.rewrites.lock().await;
        let dir = self.inner.shared.paths.master.clone();
        let root = self.inner.shared.paths.root.clone();
        let files = blocking(&dir, move || list_master_files(&root)).await?;
        let (mut rewritten, mut dropped) = (0, 0);
        for f in files.iter().filter(|f| f.first <= through) {
            let n = self.rewrite(f, forget, through, "forget").await?;
            if n > 0 {
                rewritten += 1;
                dropped += n;
            }
        }
        tracing::warn!(
            ?forget,
            files = rewritten,
            events = dropped,
            "deletion request done"
        );
        Ok((rewritten, dropped))
    }

    /// One compaction pass ([`compact`]): deletes files a merged file covers (left by an
    /// interrupted pass), then merges each run of small neighbouring files into one. Every
    /// listing answers each event exactly once throughout.
    pub async fn compact(&self, cfg: &CompactConfig) -> Result<CompactOutcome> {
        let shared = self.inner.shared.clone();
        let dir = shared.paths.master.clone();
        let fsync = shared.fsync;
        let mut out = CompactOutcome::default();
        let d = dir.clone();
        let covered = blocking(&dir, move || compact::covered(&d)).await?;
        if !covered.is_empty() {
            let _w = shared.files_lock.clone().write_owned().await;
            let (d, c) = (dir.clone(), covered.clone());
            blocking(&dir, move || compact::delete(&d, &c, fsync)).await?;
            out.covered_deleted = covered.len();
            tracing::info!(
                files = covered.len(),
                "deleted master files a compacted file covers"
            );
        }
        let root = shared.paths.root.clone();
        let files = blocking(&dir, move || list_master_files(&root)).await?;
        if let Some(keep) = cfg.retention {
            let horizon = tally_core::now_ms().saturating_sub(keep.as_millis() as i64);
            let forget = Forget::Before(horizon);
            for f in &files {
                let p = f.path.clone();
                let oldest = blocking(&dir, move || compact::min_ts(&p)).await?;
                if oldest.is_some_and(|t| t >= horizon) {
                    continue;
                }
                out.expired += self.rewrite(f, &forget, Seq(u64::MAX), "retention").await?;
            }
        }
        let root = shared.paths.root.clone();
        let files = blocking(&dir, move || list_master_files(&root)).await?;
        for run in compact::plan(&files, cfg) {
            if shared.closed.load(Ordering::SeqCst) {
                break;
            }
            let t = std::time::Instant::now();
            let _one = shared.rewrites.lock().await;
            // A deletion request may have rewritten or merged-away an input since the plan.
            let root = shared.paths.root.clone();
            let now = blocking(&dir, move || list_master_files(&root)).await?;
            if !run
                .iter()
                .all(|f| now.iter().any(|n| n.path == f.path && n.size == f.size))
            {
                continue;
            }
            let (d, r) = (dir.clone(), run.clone());
            let (merged, events) =
                blocking(&dir, move || compact::write_merged(&d, &r, fsync)).await?;
            {
                let _w = shared.files_lock.clone().write_owned().await;
                let (d, r) = (dir.clone(), run.clone());
                blocking(&dir, move || compact::delete(&d, &r, fsync)).await?;
            }
            let _ = shared
                .master_files
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some((n + 1).saturating_sub(run.len()))
                });
            ::metrics::counter!(metrics::COMPACTIONS).increment(1);
            ::metrics::counter!(metrics::COMPACTED_FILES).increment(run.len() as u64);
            tracing::info!(
                first = merged.first.0,
                last = merged.last.0,
                files = run.len(),
                events,
                bytes = merged.size,
                ms = t.elapsed().as_millis() as u64,
                "compacted master files"
            );
            out.merged += 1;
            out.inputs += run.len();
            out.events += events;
        }
        Ok(out)
    }

    pub fn status(&self) -> MasterStatus {
        let s = &self.inner.shared;
        MasterStatus {
            acked_seq: self.acked_seq(),
            sealed_seq: Seq(s.sealed.load(Ordering::SeqCst)),
            wal_bytes: s.wal_bytes.load(Ordering::Relaxed),
            master_files: s.master_files.load(Ordering::Relaxed),
        }
    }

    /// Asks the writer thread to commit what is queued and stop, and waits for it.
    async fn stop_writer(&self) {
        let (tx, rx) = oneshot::channel();
        if self
            .inner
            .writer
            .send(WriterCmd::Shutdown { reply: tx })
            .is_ok()
        {
            let _ = rx.await;
        }
    }

    /// Seals what is left and stops the writer. Appends after this fail with `Closed`.
    pub async fn shutdown(&self) -> Result<()> {
        let first = !self.inner.shared.closed.swap(true, Ordering::SeqCst);
        let mut result = Ok(());
        if first {
            self.stop_writer().await;
            result = self.ask_sealer().await;
            let _ = self.inner.sealer.send(SealerCmd::Stop);
        }
        self.join_threads().await;
        result
    }

    /// Waits for the store's threads to end (after they were told to stop).
    async fn join_threads(&self) {
        let handles = std::mem::take(&mut *tally_core::sync::lock(&self.inner.threads));
        if !handles.is_empty() {
            let _ = tokio::task::spawn_blocking(move || {
                for (_, h) in handles {
                    let _ = h.join();
                }
            })
            .await;
        }
    }

    /// Stops the writer and the sealer WITHOUT sealing, as a crash right after the last
    /// acknowledgement would (everything acknowledged is in the WAL). For tests of replay.
    #[cfg(feature = "test-hooks")]
    pub async fn close_unsealed(&self) {
        if !self.inner.shared.closed.swap(true, Ordering::SeqCst) {
            self.stop_writer().await;
            let _ = self.inner.sealer.send(SealerCmd::Stop);
        }
        self.join_threads().await;
    }

    /// Test hook: the WAL writer thread panics at its next commit, as a bug would.
    #[cfg(feature = "test-hooks")]
    pub fn inject_writer_panic(&self) {
        self.inner.shared.panic_writer.store(true, Ordering::SeqCst);
    }

    /// Test hook: the first step of a compaction of `run` alone (the merged file written,
    /// durably; its inputs still there), as `kill -9` between the steps of a pass leaves it.
    #[cfg(feature = "test-hooks")]
    pub fn compact_write_merged_only(&self, run: &[MasterFile]) -> Result<(MasterFile, u64)> {
        let shared = &self.inner.shared;
        compact::write_merged(&shared.paths.master, run, shared.fsync)
    }

    /// Test hook: the next `n` group writes fail half-way, as on a full disk.
    #[cfg(feature = "test-hooks")]
    pub fn inject_write_failures(&self, n: usize) {
        self.inner.shared.fail_writes.store(n, Ordering::SeqCst);
    }
}

/// Runs `f` on the blocking pool; a panic there is an I/O error on `path` (nothing was changed
/// that a retry cannot redo).
async fn blocking<T: Send + 'static>(
    path: &std::path::Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(format!("blocking task failed: {e}")),
        })?
}
