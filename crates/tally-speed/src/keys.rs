//! Redis key names of the speed layer.
//!
//! Layout under the configured prefix `P` (e.g. `tally:`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P instance` | string | `{LAYOUT}/{dataset_id}/{incarnation}`: whose state this is (see below); missing = Redis lost our state |
//! | `P epochs` | set | start seqs of the epochs that have keys |
//! | `P e:{start}:applied` | string | last seq of the epoch applied (written in the same script as the increments) |
//! | `P e:{start}:buckets` | set | the buckets `b` of 64 URL ids (`64·b …= 64·b + 63`) that hold a URL |
//! | `P e:{start}:nb:{b}` | hash | the names of bucket `b`'s ids: slot (`id − 64·b`) → URL, or source key (`tally_core::dims::source_key`) of a referred view or of the direct views of a URL with referred ones |
//! | `P e:{start}:hb:{b}` | hash | views of bucket `b`'s ids, one field per (id, 15-minute cell): [`cell_field`] → views |
//! | `P e:{start}:vb:{b}` | set | distinct visitors of the 8 URL ids `8·b …= 8·b + 7`, one integer per (id, 15-minute cell, visitor): [`bucket_member`] |
//!
//! **Buckets of ids, not a key per id.** Most live URLs have a few views in a cell or two, and
//! Redis spends ~100 bytes on every key whatever it holds (name, object, dictionary entry,
//! allocator rounding): with a key per id, the overhead was most of Redis's memory (1 342 bytes
//! per live URL, layout `v6`). A bucket of ids in one hash or set is one key, and Redis keeps
//! a small hash of integers as a compact listpack (≤ 128 fields by default) and a small set of
//! integers as an intset (≤ 512 members), a few bytes per entry (names too, while they are
//! ≤ 64 bytes). Visitor members carry the id's slot in their bucket in the 3 bits a cell of the
//! representable range leaves free, so they stay 64-bit integers; cell fields carry it above
//! the cell.
//!
//! **URL ids, not URL hashes.** The applier — the only writer — gives each URL a small integer
//! id, unique among the URLs of the live epochs (the mirror holds the dictionary; a reload takes
//! it back from the name buckets). Two URLs can never share keys, whatever a client sends: a
//! hash of the URL, even a keyed one, can collide, and anyone who can post events could then
//! move counts between URLs. The apply script also refuses to write a URL under an id that
//! Redis maps to another URL, so a mirror that disagrees with Redis never merges two URLs.
//!
//! **The instance marker** names the key layout, the master dataset's history
//! (`tally_master::Master::dataset_id`) and the Redis incarnation (a random id set by each
//! rebuild). State whose marker names another layout or another dataset — Redis kept while the
//! `data_dir` was replaced — is rebuilt from this dataset, never added to its counts.

use tally_core::Seq;

/// Version of this key layout, the first part of the instance marker.
pub(crate) const LAYOUT: &str = "v7";

