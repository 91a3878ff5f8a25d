//! WAL framing, segment files and replay.
//!
//! A segment file starts with a 12-byte header (`TALLYWAL` + version `u32` LE), then records:
//!
//! ```text
//! len u32 LE | crc32c u32 LE | first_seq u64 LE | payload (len bytes)
//! ```
//!
//! The CRC covers `first_seq` and the payload. The payload is `count u32` then `count` events,
//! each `ts i64 | received_at i64 | url str | visitor opt | referrer opt | id opt`, where a
//! `str` is `len u32` + UTF-8 bytes and an `opt` is the same with `len == u32::MAX` for `None`.
//! One record per `append` call, so a request is all-or-nothing even across a crash.

use std::fs::{self, File, OpenOptions};
use std::path::Path;

use tally_core::{Event, Seq};

use crate::paths::{io_err, SegmentPath};
use crate::{Error, Result, SeqEvent};

pub(crate) const MAGIC: &[u8; 8] = b"TALLYWAL";
pub(crate) const VERSION: u32 = 1;
pub(crate) const HEADER_LEN: u64 = 12;
pub(crate) const RECORD_HEADER_LEN: usize = 16;
const NONE_LEN: u32 = u32::MAX;

pub(crate) fn header() -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..].copy_from_slice(&VERSION.to_le_bytes());
    h
}

#[inline]
fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

#[inline]
fn put_opt(buf: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => put_str(buf, s),
        None => buf.extend_from_slice(&NONE_LEN.to_le_bytes()),
    }
}

/// Appends one framed record holding `events` (which must not be empty) to `buf`.
pub(crate) fn encode_record(buf: &mut Vec<u8>, first_seq: Seq, events: &[Event]) {
    let start = buf.len();
    let size: usize = events
        .iter()
        .map(|e| {
            36 + e.url.len()
                + e.visitor.as_ref().map_or(0, String::len)
                + e.referrer.as_ref().map_or(0, String::len)
                + e.id.as_ref().map_or(0, String::len)
        })
        .sum();
    buf.reserve(RECORD_HEADER_LEN + 4 + size);
    buf.extend_from_slice(&[0u8; 8]); // len + crc, filled below
    buf.extend_from_slice(&first_seq.0.to_le_bytes());
    buf.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for e in events {
        buf.extend_from_slice(&e.ts.to_le_bytes());
        buf.extend_from_slice(&e.received_at.to_le_bytes());
        put_str(buf, &e.url);
        put_opt(buf, e.visitor.as_deref());
        put_opt(buf, e.referrer.as_deref());
        put_opt(buf, e.id.as_deref());
    }
    let payload_len = (buf.len() - start - RECORD_HEADER_LEN) as u32;
    let crc = crc32c::crc32c(&buf[start + 8..]);
    buf[start..start + 4].copy_from_slice(&payload_len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The events of one request as one framed, checksummed record (`first_seq` 0): how the
/// cluster log carries them, in the WAL's own format. `events` must not be empty.
pub fn encode_events(events: &[Event]) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_record(&mut buf, Seq::ZERO, events);
    buf
}

/// Decodes what [`encode_events`] wrote; `None` when the bytes are not one whole record with a
/// good checksum.
pub fn decode_events(bytes: &[u8]) -> Option<Vec<Event>> {
    if bytes.len() < RECORD_HEADER_LEN + 4 {
        return None;
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if RECORD_HEADER_LEN.checked_add(len)? != bytes.len() || crc32c::crc32c(&bytes[8..]) != crc {
        return None;
    }
    let mut out = Vec::new();
    decode_payload(&bytes[RECORD_HEADER_LEN..], Seq::ZERO, |_, e| out.push(e))?;
    (!out.is_empty()).then_some(out)
}

struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
    }
    fn i64(&mut self) -> Option<i64> {
        self.take(8)
            .map(|s| i64::from_le_bytes(s.try_into().expect("8 bytes")))
    }
    fn str_len(&mut self, len: u32) -> Option<String> {
        let bytes = self.take(len as usize)?;
        std::str::from_utf8(bytes).ok().map(str::to_owned)
    }
    fn string(&mut self) -> Option<String> {
        let len = self.u32()?;
        if len == NONE_LEN {
            return None;
        }
        self.str_len(len)
    }
    fn opt(&mut self) -> Option<Option<String>> {
        match self.u32()? {
            NONE_LEN => Some(None),
            len => self.str_len(len).map(Some),
        }
    }
}

