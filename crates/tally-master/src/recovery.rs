//! Start-up recovery of the WAL: which segments are already sealed (removed), which are kept
//! for the sealer, the segment the writer continues (its torn tail truncated), the next `seq`,
//! and the in-memory tail the speed layer reads first.

use std::collections::VecDeque;
use std::sync::Arc;

use tally_core::Seq;

use crate::epochs::Epochs;
use crate::paths::{self, io_err, DataPaths, SegmentPath};
use crate::writer::OpenSegment;
use crate::{wal, Error, MasterConfig, Result, SeqEvent, TailBuf};

/// What replaying the WAL at start-up found.
pub(crate) struct Recovered {
    pub(crate) next_seq: u64,
    pub(crate) open: Option<OpenSegment>,
    pub(crate) closed_segments: usize,
    pub(crate) oldest_unsealed: Option<Seq>,
    pub(crate) wal_bytes: u64,
    pub(crate) tail: TailBuf,
}

pub(crate) fn recover(paths: &DataPaths, cfg: &MasterConfig, epochs: &Epochs) -> Result<Recovered> {
    let all_files = paths::list_all_master_files(&paths.master)?;
    let max_sealed = all_files.iter().map(|f| f.last.0).max().unwrap_or(0);
    let fully_sealed =
        |first: Seq, last: Seq| all_files.iter().any(|f| f.first <= first && f.last >= last);
    let segments = paths::list_segments(&paths.wal)?;
    let last_name = segments.last().map(|s| s.first);
    let mut kept: Vec<(SegmentPath, wal::SegmentScan, Vec<SeqEvent>)> = Vec::new();
    let mut prev_last = 0u64;
    let mut removed = false;
    for seg in segments {
        let is_last = Some(seg.first) == last_name;
        let (scan, events) = wal::recover_segment(&seg, is_last && cfg.tail_capacity > 0)?;
        match scan.last_seq() {
            Some(last) if fully_sealed(seg.first, last) => {
                tracing::info!(file = %seg.path.display(), "removing wal segment already sealed");
                std::fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
                removed = true;
                prev_last = prev_last.max(last.0);
            }
            Some(last) => {
                if seg.first.0 <= prev_last {
                    return Err(Error::CorruptWal {
                        file: seg.path.clone(),
                        offset: 0,
                        reason: format!(
                            "segment starts at seq {} but seq {prev_last} came before",
                            seg.first
                        ),
                    });
                }
                prev_last = last.0;
                kept.push((seg, scan, events));
            }
            None if !is_last => {
                std::fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
                removed = true;
            }
            None => kept.push((seg, scan, events)),
        }
    }
    if removed {
        paths::fsync_dir(&paths.wal)?;
    }
    let name_hwm = last_name.map_or(0, |s| s.0);
    let next_seq = 1u64
        .max(max_sealed + 1)
        .max(prev_last + 1)
        .max(epochs.last_start().0)
        .max(name_hwm);

    let mut open = None;
    let mut tail = VecDeque::new();
    if let Some((seg, scan, _)) = kept.last() {
        if scan.next_seq.0 == next_seq {
            let (seg, scan, events) = kept.pop().expect("last exists");
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&seg.path)
                .map_err(io_err(&seg.path))?;
            let skip = events.len().saturating_sub(cfg.tail_capacity);
            tail.extend(events.into_iter().skip(skip).map(Arc::new));
            let since = (scan.events > 0).then(std::time::Instant::now);
            open = Some((
                OpenSegment {
                    file,
                    seg,
                    len: scan.good_len,
                    events: scan.events,
                    since,
                },
                scan,
            ));
        } else if scan.events == 0 {
            std::fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
            kept.pop();
        }
    }
    let mut wal_bytes: u64 = kept.iter().map(|(_, s, _)| s.file_len).sum();
    let mut oldest_unsealed = kept.first().map(|(s, _, _)| s.first);
    let closed_segments = kept.len();
    let open = open.map(|(o, scan)| {
        wal_bytes += scan.file_len;
        if scan.events > 0 {
            oldest_unsealed.get_or_insert(o.seg.first);
        }
        o
    });
    // What came before the tail's first event is in files and closed segments.
    let complete_after = tail
        .front()
        .map_or(Seq(next_seq - 1), |e: &Arc<SeqEvent>| Seq(e.seq.0 - 1));
    Ok(Recovered {
        next_seq,
        open,
        closed_segments,
        oldest_unsealed,
        wal_bytes,
        tail: TailBuf {
            events: tail,
            complete_after,
        },
    })
}