#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    pub(crate) fn instance(&self) -> String {
        format!("{}instance", self.prefix)
    }

    pub(crate) fn epochs(&self) -> String {
        format!("{}epochs", self.prefix)
    }

    pub(crate) fn applied(&self, epoch: Seq) -> String {
        format!("{}e:{}:applied", self.prefix, epoch.0)
    }

    /// The buckets of the epoch that hold a URL.
    pub(crate) fn buckets(&self, epoch: Seq) -> String {
        format!("{}e:{}:buckets", self.prefix, epoch.0)
    }

    /// The names of the ids of bucket `b` ([`bucket`]).
    pub(crate) fn names(&self, epoch: Seq, b: u32) -> String {
        format!("{}e:{}:nb:{}", self.prefix, epoch.0, b)
    }

    /// The cell hash of the ids of bucket `b` ([`bucket`]).
    pub(crate) fn cells(&self, epoch: Seq, b: u32) -> String {
        format!("{}e:{}:hb:{}", self.prefix, epoch.0, b)
    }

    /// The visitor set of the ids of bucket `b` ([`visitor_bucket`]).
    pub(crate) fn visitors(&self, epoch: Seq, b: u32) -> String {
        format!("{}e:{}:vb:{}", self.prefix, epoch.0, b)
    }

    /// Keys of the `v1` layout that [`Keys::epoch_keys`] does not name: deleted with the epoch
    /// when state of that layout is rebuilt.
    pub(crate) fn legacy(&self, epoch: Seq) -> [String; 2] {
        [
            format!("{}e:{}:top", self.prefix, epoch.0),
            format!("{}e:{}:vkeys", self.prefix, epoch.0),
        ]
    }

    /// The `v6` layout's id → URL hash (before buckets): it names the ids whose
    /// [`Keys::per_id`] keys go with the epoch when state of that layout is rebuilt.
    pub(crate) fn legacy_urls(&self, epoch: Seq) -> String {
        format!("{}e:{}:urls", self.prefix, epoch.0)
    }

    /// The `v6` layout's cell hash and visitor set of URL id `id` (a key per id, before
    /// buckets). The bucket keys have other names, so a leftover can never be read as one.
    pub(crate) fn per_id(&self, epoch: Seq, id: u32) -> [String; 2] {
        [
            format!("{}e:{}:h:{}", self.prefix, epoch.0, id),
            format!("{}e:{}:v:{}", self.prefix, epoch.0, id),
        ]
    }

    /// Every key of this layout of an epoch whose `buckets` set lists `buckets`.
    pub(crate) fn epoch_keys(
        &self,
        epoch: Seq,
        buckets: impl IntoIterator<Item = u32>,
    ) -> Vec<String> {
        let mut keys = Vec::new();
        for b in buckets {
            keys.push(self.names(epoch, b));
            keys.push(self.cells(epoch, b));
            keys.extend(visitor_buckets_of(b).map(|v| self.visitors(epoch, v)));
        }
        keys.push(self.buckets(epoch));
        keys.push(self.applied(epoch));
        keys
    }
}

/// The instance marker of a new incarnation of `dataset_id`'s state.
pub(crate) fn instance_marker(dataset_id: &str, incarnation: &str) -> String {
    format!("{LAYOUT}/{dataset_id}/{incarnation}")
}

/// The marker a rewrite holds while it writes, before it sets `marker`
/// ([`crate::replica::resync`]): never [`marker_is_ours`], so nobody adopts half-written state.
pub(crate) fn rewriting_marker(marker: &str) -> String {
    format!("rewriting/{marker}")
}

/// Whether `marker` is state of this layout and this dataset.
pub(crate) fn marker_is_ours(marker: &str, dataset_id: &str) -> bool {
    marker
        .strip_prefix(LAYOUT)
        .and_then(|r| r.strip_prefix('/'))
        .and_then(|r| r.strip_prefix(dataset_id))
        .is_some_and(|r| r.starts_with('/'))
}

/// One member of a `v:{id}` set: the cell ([`tally_core::CELL_MS`] cells since the epoch; every
/// representable instant's cell fits in 32 signed bits) in the high 32 bits, the visitor's
/// 32-bit sketch hash (`tally_core::sketch::visitor_hash32`) in the low 32. One set per (epoch,
/// URL) holds every cell; Redis stores small sets of integers as compact intsets. (Layout `v5`
/// kept the UTC day here, which cannot answer the local days of a zone whose midnights are not
/// UTC midnights.)
pub(crate) fn visitor_member(cell: i64, hash32: u32) -> i64 {
    (cell << 32) | i64::from(hash32)
}

/// `(cell, hash32)` of a [`visitor_member`].
pub(crate) fn split_visitor_member(m: i64) -> (i64, u32) {
    (m >> 32, (m & 0xffff_ffff) as u32)
}

