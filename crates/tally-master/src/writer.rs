//! The group-commit writer thread: the one place that assigns `seq`, owns the open WAL segment
//! and cuts epochs.
//!
//! It blocks on its command channel, drains every pending request, writes all their records
//! with one `write` and one `sync_data`, then acknowledges each request, publishes the events
//! to the in-memory tail and the new acknowledged seq on the watch channel.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_core::{Event, Seq};
use tokio::sync::oneshot;

use crate::paths::SegmentPath;
use crate::seal::SealerCmd;
use crate::wal::{self, HEADER_LEN};
use crate::{Error, Result, SeqEvent, SeqRange, Shared};

/// Stop draining and commit once a group holds this many events.
const MAX_GROUP_EVENTS: usize = 512 * 1024;

pub(crate) struct RotateInfo {
    /// Everything up to here is acknowledged and in closed segments.
    pub(crate) through: Seq,
}

pub(crate) enum WriterCmd {
    Append {
        events: Vec<Event>,
        /// The `seq` of the first event when the log gave it (cluster mode); `None`: the next.
        at: Option<Seq>,
        reply: oneshot::Sender<Result<SeqRange>>,
    },
    CutEpoch {
        /// The cutoff when the log gave it (a cut marker's position); `None`: the last `seq`.
        at: Option<Seq>,
        reply: oneshot::Sender<Result<Seq>>,
    },
    Rotate {
        reply: oneshot::Sender<Result<RotateInfo>>,
    },
    /// The log's follower starts over: appends and cuts with log seqs are taken again.
    ResumeLog {
        reply: oneshot::Sender<Result<()>>,
    },
    Shutdown {
        reply: oneshot::Sender<Result<()>>,
    },
}

/// The open segment.
pub(crate) struct OpenSegment {
    pub(crate) file: File,
    pub(crate) seg: SegmentPath,
    /// Length of the durable, acknowledged prefix.
    pub(crate) len: u64,
    pub(crate) events: u64,
    /// When the first event went into it.
    pub(crate) since: Option<Instant>,
}

pub(crate) struct Writer {
    pub(crate) shared: Arc<Shared>,
    pub(crate) seal_interval: Duration,
    pub(crate) seal_max_events: u64,
    pub(crate) seg: Option<OpenSegment>,
    pub(crate) next_seq: u64,
    /// The open segment holds bytes past `len` that must be cut before the next write.
    pub(crate) needs_repair: bool,
    /// An append or cut with a log seq failed: later ones are refused until the follower
    /// starts over ([`WriterCmd::ResumeLog`]), so none lands after a gap it left.
    pub(crate) log_failed: bool,
    pub(crate) sealer: Sender<SealerCmd>,
    pub(crate) buf: Vec<u8>,
    /// Every acknowledged event of the open segment, handed to the sealer when the segment
    /// closes so that it need not read the file back. `None` for a segment opened at recovery
    /// (its events are only partly in memory) or once the sealer's backlog is full.
    pub(crate) seg_events: Option<Vec<Arc<SeqEvent>>>,
}

/// The sealer's backlog of handed-over events beyond which closed segments are read back from
/// their files instead (bounds the memory a slow disk can pin).
const MAX_HANDED_OVER: usize = 4 << 20;

type Pending = Vec<(Vec<Event>, Option<Seq>, oneshot::Sender<Result<SeqRange>>)>;

