//! Cached partial aggregates of master files, under `views/partials/` (API.md, "Batch runs are
//! incremental").
//!
//! A sealed master file never changes, so neither does its aggregate. A run keeps, per master
//! file wholly at or below its cutoff and per keying (URL, source key), the file's counts per
//! (key, 15-minute cell) and its distinct visitor hashes per (key, cell) — exactly what the
//! kernel's merge takes from a scanned row group, in canonical form (keys sorted, entries sorted
//! and distinct). The next run loads it instead of decoding the file. Day sketches are built
//! in the merge from the per-cell hashes, so a partial does not depend on the sketch precision,
//! and the merge of cached and fresh partials gives the same view as a scan of every file.
//!
//! A partial is named by the master file's seq range and a tag: the first 16 hex digits of
//! BLAKE3 over the format version, the keying, whether it holds visitors, the master file's
//! name and size, and its Parquet footer (which holds every column chunk's offset, size and
//! statistics): a file rewritten under the same name (compaction, `forget`) gets a new tag.
//! The content ends with BLAKE3 of the rest; a partial that does not match is recomputed, never
//! merged. Partials are derived data: written atomically but without fsync (a torn one fails
//! its checksum), safe to delete.
//!
//! Encoding (little-endian, integers as LEB128 varints unless said): magic `TLYPART2`, keying
//! byte, visitors byte, events, key count, each key front-coded as (bytes shared with the
//! previous key, length of the rest, the rest); cell count, each
//! cell as (delta of `key << 32 | biased cell` from the previous, count); visitor count, each
//! as (delta of the same key, hash as 4 raw bytes); then the 32-byte BLAKE3 of all before.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use arrow::array::StringArray;
use tally_master::MasterFile;

use crate::error::{Error, Result};
use crate::kernel::{Keying, Partial};

/// Bumped whenever what a partial means changes (the kernel's cells, keys or hashes).
const FORMAT: u32 = 2;
const MAGIC: &[u8; 8] = b"TLYPART2";
const SUFFIX: &str = ".part";

/// The partials directory of one run: which partials it used, so that the others can go.
#[derive(Debug)]
pub struct PartialCache {
    dir: PathBuf,
    /// Recompute (and rewrite) every partial instead of loading any.
    full: bool,
    used: Mutex<HashSet<String>>,
}

/// Where one master file's partial lives.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    name: String,
}

impl PartialCache {
    /// The cache in `dir` (created when missing). `full`: load nothing, recompute every file.
    pub fn open(dir: &Path, full: bool) -> Result<PartialCache> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(PartialCache {
            dir: dir.to_path_buf(),
            full,
            used: Mutex::new(HashSet::new()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The slot of `file`'s partial under `keying`.
    pub(crate) fn slot(&self, file: &MasterFile, keying: Keying, visitors: bool) -> Result<Slot> {
        let footer = read_footer(&file.path, file.size)?;
        let mut h = blake3::Hasher::new();
        h.update(&FORMAT.to_le_bytes());
        h.update(&[keying_byte(keying), u8::from(visitors)]);
        let name = file
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&file.size.to_le_bytes());
        h.update(&footer);
        let tag = h.finalize().to_hex();
        let kind = match keying {
            Keying::Url => "url",
            Keying::Source => "src",
        };
        let name = format!(
            "{kind}-{:020}-{:020}-{}{SUFFIX}",
            file.first.get(),
            file.last.get(),
            &tag.as_str()[..16]
        );
        self.used
            .lock()
            .expect("partials lock")
            .insert(name.clone());
        Ok(Slot { name })
    }

    /// The partial in `slot`, if it is there and intact; `None` on a full run. A damaged or
    /// unreadable one is logged and `None`: the file is scanned and its partial rewritten.
    pub(crate) fn load(&self, slot: &Slot, keying: Keying, visitors: bool) -> Option<Partial> {
        if self.full {
            return None;
        }
        let path = self.dir.join(&slot.name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read a cached partial; recomputing it");
                return None;
            }
        };
        match decode(&bytes, keying, visitors) {
            Ok(p) => Some(p),
            Err(reason) => {
                tracing::warn!(path = %path.display(), %reason, "cached partial is corrupt; recomputing it");
                None
            }
        }
    }

    /// Stores `part` (canonical: one dictionary, keys sorted, entries sorted and distinct) in
    /// `slot`. A failure is logged: the run goes on, the next one recomputes the file.
    pub(crate) fn store(&self, slot: &Slot, keying: Keying, visitors: bool, part: &Partial) {
        let path = self.dir.join(&slot.name);
        let r = (|| -> std::io::Result<()> {
            let bytes = encode(part, keying, visitors);
            let mut tmp = tempfile::NamedTempFile::with_prefix_in(".tmp-partial-", &self.dir)?;
            tmp.write_all(&bytes)?;
            tmp.persist(&path).map_err(|e| e.error)?;
            Ok(())
        })();
        if let Err(e) = r {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache a partial aggregate");
        }
    }

    /// Deletes every partial this run did not use (of master files that are gone or changed,
    /// or of an older format) and stray temporary files. Returns how many were deleted.
    pub fn retain_used(&self) -> Result<usize> {
        let used = self.used.lock().expect("partials lock");
        let mut deleted = 0;
        let rd = std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| Error::io(&self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.ends_with(SUFFIX) || name.starts_with(".tmp-partial-");
            if ours && !used.contains(&name) {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => deleted += 1,
                    Err(e) => {
                        tracing::warn!(path = %entry.path().display(), error = %e, "cannot delete an unused partial")
                    }
                }
            }
        }
        Ok(deleted)
    }
}

