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
//! Encoding (little-endian, integers as LEB128 varints unless said): magic `TLYPART3`, keying
//! byte, visitors byte; a header of events, key count, key section bytes, cell count, cell
//! section bytes, visitor count; the key section, each key front-coded as (bytes shared with
//! the previous key, length of the rest, the rest); the cell section, each cell as (delta of
//! `key << 32 | biased cell` from the previous, count); the visitor section, each as (delta of
//! the same key, hash as 4 raw bytes); then the 32-byte BLAKE3 of all before. The section
//! lengths let the merge read the three sections side by side, a key range at a time, without
//! decoding a partial whole.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tally_master::MasterFile;

use crate::error::{Error, Result};
use crate::kernel::{Keying, Partial};

/// Bumped whenever what a partial means changes (the kernel's cells, keys or hashes).
const FORMAT: u32 = 3;
const MAGIC: &[u8; 8] = b"TLYPART3";
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
        tally_core::sync::lock(&self.used).insert(name.clone());
        Ok(Slot { name })
    }

    /// The partial in `slot`, if it is there and intact; `None` on a full run. A damaged or
    /// unreadable one is logged and `None`: the file is scanned and its partial rewritten.
    pub(crate) fn load(&self, slot: &Slot, keying: Keying, visitors: bool) -> Option<Encoded> {
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
        match Encoded::parse(bytes, keying, visitors) {
            Ok(p) => Some(p),
            Err(reason) => {
                tracing::warn!(path = %path.display(), %reason, "cached partial is corrupt; recomputing it");
                None
            }
        }
    }

    /// Stores `part` in `slot`. A failure is logged: the run goes on, the next one recomputes
    /// the file.
    pub(crate) fn store(&self, slot: &Slot, part: &Encoded) {
        let path = self.dir.join(&slot.name);
        let r = (|| -> std::io::Result<()> {
            let mut tmp = tempfile::NamedTempFile::with_prefix_in(".tmp-partial-", &self.dir)?;
            tmp.write_all(part.bytes())?;
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
        let used = tally_core::sync::lock(&self.used);
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
    let bad = |reason: &str| Error::parquet(path, reason);
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

/// A master file's partial in its encoded form, checked: what the cache stores and what the
/// merge reads, a section at a time, without ever decoding it whole ([`Encoded::keys`],
/// [`Encoded::cells`], [`Encoded::visitors`]). About 3 bytes per (key, cell) and 5 per
/// (key, cell, visitor): a run holds every file's partial this way, not as decoded vectors.
pub(crate) struct Encoded {
    bytes: Vec<u8>,
    pub(crate) nkeys: usize,
    pub(crate) ncells: usize,
    pub(crate) nvisitors: usize,
    pub(crate) events: u64,
    keys_at: usize,
    cells_at: usize,
    visitors_at: usize,
    /// Scan statistics of the row groups it was made of (zero when loaded from the cache).
    pub(crate) rows: u64,
    pub(crate) dictionaries: u64,
    pub(crate) decode_ns: u64,
    pub(crate) agg_ns: u64,
}

impl Encoded {
    /// Encodes a canonical partial (one dictionary, keys ascending and distinct, entries sorted
    /// and distinct: [`crate::kernel`]'s `merge_file`).
    pub(crate) fn new(part: &Partial, keying: Keying, visitors: bool) -> Encoded {
        let mut keys = Vec::with_capacity(part.urls.len() * 16);
        let mut prev: &[u8] = &[];
        for lid in 0..part.urls.len() {
            let s = part.url(lid).as_bytes();
            let shared = prev.iter().zip(s).take_while(|(a, b)| a == b).count();
            put_varint(&mut keys, shared as u64);
            put_varint(&mut keys, (s.len() - shared) as u64);
            keys.extend_from_slice(&s[shared..]);
            prev = s;
        }
        let mut cells = Vec::with_capacity(part.cells.len() * 3);
        let mut prev = 0u64;
        for &(k, c) in &part.cells {
            put_varint(&mut cells, k - prev);
            put_varint(&mut cells, c);
            prev = k;
        }
        let mut vis = Vec::with_capacity(part.visitors.len() * 5);
        prev = 0;
        for &(k, h) in &part.visitors {
            put_varint(&mut vis, k - prev);
            vis.extend_from_slice(&h.to_le_bytes());
            prev = k;
        }
        let mut out = Vec::with_capacity(80 + keys.len() + cells.len() + vis.len());
        out.extend_from_slice(MAGIC);
        out.push(keying_byte(keying));
        out.push(u8::from(visitors));
        for v in [
            part.events,
            part.urls.len() as u64,
            keys.len() as u64,
            part.cells.len() as u64,
            cells.len() as u64,
            part.visitors.len() as u64,
        ] {
            put_varint(&mut out, v);
        }
        let keys_at = out.len();
        out.extend_from_slice(&keys);
        let cells_at = out.len();
        out.extend_from_slice(&cells);
        let visitors_at = out.len();
        out.extend_from_slice(&vis);
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        Encoded {
            bytes: out,
            nkeys: part.urls.len(),
            ncells: part.cells.len(),
            nvisitors: part.visitors.len(),
            events: part.events,
            keys_at,
            cells_at,
            visitors_at,
            rows: part.rows,
            dictionaries: part.dictionaries,
            decode_ns: part.decode_ns,
            agg_ns: part.agg_ns,
        }
    }

    /// Checks `bytes` (checksum, header, and every entry: keys ascending, distinct and UTF-8,
    /// cells distinct and adding up to the events, every entry of a known key) and keeps them.
    pub(crate) fn parse(
        bytes: Vec<u8>,
        keying: Keying,
        visitors: bool,
    ) -> std::result::Result<Encoded, String> {
        if bytes.len() < MAGIC.len() + 32 {
            return Err("too short".into());
        }
        let body_len = bytes.len() - 32;
        let (body, sum) = bytes.split_at(body_len);
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
        let keys_len = r.count(1)?;
        let ncells = r.count(2)?;
        let cells_len = r.count(1)?;
        let nvisitors = r.count(5)?;
        let keys_at = r.pos;
        let cells_at = keys_at
            .checked_add(keys_len)
            .filter(|&e| e <= body_len)
            .ok_or("key section exceeds the file")?;
        let visitors_at = cells_at
            .checked_add(cells_len)
            .filter(|&e| e <= body_len)
            .ok_or("cell section exceeds the file")?;
        let enc = Encoded {
            bytes,
            nkeys,
            ncells,
            nvisitors,
            events,
            keys_at,
            cells_at,
            visitors_at,
            rows: 0,
            dictionaries: 0,
            decode_ns: 0,
            agg_ns: 0,
        };
        enc.check()?;
        Ok(enc)
    }

    /// Walks every section once (see [`Encoded::parse`]).
    fn check(&self) -> std::result::Result<(), String> {
        let mut keys = self.keys();
        let mut prev: Vec<u8> = Vec::new();
        for i in 0..self.nkeys {
            let key = keys.next_key()?;
            if i > 0 && key <= prev.as_slice() {
                return Err("keys not in ascending order".into());
            }
            std::str::from_utf8(key).map_err(|_| "a key is not UTF-8")?;
            prev.clear();
            prev.extend_from_slice(key);
        }
        if keys.r.pos != self.cells_at {
            return Err("key section of the wrong length".into());
        }
        let known = |k: u64| -> std::result::Result<(), String> {
            match (k >> 32) < self.nkeys as u64 {
                true => Ok(()),
                false => Err("entry of an unknown key".into()),
            }
        };
        let mut cells = self.cells();
        let mut counted = 0u64;
        let mut last = None;
        for _ in 0..self.ncells {
            let (k, c) = cells.next_entry()?;
            if last == Some(k) {
                return Err("cells not distinct".into());
            }
            known(k)?;
            counted = counted.checked_add(c).ok_or("counts overflow")?;
            last = Some(k);
        }
        if cells.r.pos != self.visitors_at {
            return Err("cell section of the wrong length".into());
        }
        if counted != self.events {
            return Err(format!(
                "cells add up to {counted} events, not {}",
                self.events
            ));
        }
        let mut vis = self.visitors();
        for _ in 0..self.nvisitors {
            known(vis.next_entry()?.0)?;
        }
        if vis.r.pos != self.bytes.len() - 32 {
            return Err("trailing bytes".into());
        }
        Ok(())
    }

    /// The whole encoded form, checksum included (what the cache writes).
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The keys, in ascending order.
    pub(crate) fn keys(&self) -> Keys<'_> {
        Keys {
            r: Reader {
                buf: &self.bytes[..self.cells_at],
                pos: self.keys_at,
            },
            key: Vec::new(),
        }
    }

    /// `(key id << 32 | biased cell, count)`, ascending.
    pub(crate) fn cells(&self) -> Entries<'_> {
        Entries {
            r: Reader {
                buf: &self.bytes[..self.visitors_at],
                pos: self.cells_at,
            },
            prev: 0,
            hash: false,
        }
    }

    /// `(key id << 32 | biased cell, visitor hash)`, ascending.
    pub(crate) fn visitors(&self) -> Entries<'_> {
        Entries {
            r: Reader {
                buf: &self.bytes[..self.bytes.len() - 32],
                pos: self.visitors_at,
            },
            prev: 0,
            hash: true,
        }
    }
}

