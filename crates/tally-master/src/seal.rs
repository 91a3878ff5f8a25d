//! The sealer thread: turns closed WAL segments into immutable Parquet master files.
//!
//! A segment is closed once the writer has moved on to a newer one (its first seq is below
//! `Shared::open_first`). Sealing one: take its events — handed over from memory by the writer
//! when it closed the segment (the same events it wrote, fsynced and acknowledged), else read
//! and validated from the file (after a restart, or when the hand-over backlog is full) — write
//! `master/{first:020}-{last:020}.parquet` (temp name, fsync, rename, fsync dir), THEN delete
//! the segment. One thread, so one seal at a time; appends keep flowing meanwhile.

use std::collections::HashMap;
use std::fs;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use tally_core::Seq;
use tokio::sync::oneshot;

use crate::paths::{fsync_dir, io_err, list_segments, master_file_name, SegmentPath};
use crate::{parquet_io, wal, Result, SeqEvent, Shared};

pub(crate) enum SealerCmd {
    /// A segment was closed: seal what is closed.
    Kick,
    /// The segment starting at `first` was closed; these are all its events. Seal what is
    /// closed.
    Closed {
        first: Seq,
        events: Vec<Arc<SeqEvent>>,
    },
    /// Seal everything closed now and answer.
    SealNow { reply: oneshot::Sender<Result<()>> },
    /// Exit the thread.
    Stop,
}

/// How far the sealer's nice value is above the process's. Sealing is background work with
/// slack (a closed segment is durable in the WAL until its Parquet file is), while ingestion, the speed applier and queries are
/// what clients wait for: on saturated cores, a million-event file took a core for ~2.4 s and
/// the applier fell ~100 000 events behind for that long. At nice 10 the kernel's scheduler gives
/// the sealer about a tenth of a contended core's time and all of an idle one.
const SEALER_NICE: i32 = 10;

pub(crate) struct Sealer {
    pub(crate) shared: Arc<Shared>,
    /// How often to retry after a failure (and to look for closed segments anyway).
    pub(crate) retry: Duration,
    /// Events of closed segments handed over by the writer, by first seq.
    pub(crate) handed: HashMap<u64, Vec<Arc<SeqEvent>>>,
}

impl Sealer {
    pub(crate) fn run(mut self, rx: Receiver<SealerCmd>) {
        // Held for the thread's life. A failure only costs latency: logged, not returned.
        let _priority = tally_core::priority::Priority::adjust(SEALER_NICE)
            .inspect_err(|error| {
                tracing::warn!(nice = SEALER_NICE, %error, "could not lower the sealer thread's priority");
            })
            .ok();
        let mut failing = false;
        loop {
            let timeout = if failing {
                self.retry.min(Duration::from_secs(5))
            } else {
                self.retry
            };
            match rx.recv_timeout(timeout) {
                Ok(SealerCmd::Closed { first, events }) => {
                    self.handed.insert(first.0, events);
                    failing = self.seal_closed().is_err();
                }
                Ok(SealerCmd::Kick) | Err(RecvTimeoutError::Timeout) => {
                    failing = self.seal_closed().is_err();
                }
                Ok(SealerCmd::SealNow { reply }) => {
                    let r = self.seal_closed();
                    failing = r.is_err();
                    let _ = reply.send(r);
                }
                Ok(SealerCmd::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
    }

    /// Seals every closed segment, oldest first; stops at the first failure.
    pub(crate) fn seal_closed(&mut self) -> Result<()> {
        let open_first = self.shared.open_first.load(Ordering::SeqCst);
        let segments = list_segments(&self.shared.paths.wal)?;
        for seg in segments.iter().filter(|s| s.first.0 < open_first) {
            if let Err(e) = self.seal_segment(seg) {
                tracing::warn!(error = %e, file = %seg.path.display(), "sealing failed; will retry");
                self.shared
                    .sealed
                    .store(seg.first.0.saturating_sub(1), Ordering::SeqCst);
                return Err(e);
            }
        }
        // Everything below the open segment is sealed now.
        let sealed = match segments.iter().find(|s| s.first.0 >= open_first) {
            Some(open) => open.first.0 - 1,
            None => open_first.min(self.shared.acked.load(Ordering::SeqCst) + 1) - 1,
        };
        self.shared.sealed.fetch_max(sealed, Ordering::SeqCst);
        Ok(())
    }

    fn seal_segment(&mut self, seg: &SegmentPath) -> Result<()> {
        if let Some(events) = self.handed.remove(&seg.first.0) {
            let n = events.len();
            let file_len = match fs::metadata(&seg.path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io_err(&seg.path)(e)),
            };
            let last = events.last().map(|e| e.seq);
            let r = self.write_and_remove(seg, last, &events, file_len);
            self.shared
                .handed_over
                .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
            if r.is_err() {
                // Read it from the file when retrying; the memory goes back now.
                drop(events);
            }
            return r;
        }
        let Some((scan, events)) = wal::read_segment_events(seg, Seq::ZERO, Seq(u64::MAX))? else {
            return Ok(()); // already gone
        };
        self.write_and_remove(seg, scan.last_seq(), &events, scan.file_len)
    }

    /// Writes the master file of `seg` (holding `events`, the last being `last`), then deletes
    /// the segment.
    fn write_and_remove<E: std::borrow::Borrow<SeqEvent>>(
        &self,
        seg: &SegmentPath,
        last: Option<Seq>,
        events: &[E],
        file_len: u64,
    ) -> Result<()> {
        let fsync = self.shared.fsync;
        if let Some(last) = last {
            let first = seg.first;
            let path = self.shared.paths.master.join(master_file_name(first, last));
            let t = std::time::Instant::now();
            parquet_io::write_parquet_atomic(&path, events, fsync)?;
            self.shared.master_files.fetch_add(1, Ordering::Relaxed);
            metrics::histogram!(crate::metrics::SEAL_SECONDS).record(t.elapsed().as_secs_f64());
            metrics::counter!(crate::metrics::SEALED_EVENTS).increment(events.len() as u64);
            tracing::info!(
                first = first.0,
                last = last.0,
                events = events.len(),
                ms = t.elapsed().as_millis() as u64,
                "sealed wal segment"
            );
        }
        fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
        if fsync {
            fsync_dir(&self.shared.paths.wal)?;
        }
        let _ = self
            .shared
            .wal_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(file_len))
            });
        Ok(())
    }
}