/// Decodes a record payload; calls `f(seq, event)` for each event. `None` if malformed.
pub(crate) fn decode_payload(
    payload: &[u8],
    first_seq: Seq,
    mut f: impl FnMut(Seq, Event),
) -> Option<()> {
    let mut c = Cursor { b: payload };
    let count = c.u32()?;
    for i in 0..u64::from(count) {
        let ts = c.i64()?;
        let received_at = c.i64()?;
        let url = c.string()?;
        let visitor = c.opt()?;
        let referrer = c.opt()?;
        let id = c.opt()?;
        f(
            Seq(first_seq.0 + i),
            Event {
                ts,
                url,
                visitor,
                referrer,
                id,
                received_at,
            },
        );
    }
    c.b.is_empty().then_some(())
}

/// What a scan of one segment found.
#[derive(Debug, Clone)]
pub(crate) struct SegmentScan {
    /// Length of the valid prefix (header + whole good records). 0 when the header itself is
    /// missing or torn.
    pub(crate) good_len: u64,
    pub(crate) file_len: u64,
    /// Number of events in the good records.
    pub(crate) events: u64,
    /// The `seq` after the last good record (= the segment's first seq when empty).
    pub(crate) next_seq: Seq,
}

impl SegmentScan {
    pub(crate) fn torn(&self) -> bool {
        self.good_len < self.file_len
    }
    pub(crate) fn last_seq(&self) -> Option<Seq> {
        (self.events > 0).then(|| Seq(self.next_seq.0 - 1))
    }
}

fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> Error {
    Error::CorruptWal {
        file: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

/// Validates the bytes of a segment whose name says it starts at `first`. Calls
/// `on_record(first_seq, payload)` for every good record; a torn, short or bad-CRC last record
/// ends the scan (reported by `good_len < file_len`); a bad record before the end is
/// [`Error::CorruptWal`].
pub(crate) fn scan_bytes(
    path: &Path,
    bytes: &[u8],
    first: Seq,
    mut on_record: impl FnMut(Seq, &[u8]) -> Result<()>,
) -> Result<SegmentScan> {
    let file_len = bytes.len() as u64;
    let hl = HEADER_LEN as usize;
    let empty = SegmentScan {
        good_len: 0,
        file_len,
        events: 0,
        next_seq: first,
    };
    if bytes.len() < hl {
        // Torn while the segment was being created.
        if header().starts_with(bytes) || bytes.iter().all(|&b| b == 0) {
            return Ok(empty);
        }
        return Err(corrupt(path, 0, "bad segment header"));
    }
    if &bytes[..8] != MAGIC {
        if bytes.iter().all(|&b| b == 0) {
            return Ok(empty);
        }
        return Err(corrupt(path, 0, "bad magic"));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(corrupt(
            path,
            8,
            format!("unsupported WAL version {version}"),
        ));
    }
    let mut off = hl;
    let mut expected = first.0;
    let mut events = 0u64;
    while off < bytes.len() {
        let rest = &bytes[off..];
        if rest.len() < RECORD_HEADER_LEN {
            break; // torn record header
        }
        let plen = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        let end = RECORD_HEADER_LEN.saturating_add(plen);
        if end > rest.len() {
            break; // short: the record was still being written
        }
        let good = plen >= 4 && crc32c::crc32c(&rest[8..end]) == crc;
        if !good {
            if end == rest.len() || rest.iter().all(|&b| b == 0) {
                break; // the last record is torn
            }
            return Err(corrupt(path, off as u64, "checksum mismatch"));
        }
        let rec_first = u64::from_le_bytes(rest[8..16].try_into().expect("8 bytes"));
        let payload = &rest[RECORD_HEADER_LEN..end];
        let count = u32::from_le_bytes(payload[0..4].try_into().expect("4 bytes"));
        // Records follow each other; with `seq`s given by the cluster log there are gaps.
        if rec_first < expected {
            return Err(corrupt(
                path,
                off as u64,
                format!("record starts at seq {rec_first}, before {expected}"),
            ));
        }
        if count == 0 {
            return Err(corrupt(path, off as u64, "empty record"));
        }
        on_record(Seq(rec_first), payload)?;
        expected = rec_first + u64::from(count);
        events += u64::from(count);
        off += end;
    }
    Ok(SegmentScan {
        good_len: off as u64,
        file_len,
        events,
        next_seq: Seq(expected),
    })
}

/// Reads a segment file; `Ok(None)` if it does not exist (sealed and deleted meanwhile).
pub(crate) fn read_segment_file(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Scans a segment without changing it (a torn tail is ignored) and returns its events with
/// `after < seq <= through`. `Ok(None)` if the file is gone.
pub(crate) fn read_segment_events(
    seg: &SegmentPath,
    after: Seq,
    through: Seq,
) -> Result<Option<(SegmentScan, Vec<SeqEvent>)>> {
    let Some(bytes) = read_segment_file(&seg.path)? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    let scan = scan_bytes(&seg.path, &bytes, seg.first, |first, payload| {
        let count = u64::from(u32::from_le_bytes(
            payload[0..4].try_into().expect("4 bytes"),
        ));
        if first.0 + count <= after.0 + 1 || first > through {
            return Ok(()); // the whole record is outside the range
        }
        decode_payload(payload, first, |seq, event| {
            if seq > after && seq <= through {
                out.push(SeqEvent { seq, event });
            }
        })
        .ok_or_else(|| corrupt(&seg.path, 0, format!("undecodable record at seq {first}")))
    })?;
    Ok(Some((scan, out)))
}

/// Opens a segment for replay at start-up: validates it, truncates a torn tail away (durably)
/// and returns the scan plus, when `decode` is set, its events.
pub(crate) fn recover_segment(
    seg: &SegmentPath,
    decode: bool,
) -> Result<(SegmentScan, Vec<SeqEvent>)> {
    let bytes = fs::read(&seg.path).map_err(io_err(&seg.path))?;
    let mut out = Vec::new();
    let scan = scan_bytes(&seg.path, &bytes, seg.first, |first, payload| {
        if !decode {
            return Ok(());
        }
        decode_payload(payload, first, |seq, event| {
            out.push(SeqEvent { seq, event })
        })
        .ok_or_else(|| corrupt(&seg.path, 0, format!("undecodable record at seq {first}")))
    })?;
    if scan.torn() || scan.good_len < HEADER_LEN {
        tracing::warn!(
            file = %seg.path.display(),
            good_len = scan.good_len,
            file_len = scan.file_len,
            "truncating torn wal tail"
        );
        let f = OpenOptions::new()
            .write(true)
            .open(&seg.path)
            .map_err(io_err(&seg.path))?;
        if scan.good_len == 0 {
            use std::os::unix::fs::FileExt;
            f.set_len(0).map_err(io_err(&seg.path))?;
            f.write_all_at(&header(), 0).map_err(io_err(&seg.path))?;
        } else {
            f.set_len(scan.good_len).map_err(io_err(&seg.path))?;
        }
        f.sync_all().map_err(io_err(&seg.path))?;
    }
    let scan = SegmentScan {
        good_len: scan.good_len.max(HEADER_LEN),
        file_len: scan.good_len.max(HEADER_LEN),
        ..scan
    };
    Ok((scan, out))
}

/// Creates a fresh segment file (header only), durably.
pub(crate) fn create_segment(seg: &SegmentPath, fsync: bool) -> std::io::Result<File> {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&seg.path)?;
    let res = (|| {
        f.write_all_at(&header(), 0)?;
        if fsync {
            f.sync_all()?;
            if let Some(dir) = seg.path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        Ok(())
    })();
    match res {
        Ok(()) => Ok(f),
        Err(e) => {
            let _ = fs::remove_file(&seg.path);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: u64) -> Event {
        Event {
            ts: 1_700_000_000_000 + i as i64,
            url: format!("http://e.com/{i}"),
            visitor: (i % 2 == 0).then(|| format!("v{i}")),
            referrer: (i % 3 == 0).then(String::new),
            id: None,
            received_at: 1_700_000_000_000,
        }
    }

    #[test]
    fn record_round_trips() {
        let events: Vec<Event> = (0..5).map(ev).collect();
        let mut buf = header().to_vec();
        encode_record(&mut buf, Seq(10), &events);
        encode_record(&mut buf, Seq(15), &events[..2]);
        let mut got = Vec::new();
        let scan = scan_bytes(Path::new("x"), &buf, Seq(10), |first, p| {
            decode_payload(p, first, |s, e| got.push((s, e))).unwrap();
            Ok(())
        })
        .unwrap();
        assert_eq!(scan.events, 7);
        assert_eq!(scan.next_seq, Seq(17));
        assert!(!scan.torn());
        assert_eq!(got[6], (Seq(16), events[1].clone()));
        assert_eq!(got[4], (Seq(14), events[4].clone()));
    }

    #[test]
    fn zero_filled_tail_is_torn() {
        let mut buf = header().to_vec();
        encode_record(&mut buf, Seq(1), &[ev(1)]);
        let good = buf.len() as u64;
        buf.extend_from_slice(&[0u8; 100]);
        let scan = scan_bytes(Path::new("x"), &buf, Seq(1), |_, _| Ok(())).unwrap();
        assert_eq!(scan.good_len, good);
        assert_eq!(scan.events, 1);
    }
}
