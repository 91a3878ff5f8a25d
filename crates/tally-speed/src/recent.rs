//! The last minutes of page views, per site, for `GET /v1/realtime` (API.md: "the last 5
//! minutes, from the speed layer"). The mirror counts in 15-minute cells, too coarse for that,
//! so the applier also files every event it reads into 10-second buckets of views per URL and
//! visitor hashes per site, and drops buckets older than the window.
//!
//! Each event is filed once: events are taken in seq order and those at or below the last seq
//! filed are skipped, so a rebuild that replays the live epochs from the master dataset fills
//! the window (after a restart that rebuilds) without counting anything twice. After a restart
//! that loads the state from Redis instead, the window holds the events applied since then —
//! it is full again five minutes later.

use std::collections::{BTreeMap, HashMap};

use tally_core::Seq;
use tally_master::SeqEvent;

/// How far back "realtime" looks.
pub const WINDOW_MS: i64 = 5 * 60_000;
/// The resolution of the window.
const BUCKET_MS: i64 = 10_000;

/// One site's views and visitors in one bucket.
#[derive(Debug, Default)]
struct SiteBucket {
    urls: HashMap<String, u64>,
    visitors: Vec<u32>,
}

/// The window: bucket number (`ts / BUCKET_MS`) → host → its share.
#[derive(Debug, Default)]
pub(crate) struct Recent {
    filed_through: Seq,
    buckets: BTreeMap<i64, HashMap<String, SiteBucket>>,
}

/// A site's last minutes ([`crate::SpeedLayer::realtime`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Realtime {
    pub views: u64,
    /// Distinct visitors (32-bit hashes of their ids: exact up to a rare collision).
    pub visitors: u64,
    /// `(url, views)`, most viewed first, then by URL.
    pub pages: Vec<(String, u64)>,
    /// The window's start, epoch ms (a bucket boundary at most `WINDOW_MS + 10 s` ago).
    pub since_ms: i64,
}

impl Recent {
    /// The first bucket a read at `now` covers.
    fn first_bucket(now: i64) -> i64 {
        (now - WINDOW_MS).div_euclid(BUCKET_MS)
    }

    /// Files the events (ascending seq) not filed yet whose time falls in the window at `now`,
    /// and drops the buckets that left it.
    pub(crate) fn file<'a>(&mut self, events: impl IntoIterator<Item = &'a SeqEvent>, now: i64) {
        let first = Self::first_bucket(now);
        if self
            .buckets
            .first_key_value()
            .is_some_and(|(b, _)| *b < first)
        {
            self.buckets = self.buckets.split_off(&first);
        }
        for ev in events {
            if ev.seq <= self.filed_through {
                continue;
            }
            self.filed_through = ev.seq;
            let b = ev.event.ts.div_euclid(BUCKET_MS);
            if b < first {
                continue;
            }
            let Some(host) = tally_core::url::host_of(&ev.event.url) else {
                continue;
            };
            let sites = self.buckets.entry(b).or_default();
            let site = match sites.get_mut(host) {
                Some(s) => s,
                None => sites.entry(host.to_string()).or_default(),
            };
            match site.urls.get_mut(ev.event.url.as_str()) {
                Some(n) => *n += 1,
                None => {
                    site.urls.insert(ev.event.url.clone(), 1);
                }
            }
            if let Some(v) = &ev.event.visitor {
                site.visitors
                    .push(tally_core::sketch::visitor_hash32(v.as_bytes()));
            }
        }
    }

    /// Site `host` in the window at `now`.
    pub(crate) fn site(&self, host: &str, now: i64) -> Realtime {
        let first = Self::first_bucket(now);
        let mut urls: HashMap<&str, u64> = HashMap::new();
        let mut visitors: Vec<u32> = Vec::new();
        // Not the events stamped ahead of the clock (accepted up to `ingest.max_future`).
        let last = now.div_euclid(BUCKET_MS);
        for sites in self.buckets.range(first..=last).map(|(_, s)| s) {
            if let Some(s) = sites.get(host) {
                for (u, n) in &s.urls {
                    *urls.entry(u).or_default() += n;
                }
                visitors.extend_from_slice(&s.visitors);
            }
        }
        visitors.sort_unstable();
        visitors.dedup();
        let mut pages: Vec<(String, u64)> =
            urls.into_iter().map(|(u, n)| (u.to_string(), n)).collect();
        pages.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Realtime {
            views: pages.iter().map(|p| p.1).sum(),
            visitors: visitors.len() as u64,
            pages,
            since_ms: first * BUCKET_MS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::tests::ev;

    #[test]
    fn the_window_counts_recent_events_once() {
        let now = 1_000_000_000_000;
        let mut r = Recent::default();
        let mut events = vec![
            ev(1, "https://a.test/x", now - 1000),
            ev(2, "https://a.test/x", now - 2000),
            ev(3, "https://a.test/y", now - WINDOW_MS + 20_000),
            ev(4, "https://a.test/old", now - WINDOW_MS - 60_000),
            ev(5, "https://b.test/", now),
        ];
        events[0].event.visitor = Some("v1".into());
        events[1].event.visitor = Some("v1".into());
        events[2].event.visitor = Some("v2".into());
        r.file(&events, now);
        // A replay (a rebuild) files nothing twice.
        r.file(&events, now);
        let a = r.site("a.test", now);
        assert_eq!(a.views, 3);
        assert_eq!(a.visitors, 2);
        assert_eq!(
            a.pages,
            vec![
                ("https://a.test/x".to_string(), 2),
                ("https://a.test/y".to_string(), 1)
            ]
        );
        assert_eq!(r.site("b.test", now).views, 1);
        assert_eq!(
            r.site("c.test", now),
            Realtime {
                since_ms: a.since_ms,
                ..Default::default()
            }
        );
        // A minute later y (filed 4 min 40 s before `now`) has left the window.
        let later = now + 60_000;
        r.file(std::iter::empty(), later);
        assert_eq!(r.site("a.test", later).views, 2);
    }
}