fn keying_byte(k: Keying) -> u8 {
    match k {
        Keying::Url => 0,
        Keying::Source => 1,
    }
}

/// The Parquet footer of a file of `size` bytes: `[metadata][u32 length]["PAR1"]`.
fn read_footer(path: &Path, size: u64) -> Result<Vec<u8>> {
    let bad = |reason: &str| Error::Parquet {
        path: path.to_path_buf(),
        message: reason.to_string(),
    };
    if size < 12 {
        return Err(bad("file too short for a Parquet footer"));
    }
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut tail = [0u8; 8];
    f.seek(SeekFrom::Start(size - 8))
        .and_then(|_| f.read_exact(&mut tail))
        .map_err(|e| Error::io(path, e))?;
    if &tail[4..] != b"PAR1" {
        return Err(bad("no Parquet magic at the end"));
    }
    let len = u64::from(u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")));
    if len + 12 > size {
        return Err(bad("Parquet footer longer than the file"));
    }
    let mut footer = vec![0u8; len as usize];
    f.seek(SeekFrom::Start(size - 8 - len))
        .and_then(|_| f.read_exact(&mut footer))
        .map_err(|e| Error::io(path, e))?;
    Ok(footer)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn encode(part: &Partial, keying: Keying, visitors: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + part.cells.len() * 4 + part.visitors.len() * 6);
    out.extend_from_slice(MAGIC);
    out.push(keying_byte(keying));
    out.push(u8::from(visitors));
    put_varint(&mut out, part.events);
    put_varint(&mut out, part.urls.len() as u64);
    let mut prev: &[u8] = &[];
    for lid in 0..part.urls.len() {
        let s = part.url(lid).as_bytes();
        let shared = prev.iter().zip(s).take_while(|(a, b)| a == b).count();
        put_varint(&mut out, shared as u64);
        put_varint(&mut out, (s.len() - shared) as u64);
        out.extend_from_slice(&s[shared..]);
        prev = s;
    }
    put_varint(&mut out, part.cells.len() as u64);
    let mut prev = 0u64;
    for &(k, c) in &part.cells {
        put_varint(&mut out, k - prev);
        put_varint(&mut out, u64::from(c));
        prev = k;
    }
    put_varint(&mut out, part.visitors.len() as u64);
    prev = 0;
    for &(k, h) in &part.visitors {
        put_varint(&mut out, k - prev);
        out.extend_from_slice(&h.to_le_bytes());
        prev = k;
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or("truncated")?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.bytes(1)?[0];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    /// A count of entries of at least `min_bytes` each: never more than the bytes left.
    fn count(&mut self, min_bytes: usize) -> std::result::Result<usize, String> {
        let n = self.varint()?;
        let left = (self.buf.len() - self.pos) / min_bytes.max(1);
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= left)
            .ok_or_else(|| format!("count {n} exceeds the file"))
    }
}

fn decode(bytes: &[u8], keying: Keying, visitors: bool) -> std::result::Result<Partial, String> {
    if bytes.len() < MAGIC.len() + 32 {
        return Err("too short".into());
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err("checksum mismatch".into());
    }
    let mut r = Reader { buf: body, pos: 0 };
    if r.bytes(MAGIC.len())? != MAGIC {
        return Err("bad magic".into());
    }
    if r.bytes(2)? != [keying_byte(keying), u8::from(visitors)] {
        return Err("made for another keying".into());
    }
    let events = r.varint()?;
    let nkeys = r.count(2)?;
    let mut values: Vec<u8> = Vec::new();
    let mut offsets: Vec<i32> = Vec::with_capacity(nkeys + 1);
    offsets.push(0);
    let mut start = 0usize;
    for _ in 0..nkeys {
        let shared = usize::try_from(r.varint()?).map_err(|_| "prefix too long")?;
        let len = r.count(1)?;
        if shared > values.len() - start {
            return Err("prefix longer than the previous key".into());
        }
        let suffix = r.bytes(len)?;
        let next = values.len();
        values.extend_from_within(start..start + shared);
        values.extend_from_slice(suffix);
        // Ascending and distinct: the first differing byte is greater, or the previous key is a
        // strict prefix of this one.
        if offsets.len() > 1 {
            let (a, b) = values.split_at(next);
            if &a[start..] >= b {
                return Err("keys not in ascending order".into());
            }
        }
        start = next;
        offsets.push(i32::try_from(values.len()).map_err(|_| "keys too long")?);
    }
    let values = String::from_utf8(values).map_err(|_| "a key is not UTF-8")?;
    // Each key must be valid UTF-8 on its own, not just their concatenation.
    if offsets
        .iter()
        .any(|&o| !values.is_char_boundary(o as usize))
    {
        return Err("a key is not UTF-8".into());
    }
    let dict = StringArray::try_new(
        arrow::buffer::OffsetBuffer::new(offsets.into()),
        arrow::buffer::Buffer::from_vec(values.into_bytes()),
        None,
    )
    .map_err(|e| e.to_string())?;
    let mut part = Partial {
        dicts: vec![dict],
        urls: (0..nkeys as u32).map(|i| (0, i)).collect(),
        events,
        ..Default::default()
    };
    let check = |k: u64| -> std::result::Result<u64, String> {
        if (k >> 32) as usize >= nkeys {
            return Err("entry of an unknown key".into());
        }
        Ok(k)
    };
    let ncells = r.count(2)?;
    part.cells.reserve_exact(ncells);
    let mut prev = 0u64;
    for i in 0..ncells {
        let d = r.varint()?;
        if i > 0 && d == 0 {
            return Err("cells not distinct".into());
        }
        prev = check(prev.checked_add(d).ok_or("cell key overflows")?)?;
        let c = u32::try_from(r.varint()?).map_err(|_| "count overflows")?;
        part.cells.push((prev, c));
    }
    let nvis = r.count(5)?;
    part.visitors.reserve_exact(nvis);
    prev = 0;
    for _ in 0..nvis {
        prev = check(
            prev.checked_add(r.varint()?)
                .ok_or("visitor key overflows")?,
        )?;
        let h = u32::from_le_bytes(r.bytes(4)?.try_into().expect("4 bytes"));
        part.visitors.push((prev, h));
    }
    if r.pos != body.len() {
        return Err("trailing bytes".into());
    }
    let counted: u64 = part.cells.iter().map(|c| u64::from(c.1)).sum();
    if counted != events {
        return Err(format!("cells add up to {counted} events, not {events}"));
    }
    Ok(part)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Partial {
        Partial {
            dicts: vec![StringArray::from_iter_values(["a.com/", "b.com/x"])],
            urls: vec![(0, 0), (0, 1)],
            cells: vec![(5, 2), (9, 1), ((1 << 32) | 5, 4)],
            visitors: vec![(5, 77), (5, 78), ((1 << 32) | 5, 1)],
            events: 7,
            ..Default::default()
        }
    }

    #[test]
    fn a_partial_reads_back_as_written() {
        let p = sample();
        let bytes = encode(&p, Keying::Url, true);
        let q = decode(&bytes, Keying::Url, true).unwrap();
        assert_eq!(q.events, 7);
        assert_eq!(q.cells, p.cells);
        assert_eq!(q.visitors, p.visitors);
        assert_eq!((q.url(0), q.url(1)), ("a.com/", "b.com/x"));
    }

    #[test]
    fn keys_sharing_prefixes_and_bytes_of_a_character_read_back() {
        let keys = ["", "a", "ab", "abc", "b", "é", "éa", "ê", "ê/😀", "ê/😁"];
        let p = Partial {
            dicts: vec![StringArray::from_iter_values(keys)],
            urls: (0..keys.len() as u32).map(|i| (0, i)).collect(),
            cells: (0..keys.len() as u64).map(|i| (i << 32, 1)).collect(),
            events: keys.len() as u64,
            ..Default::default()
        };
        let q = decode(&encode(&p, Keying::Source, false), Keying::Source, false).unwrap();
        let back: Vec<&str> = (0..keys.len()).map(|i| q.url(i)).collect();
        assert_eq!(back, keys);
    }

    #[test]
    fn any_flipped_byte_or_other_keying_is_refused() {
        let bytes = encode(&sample(), Keying::Url, true);
        assert!(decode(&bytes, Keying::Source, true).is_err());
        assert!(decode(&bytes, Keying::Url, false).is_err());
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(decode(&b, Keying::Url, true).is_err(), "byte {i} flipped");
        }
        assert!(decode(&bytes[..bytes.len() - 1], Keying::Url, true).is_err());
    }
}