/// Bits of a URL id that name its slot in a bucket: 64 ids per `nb:{b}` and `hb:{b}` key.
const SLOT_BITS: u32 = 6;
/// Bits of a URL id that name its slot in a visitor set: 8 ids per `vb:{b}` key (all that a
/// 64-bit member leaves beside a 29-bit cell and a 32-bit hash).
const VISITOR_SLOT_BITS: u32 = 3;
/// The cell of [`tally_core::MIN_TS_MS`]: visitor members count cells from it.
const MIN_CELL: i64 = tally_core::MIN_TS_MS.div_euclid(tally_core::CELL_MS);
/// Bits of a cell counted from [`MIN_CELL`]: every representable instant's fits.
const CELL_BITS: u32 = 29;
const _: () =
    assert!(tally_core::MAX_TS_MS.div_euclid(tally_core::CELL_MS) - MIN_CELL < 1 << CELL_BITS);

/// The bucket (names and cells) of URL id `id`.
pub(crate) fn bucket(id: u32) -> u32 {
    id >> SLOT_BITS
}

/// The slot of URL id `id` in its bucket, the field of its name.
pub(crate) fn slot(id: u32) -> u32 {
    id & ((1 << SLOT_BITS) - 1)
}

/// The URL id of `slot` in bucket `b` (`None` for a slot no [`slot`] gives, or past `u32`).
pub(crate) fn id_of(b: u32, slot: u32) -> Option<u32> {
    (slot < 1 << SLOT_BITS)
        .then(|| b.checked_mul(1 << SLOT_BITS))
        .flatten()
        .map(|base| base | slot)
}

/// The visitor set bucket of URL id `id`.
pub(crate) fn visitor_bucket(id: u32) -> u32 {
    id >> VISITOR_SLOT_BITS
}

/// The visitor set buckets of the ids of bucket `b`.
pub(crate) fn visitor_buckets_of(b: u32) -> impl Iterator<Item = u32> {
    let per = 1u32 << (SLOT_BITS - VISITOR_SLOT_BITS);
    let first = b.saturating_mul(per);
    first..=first.saturating_add(per - 1)
}

/// The field of `(id, cell)` in its bucket's cell hash: the id's slot above the cell's 32
/// signed bits (non-negative, at most 38 bits).
pub(crate) fn cell_field(id: u32, cell: i64) -> i64 {
    (i64::from(slot(id)) << 32) | i64::from(cell as i32 as u32)
}

/// `(id, cell)` of field `f` of bucket `b`'s cell hash; `None` for a field no
/// [`cell_field`] makes.
pub(crate) fn split_cell_field(b: u32, f: i64) -> Option<(u32, i64)> {
    let id = id_of(b, u32::try_from(f >> 32).ok()?)?;
    Some((id, i64::from(f as u32 as i32)))
}

/// The member of `(id, visitor member m)` in its bucket's visitor set: the id's slot in the
/// top 3 bits, the cell counted from [`MIN_CELL`] in the next 29, the visitor's hash in the
/// low 32 (as a signed integer, so Redis keeps a small set of them as an intset).
pub(crate) fn bucket_member(id: u32, m: i64) -> i64 {
    let (cell, h) = split_visitor_member(m);
    let slot = u64::from(id & ((1 << VISITOR_SLOT_BITS) - 1));
    let off = (cell - MIN_CELL) as u64;
    debug_assert!(
        off < 1 << CELL_BITS,
        "cell {cell} outside the representable range"
    );
    ((slot << (32 + CELL_BITS)) | (off << 32) | u64::from(h)) as i64
}