impl Writer {
    pub(crate) fn run(mut self, rx: Receiver<WriterCmd>) {
        let mut pending: Pending = Vec::new();
        loop {
            let first = match rx.recv_timeout(self.time_to_rotation()) {
                Ok(cmd) => cmd,
                Err(RecvTimeoutError::Timeout) => {
                    self.maybe_rotate();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut next = Some(first);
            let mut group_events = 0usize;
            let mut stop = false;
            while let Some(cmd) = next.take() {
                match cmd {
                    WriterCmd::Append { events, at, reply } => {
                        group_events += events.len();
                        pending.push((events, at, reply));
                        if group_events >= MAX_GROUP_EVENTS {
                            self.commit(&mut pending);
                            group_events = 0;
                        }
                    }
                    other => {
                        // Control commands see every append queued before them committed.
                        self.commit(&mut pending);
                        group_events = 0;
                        if self.control(other) {
                            stop = true;
                            break;
                        }
                    }
                }
                next = rx.try_recv().ok();
            }
            self.commit(&mut pending);
            if stop {
                // Answer whatever is still queued, then drop the receiver.
                while let Ok(cmd) = rx.try_recv() {
                    reject(cmd);
                }
                break;
            }
            self.maybe_rotate();
        }
        self.shared.open_first.store(u64::MAX, Ordering::SeqCst);
    }

    fn time_to_rotation(&self) -> Duration {
        match self.seg.as_ref().and_then(|s| s.since) {
            Some(since) => self
                .seal_interval
                .saturating_sub(since.elapsed())
                .max(Duration::from_millis(5)),
            None => Duration::from_secs(3600),
        }
    }

    /// Handles a control command; `true` means stop.
    fn control(&mut self, cmd: WriterCmd) -> bool {
        match cmd {
            WriterCmd::Append { .. } => unreachable!("appends are grouped"),
            WriterCmd::ResumeLog { reply } => {
                self.log_failed = false;
                let _ = reply.send(Ok(()));
                false
            }
            WriterCmd::CutEpoch { at, reply } => {
                let last = Seq(self.next_seq - 1);
                let result = match at {
                    None => self.shared.epochs.cut(last),
                    Some(_) if self.log_failed => Err(log_failed()),
                    // A marker the log delivers again is a cut already made.
                    Some(c) if c < last && self.shared.epochs.last_start() > c => Ok(c),
                    Some(c) if c < last => Err(Error::OutOfOrder(format!(
                        "a cut at seq {c} arrived after seq {last} was appended"
                    ))),
                    Some(c) => self.shared.epochs.cut(c).inspect(|_| {
                        self.next_seq = c.0 + 1;
                    }),
                };
                if at.is_some() && result.is_err() {
                    self.log_failed = true;
                }
                let _ = reply.send(result);
                false
            }
            WriterCmd::Rotate { reply } => {
                self.rotate();
                let _ = reply.send(Ok(RotateInfo {
                    through: Seq(self.next_seq - 1),
                }));
                false
            }
            WriterCmd::Shutdown { reply } => {
                if let Err(e) = self.repair() {
                    tracing::warn!(error = %e, "could not truncate the wal segment at shutdown");
                }
                if let Some(s) = self.seg.take() {
                    if let Err(e) = s.file.sync_all() {
                        tracing::warn!(error = %e, "fsync of the wal segment at shutdown failed");
                    }
                }
                // Sealed from the file by whoever asks (shutdown), or replayed at the next start.
                self.seg_events = None;
                self.shared.open_first.store(u64::MAX, Ordering::SeqCst);
                let _ = reply.send(Ok(()));
                true
            }
        }
    }

    fn maybe_rotate(&mut self) {
        let Some(s) = &self.seg else { return };
        let full = s.events >= self.seal_max_events;
        let old = s.since.is_some_and(|t| t.elapsed() >= self.seal_interval);
        if s.events > 0 && (full || old) {
            self.rotate();
        }
    }

    /// Closes the open segment if it holds events and starts a new one; tells the sealer.
    fn rotate(&mut self) {
        match &self.seg {
            Some(s) if s.events == 0 => return,
            Some(_) => {
                // Never close a segment with an unacknowledged partial record at its end.
                if let Err(e) = self.repair() {
                    tracing::warn!(error = %e, "could not truncate the wal segment; not rotating");
                    return;
                }
                let closed = self.seg.take().expect("matched Some").seg.first;
                self.shared
                    .open_first
                    .store(self.next_seq, Ordering::SeqCst);
                self.hand_over(closed);
            }
            None => {}
        }
        self.shared
            .open_first
            .store(self.next_seq, Ordering::SeqCst);
        if let Err(e) = self.ensure_segment() {
            tracing::warn!(error = %e, "could not start a new wal segment; will retry");
        }
        let _ = self.sealer.send(SealerCmd::Kick);
    }

    /// Gives the events of the segment that just closed (starting at `first`) to the sealer.
    fn hand_over(&mut self, first: Seq) {
        if let Some(events) = self.seg_events.take() {
            if !events.is_empty() {
                self.shared
                    .handed_over
                    .fetch_add(events.len(), Ordering::Relaxed);
                let _ = self.sealer.send(SealerCmd::Closed { first, events });
            }
        }
    }

    /// Cuts the open segment back to its acknowledged length if a failed write left bytes.
    fn repair(&mut self) -> std::io::Result<()> {
        if self.needs_repair {
            let s = self.seg.as_mut().expect("repair needs a segment");
            s.file.set_len(s.len)?;
            if self.shared.fsync {
                s.file.sync_all()?;
            }
            self.needs_repair = false;
        }
        Ok(())
    }

    /// Makes sure there is an open segment whose file ends at `len`.
    fn ensure_segment(&mut self) -> std::io::Result<()> {
        self.repair()?;
        if self.seg.is_none() {
            let seg = SegmentPath::new(&self.shared.paths.wal, Seq(self.next_seq));
            let file = wal::create_segment(&seg, self.shared.fsync)?;
            self.shared
                .wal_bytes
                .fetch_add(HEADER_LEN, Ordering::Relaxed);
            self.shared
                .open_first
                .store(self.next_seq, Ordering::SeqCst);
            self.seg = Some(OpenSegment {
                file,
                seg,
                len: HEADER_LEN,
                events: 0,
                since: None,
            });
            let backlog = self.shared.handed_over.load(Ordering::Relaxed);
            self.seg_events = (backlog < MAX_HANDED_OVER).then(Vec::new);
        }
        Ok(())
    }

    fn write_group(&mut self) -> std::io::Result<()> {
        let s = self.seg.as_mut().expect("segment ensured");
        if self.shared.fail_writes.load(Ordering::Relaxed) > 0 {
            self.shared.fail_writes.fetch_sub(1, Ordering::Relaxed);
            // Simulate a disk that fills up half-way through the write.
            let half = self.buf.len() / 2;
            s.file.write_all_at(&self.buf[..half], s.len)?;
            return Err(std::io::Error::other(
                "injected write failure (no space left on device)",
            ));
        }
        s.file.write_all_at(&self.buf, s.len)?;
        if self.shared.fsync {
            let t = Instant::now();
            s.file.sync_data()?;
            metrics::histogram!(crate::metrics::WAL_FSYNC_SECONDS)
                .record(t.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Writes every pending append as one group: one write, one fsync, then the answers.
    fn commit(&mut self, pending: &mut Pending) {
        if pending.is_empty() {
            return;
        }
        if self.shared.panic_writer.swap(false, Ordering::SeqCst) {
            panic!("injected WAL writer panic (test hook)");
        }
        if self.log_failed {
            // Refused until the follower starts over; appends of one node go on.
            let (refused, kept): (Pending, Pending) =
                pending.drain(..).partition(|(_, at, _)| at.is_some());
            for (_, _, reply) in refused {
                let _ = reply.send(Err(log_failed()));
            }
            *pending = kept;
            if pending.is_empty() {
                return;
            }
        }
        if let Err(e) = self.ensure_segment() {
            tracing::warn!(error = %e, "wal unavailable");
            self.log_failed |= pending.iter().any(|(_, at, _)| at.is_some());
            let what = format!("wal segment in {}", self.shared.paths.wal.display());
            let source = std::sync::Arc::new(e);
            for (_, _, reply) in pending.drain(..) {
                let _ = reply.send(Err(Error::Unavailable {
                    what: what.clone(),
                    source: source.clone(),
                }));
            }
            return;
        }
        let start = self.next_seq;
        self.buf.clear();
        let mut ranges = Vec::with_capacity(pending.len());
        let mut written = 0u64;
        for (events, at, _) in pending.iter_mut() {
            let first = match *at {
                // Delivered again by the log: already written, acknowledged as it was.
                Some(at) if at.0 < self.next_seq => {
                    ranges.push(Some(SeqRange {
                        first: at,
                        last: Seq(at.0 + (events.len() as u64).max(1) - 1),
                    }));
                    events.clear();
                    continue;
                }
                Some(at) => at.0,
                None => self.next_seq,
            };
            if !events.is_empty() {
                wal::encode_record(&mut self.buf, Seq(first), events);
                self.next_seq = first + events.len() as u64;
                written += events.len() as u64;
            }
            ranges.push(Some(SeqRange {
                first: Seq(first),
                last: Seq(first.max(self.next_seq) - 1),
            }));
        }
        let ranges: Vec<SeqRange> = ranges.into_iter().flatten().collect();
        if self.buf.is_empty() {
            for ((_, _, reply), r) in pending.drain(..).zip(ranges) {
                let _ = reply.send(Ok(r));
            }
            return;
        }
        metrics::histogram!(crate::metrics::WAL_GROUP_EVENTS).record(written as f64);
        metrics::histogram!(crate::metrics::WAL_GROUP_REQUESTS).record(pending.len() as f64);
        if let Err(e) = self.write_group() {
            metrics::counter!(crate::metrics::WAL_WRITE_ERRORS).increment(1);
            self.next_seq = start;
            let s = self.seg.as_ref().expect("segment ensured");
            let what = format!("writing {}", s.seg.path.display());
            tracing::warn!(error = %e, file = %s.seg.path.display(), "wal write failed");
            let source = std::sync::Arc::new(e);
            // Cut the partial record away so nothing of it can ever be replayed; if that fails
            // too, the next write repairs first.
            self.needs_repair = true;
            self.log_failed |= pending.iter().any(|(_, at, _)| at.is_some());
            if let Err(e) = self.repair() {
                tracing::warn!(error = %e, "could not truncate the wal segment; will retry");
            }
            for (_, _, reply) in pending.drain(..) {
                let _ = reply.send(Err(Error::Unavailable {
                    what: what.clone(),
                    source: source.clone(),
                }));
            }
            return;
        }
        let s = self.seg.as_mut().expect("segment ensured");
        s.len += self.buf.len() as u64;
        s.events += written;
        s.since.get_or_insert_with(Instant::now);
        self.shared
            .wal_bytes
            .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
        let acked = Seq(self.next_seq - 1);

        // Publish: tail and acked seq together (under the tail lock), then the watch, then the
        // answers, so a client that got its answer sees `acked_seq()` covering it.
        let cap = self.shared.tail_capacity;
        let mut replies = Vec::with_capacity(pending.len());
        {
            let mut tail = tally_core::sync::lock(&self.shared.tail);
            // Only the last `cap` events of a huge group fit the tail.
            let mut skip = (written as usize).saturating_sub(cap);
            for ((events, _, reply), r) in pending.drain(..).zip(ranges) {
                for (i, event) in events.into_iter().enumerate() {
                    let seq = Seq(r.first.0 + i as u64);
                    let e = Arc::new(SeqEvent { seq, event });
                    if let Some(kept) = self.seg_events.as_mut() {
                        kept.push(e.clone());
                    }
                    if skip > 0 {
                        skip -= 1;
                        tail.complete_after = seq;
                    } else {
                        tail.events.push_back(e);
                    }
                }
                replies.push((reply, r));
            }
            while tail.events.len() > cap {
                if let Some(e) = tail.events.pop_front() {
                    tail.complete_after = e.seq;
                }
            }
            self.shared.acked.store(acked.0, Ordering::SeqCst);
        }
        self.shared.watch.send_replace(acked);
        for (reply, r) in replies {
            let _ = reply.send(Ok(r));
        }
        if self
            .seg
            .as_ref()
            .is_some_and(|s| s.events >= self.seal_max_events)
        {
            self.rotate();
        }
    }
}

fn log_failed() -> Error {
    Error::Unavailable {
        what: "an earlier write of the log's events failed; the follower starts over".into(),
        source: Arc::new(std::io::Error::other("log write refused after a failure")),
    }
}

fn reject(cmd: WriterCmd) {
    match cmd {
        WriterCmd::Append { reply, .. } => drop(reply.send(Err(Error::Closed))),
        WriterCmd::CutEpoch { reply, .. } => drop(reply.send(Err(Error::Closed))),
        WriterCmd::Rotate { reply } => drop(reply.send(Err(Error::Closed))),
        WriterCmd::ResumeLog { reply } => drop(reply.send(Err(Error::Closed))),
        WriterCmd::Shutdown { reply } => drop(reply.send(Ok(()))),
    }
}
