//! Redis key names of the speed layer and the stable URL hash used in them.
//!
//! Layout under the configured prefix `P` (e.g. `tally:`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P instance` | string | random id of the Redis "incarnation" our state lives in; missing = Redis lost our state |
//! | `P epochs` | set | start seqs of the epochs that have keys |
//! | `P e:{start}:applied` | string | last seq of the epoch applied (written in the same script as the increments) |
//! | `P e:{start}:h:{url_hash}` | hash | hour number → views |
//! | `P e:{start}:top` | zset | url → views in the epoch (top-N) |
//! | `P e:{start}:urls` | hash | url_hash → url (so the hour keys can be mapped back and deleted) |
//!
//! | `P e:{start}:v:{url_hash}:{day}` | set | distinct visitor hashes (as i64) of the url on that UTC day |
//! | `P e:{start}:vkeys` | set | names of the epoch's visitor sets (to load and delete them) |

use tally_core::Seq;

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

    pub(crate) fn top(&self, epoch: Seq) -> String {
        format!("{}e:{}:top", self.prefix, epoch.0)
    }

    pub(crate) fn urls(&self, epoch: Seq) -> String {
        format!("{}e:{}:urls", self.prefix, epoch.0)
    }

    pub(crate) fn hours(&self, epoch: Seq, url_hash: &str) -> String {
        format!("{}e:{}:h:{}", self.prefix, epoch.0, url_hash)
    }

    pub(crate) fn visitor_keys(&self, epoch: Seq) -> String {
        format!("{}e:{}:vkeys", self.prefix, epoch.0)
    }

    fn visitors_prefix(&self, epoch: Seq) -> String {
        format!("{}e:{}:v:", self.prefix, epoch.0)
    }

    pub(crate) fn visitors(&self, epoch: Seq, url_hash: &str, day: i64) -> String {
        format!("{}{}:{}", self.visitors_prefix(epoch), url_hash, day)
    }

    /// `(url_hash, day)` of a key made by [`Keys::visitors`].
    pub(crate) fn parse_visitors(&self, epoch: Seq, key: &str) -> Option<(String, i64)> {
        let rest = key.strip_prefix(&self.visitors_prefix(epoch))?;
        let (h, day) = rest.split_once(':')?;
        Some((h.to_string(), day.parse().ok()?))
    }
}

/// 16 lowercase hex chars of a stable 64-bit hash of the URL (FNV-1a followed by the
/// splitmix64 finaliser). Stable across processes, versions and platforms: it names Redis keys
/// that outlive the process. Collisions among the URLs of one epoch are astronomically unlikely
/// (~n²/2⁶⁵); the URL itself is kept as the zset member and in `e:{start}:urls`.
pub(crate) fn url_hash(url: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in url.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    format!("{h:016x}")
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
        assert_eq!(k.top(Seq(1)), "tally:e:1:top");
        assert_eq!(k.urls(Seq(1)), "tally:e:1:urls");
        assert_eq!(
            k.hours(Seq(7), "0123456789abcdef"),
            "tally:e:7:h:0123456789abcdef"
        );
        assert_eq!(k.visitor_keys(Seq(7)), "tally:e:7:vkeys");
        let v = k.visitors(Seq(7), "0123456789abcdef", -3);
        assert_eq!(v, "tally:e:7:v:0123456789abcdef:-3");
        assert_eq!(
            k.parse_visitors(Seq(7), &v),
            Some(("0123456789abcdef".to_string(), -3))
        );
        assert_eq!(k.parse_visitors(Seq(8), &v), None);
    }

    #[test]
    fn url_hash_is_stable_and_sixteen_hex_chars() {
        let a = url_hash("http://example.com/a");
        assert_eq!(a.len(), 16);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(a, url_hash("http://example.com/a"));
        assert_ne!(a, url_hash("http://example.com/b"));
        // Pinned: the hash names keys that outlive the process, so it must never change.
        assert_eq!(a, "42504961764fec74");
        assert_eq!(url_hash(""), "f52a15e9a9b5e89b");
    }
}