/// `(id, visitor member)` of member `m` of bucket `b`'s visitor set.
pub(crate) fn split_bucket_member(b: u32, m: i64) -> Option<(u32, i64)> {
    let m = m as u64;
    let slot = (m >> (32 + CELL_BITS)) as u32;
    let id = b.checked_mul(1 << VISITOR_SLOT_BITS)? | slot;
    let cell = ((m >> 32) & ((1 << CELL_BITS) - 1)) as i64 + MIN_CELL;
    Some((id, visitor_member(cell, m as u32)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_follow_the_layout() {
        let k = Keys::new("tally:");
        assert_eq!(k.instance(), "tally:instance");
        assert_eq!(k.epochs(), "tally:epochs");
        assert_eq!(k.applied(Seq(101)), "tally:e:101:applied");
        assert_eq!(k.buckets(Seq(1)), "tally:e:1:buckets");
        assert_eq!(k.names(Seq(1), 3), "tally:e:1:nb:3");
        assert_eq!(k.cells(Seq(7), 12), "tally:e:7:hb:12");
        assert_eq!(k.visitors(Seq(7), 12), "tally:e:7:vb:12");
        // Buckets 0 and 1: ids 0–127, visitor sets 0–15.
        let all = k.epoch_keys(Seq(7), [0, 1]);
        assert_eq!(all.len(), 2 * (2 + 8) + 2, "{all:?}");
        assert!(all.contains(&"tally:e:7:vb:15".to_string()));
        assert!(all.contains(&"tally:e:7:nb:1".to_string()));
        assert!(all.contains(&"tally:e:7:buckets".to_string()));
        for id in [0, 63, 64, 127] {
            assert!(all.contains(&k.visitors(Seq(7), visitor_bucket(id))));
            assert_eq!(id_of(bucket(id), slot(id)), Some(id));
        }
        assert_eq!(
            visitor_buckets_of(u32::MAX >> 6).last(),
            Some(u32::MAX >> 3)
        );
        assert_eq!(id_of(0, 64), None);
    }

    #[test]
    fn the_marker_names_layout_and_dataset() {
        let m = instance_marker("abc", "x1");
        assert_eq!(m, "v7/abc/x1");
        assert!(marker_is_ours(&m, "abc"));
        assert!(!marker_is_ours(&m, "ab"));
        assert!(!marker_is_ours(&m, "abcd"));
        assert!(!marker_is_ours("v1/abc/x1", "abc"));
        assert!(
            !marker_is_ours("v6/abc/x1", "abc"),
            "the layout before buckets"
        );
        // A marker of the previous layout (a bare incarnation id).
        assert!(!marker_is_ours("18c1f-42-0", "abc"));
        // A rewrite's claim is nobody's state: a loader rebuilds rather than adopt it.
        assert!(!marker_is_ours(&rewriting_marker(&m), "abc"));
    }

    #[test]
    fn visitor_members_round_trip_for_any_cell() {
        use tally_core::{cell_of, MAX_TS_MS, MIN_TS_MS};
        for cell in [
            0i64,
            1,
            1_900_000,
            -1,
            cell_of(MIN_TS_MS),
            cell_of(MAX_TS_MS),
        ] {
            for h in [0u32, 1, u32::MAX, 0x8000_0000] {
                assert_eq!(split_visitor_member(visitor_member(cell, h)), (cell, h));
            }
        }
        assert!(visitor_member(0, 5) < visitor_member(1, 0));
    }

    /// Every (id, cell, visitor) a bucket holds comes back as it went in, at the ends of the
    /// representable range and of the id range, and two ids of one bucket never share a field
    /// or a member.
    #[test]
    fn bucket_fields_and_members_round_trip() {
        use tally_core::{cell_of, MAX_TS_MS, MIN_TS_MS};
        let cells = [
            0i64,
            -1,
            1,
            1_900_000,
            cell_of(MIN_TS_MS),
            cell_of(MAX_TS_MS),
        ];
        let ids = [0u32, 1, 7, 8, 63, 64, 1000, u32::MAX - 1, u32::MAX];
        let mut fields = std::collections::HashSet::new();
        let mut members = std::collections::HashSet::new();
        for id in ids {
            for cell in cells {
                let f = cell_field(id, cell);
                assert!(f >= 0);
                assert_eq!(split_cell_field(bucket(id), f), Some((id, cell)));
                assert!(fields.insert((bucket(id), f)));
                for h in [0u32, 1, u32::MAX, 0x8000_0000] {
                    let m = bucket_member(id, visitor_member(cell, h));
                    assert_eq!(
                        split_bucket_member(visitor_bucket(id), m),
                        Some((id, visitor_member(cell, h)))
                    );
                    assert!(members.insert((visitor_bucket(id), m)));
                }
            }
        }
        // A field no bucket writes (a slot past 63) is refused, not read as another id's.
        assert_eq!(split_cell_field(0, 64 << 32), None);
        assert_eq!(split_cell_field(0, -1), None);
    }
}