/// The keys of an [`Encoded`] partial, front-coded.
pub(crate) struct Keys<'a> {
    r: Reader<'a>,
    key: Vec<u8>,
}

impl Keys<'_> {
    /// The next key's bytes (valid UTF-8 once [`Encoded::parse`] or [`Encoded::new`] made it).
    pub(crate) fn next_key(&mut self) -> std::result::Result<&[u8], String> {
        let shared = usize::try_from(self.r.varint()?).map_err(|_| "prefix too long")?;
        let len = self.r.count(1)?;
        if shared > self.key.len() {
            return Err("prefix longer than the previous key".into());
        }
        self.key.truncate(shared);
        self.key.extend_from_slice(self.r.bytes(len)?);
        Ok(&self.key)
    }
}

/// The cells or the visitors of an [`Encoded`] partial, in order.
pub(crate) struct Entries<'a> {
    r: Reader<'a>,
    prev: u64,
    hash: bool,
}

impl Entries<'_> {
    /// `(key << 32 | biased cell, value)`: a count, or a visitor hash (below 2^32).
    pub(crate) fn next_entry(&mut self) -> std::result::Result<(u64, u64), String> {
        self.prev = self
            .prev
            .checked_add(self.r.varint()?)
            .ok_or("entry key overflows")?;
        let v = match self.hash {
            true => u64::from(u32::from_le_bytes(
                self.r.bytes(4)?.try_into().expect("4 bytes"),
            )),
            false => self.r.varint()?,
        };
        Ok((self.prev, v))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;

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

    type Decoded = (Vec<String>, Vec<(u64, u64)>, Vec<(u64, u32)>);

    fn decode(e: &Encoded) -> Decoded {
        let mut keys = e.keys();
        let names = (0..e.nkeys)
            .map(|_| String::from_utf8(keys.next_key().unwrap().to_vec()).unwrap())
            .collect();
        let mut cells = e.cells();
        let mut vis = e.visitors();
        (
            names,
            (0..e.ncells).map(|_| cells.next_entry().unwrap()).collect(),
            (0..e.nvisitors)
                .map(|_| vis.next_entry().map(|(k, h)| (k, h as u32)).unwrap())
                .collect(),
        )
    }

    fn encode(p: &Partial, keying: Keying, visitors: bool) -> Vec<u8> {
        Encoded::new(p, keying, visitors).bytes().to_vec()
    }

    #[test]
    fn a_partial_reads_back_as_written() {
        let p = sample();
        let q = Encoded::parse(encode(&p, Keying::Url, true), Keying::Url, true).unwrap();
        assert_eq!(q.events, 7);
        let (names, cells, visitors) = decode(&q);
        assert_eq!(names, ["a.com/", "b.com/x"]);
        assert_eq!(cells, p.cells);
        assert_eq!(visitors, p.visitors);
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
        let q = Encoded::parse(encode(&p, Keying::Source, false), Keying::Source, false).unwrap();
        assert_eq!(decode(&q).0, keys);
    }

    #[test]
    fn any_flipped_byte_or_other_keying_is_refused() {
        let bytes = encode(&sample(), Keying::Url, true);
        assert!(Encoded::parse(bytes.clone(), Keying::Source, true).is_err());
        assert!(Encoded::parse(bytes.clone(), Keying::Url, false).is_err());
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(
                Encoded::parse(b, Keying::Url, true).is_err(),
                "byte {i} flipped"
            );
        }
        assert!(Encoded::parse(bytes[..bytes.len() - 1].to_vec(), Keying::Url, true).is_err());
    }

    /// A partial whose checksum matches but whose content breaks a rule the merge relies on
    /// (written by a bug, or by hand) is refused too.
    #[test]
    fn a_well_summed_partial_that_breaks_a_rule_is_refused() {
        let reseal = |mut body: Vec<u8>| {
            let sum = blake3::hash(&body);
            body.extend_from_slice(sum.as_bytes());
            body
        };
        let body = |p: &Partial| {
            let b = encode(p, Keying::Url, true);
            b[..b.len() - 32].to_vec()
        };
        assert!(Encoded::parse(reseal(body(&sample())), Keying::Url, true).is_ok());
        let mut unsorted = sample();
        unsorted.dicts = vec![StringArray::from_iter_values(["b.com/", "a.com/x"])];
        assert!(Encoded::parse(reseal(body(&unsorted)), Keying::Url, true).is_err());
        let mut miscounted = sample();
        miscounted.events = 8;
        assert!(Encoded::parse(reseal(body(&miscounted)), Keying::Url, true).is_err());
        let mut unknown = sample();
        unknown.visitors.push((2 << 32, 9));
        assert!(Encoded::parse(reseal(body(&unknown)), Keying::Url, true).is_err());
    }
}
