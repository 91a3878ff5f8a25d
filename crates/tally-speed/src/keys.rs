//! Redis key names of the speed layer.
//!
//! Layout under the configured prefix `P` (e.g. `tally:`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P instance` | string | `{LAYOUT}/{dataset_id}/{incarnation}`: whose state this is (see below); missing = Redis lost our state |
//! | `P epochs` | set | start seqs of the epochs that have keys |
//! | `P e:{start}:applied` | string | last seq of the epoch applied (written in the same script as the increments) |
//! | `P e:{start}:urls` | hash | URL id → URL, or source key (`tally_core::dims::source_key`) of a referred view or of the direct views of a URL with referred ones |
//! | `P e:{start}:h:{id}` | hash | cell number (15 minutes, `tally_core::CELL_MS`) → views of URL `id` |
//! | `P e:{start}:v:{id}` | set | distinct visitors of URL `id`, one integer per (15-minute cell, visitor): [`visitor_member`] |
//!
//! **URL ids, not URL hashes.** The applier — the only writer — gives each URL a small integer
//! id, unique among the URLs of the live epochs (the mirror holds the dictionary; a reload takes
//! it back from the `urls` hashes). Two URLs can never share keys, whatever a client sends: a
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
pub(crate) const LAYOUT: &str = "v6";

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

    pub(crate) fn urls(&self, epoch: Seq) -> String {
        format!("{}e:{}:urls", self.prefix, epoch.0)
    }

    pub(crate) fn cells(&self, epoch: Seq, id: &str) -> String {
        format!("{}e:{}:h:{}", self.prefix, epoch.0, id)
    }

    pub(crate) fn visitors(&self, epoch: Seq, id: &str) -> String {
        format!("{}e:{}:v:{}", self.prefix, epoch.0, id)
    }

    /// Keys of the previous layout (`v1`) that [`Keys::epoch_keys`] does not name: deleted
    /// with the epoch when state of that layout is rebuilt.
    pub(crate) fn legacy(&self, epoch: Seq) -> [String; 2] {
        [
            format!("{}e:{}:top", self.prefix, epoch.0),
            format!("{}e:{}:vkeys", self.prefix, epoch.0),
        ]
    }

    /// Every key of an epoch whose `urls` hash lists `ids`.
    pub(crate) fn epoch_keys<'a>(
        &self,
        epoch: Seq,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Vec<String> {
        let mut keys = Vec::new();
        for id in ids {
            keys.push(self.cells(epoch, id));
            keys.push(self.visitors(epoch, id));
        }
        keys.push(self.urls(epoch));
        keys.push(self.applied(epoch));
        keys.extend(self.legacy(epoch));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_follow_the_layout() {
        let k = Keys::new("tally:");
        assert_eq!(k.instance(), "tally:instance");
        assert_eq!(k.epochs(), "tally:epochs");
        assert_eq!(k.applied(Seq(101)), "tally:e:101:applied");
        assert_eq!(k.urls(Seq(1)), "tally:e:1:urls");
        assert_eq!(k.cells(Seq(7), "12"), "tally:e:7:h:12");
        assert_eq!(k.visitors(Seq(7), "12"), "tally:e:7:v:12");
        let all = k.epoch_keys(Seq(7), ["0", "1"]);
        assert_eq!(all.len(), 2 * 2 + 4);
        assert!(all.contains(&"tally:e:7:top".to_string()));
    }

    #[test]
    fn the_marker_names_layout_and_dataset() {
        let m = instance_marker("abc", "x1");
        assert_eq!(m, "v6/abc/x1");
        assert!(marker_is_ours(&m, "abc"));
        assert!(!marker_is_ours(&m, "ab"));
        assert!(!marker_is_ours(&m, "abcd"));
        assert!(!marker_is_ours("v1/abc/x1", "abc"));
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
}
