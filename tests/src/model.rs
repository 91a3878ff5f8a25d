//! The reference model the end-to-end tests compare the server against: the events it
//! acknowledged, what `/v1/views` and `/v1/top` must answer for them, and the helpers that send
//! events, query the server and assert the answers match (shared by `tests/batch.rs` and
//! `tests/speed.rs`), plus small time and URL helpers used across the test files.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, SecondsFormat};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::Rng;
use serde_json::{json, Value};

use crate::TestServer;

/// `Content-Type` of a JSON event body.
pub const JSON: &str = "application/json";
/// `Content-Type` of an NDJSON event body.
pub const NDJSON: &str = "application/x-ndjson";
/// One hour in ms.
pub const HOUR_MS: i64 = 3_600_000;
/// One day in ms.
pub const DAY_MS: i64 = 24 * HOUR_MS;

/// Now, in epoch ms.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Epoch ms as RFC 3339 UTC with whole seconds (`2026-01-02T03:04:05Z`).
pub fn rfc3339(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .expect("valid timestamp")
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Epoch ms as RFC 3339 UTC with milliseconds (`2026-01-02T03:04:05.678Z`).
pub fn rfc3339_ms(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .expect("valid timestamp")
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// An RFC 3339 time string in a JSON answer, as epoch ms.
pub fn parse_ms(s: &Value) -> i64 {
    let s = s
        .as_str()
        .unwrap_or_else(|| panic!("not a time string: {s}"));
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("bad time {s:?}: {e}"))
        .timestamp_millis()
}

/// Percent-encodes a query parameter value (everything but RFC 3986 unreserved characters).
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The host of an absolute URL.
pub fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").expect("absolute url").1;
    rest.split(['/', '?']).next().unwrap()
}

/// A `[from, to)` range in epoch ms; `None` is open.
#[derive(Debug, Clone, Copy, Default)]
pub struct Range {
    /// Start, inclusive.
    pub from: Option<i64>,
    /// End, exclusive.
    pub to: Option<i64>,
}

impl Range {
    /// All time.
    pub fn all() -> Range {
        Range::default()
    }

    /// Whether `ts` is in the range.
    pub fn contains(&self, ts: i64) -> bool {
        self.from.is_none_or(|f| ts >= f) && self.to.is_none_or(|t| ts < t)
    }

    /// The `&from=…&to=…` query parameters of the range.
    pub fn query(&self) -> String {
        let mut q = String::new();
        if let Some(f) = self.from {
            q.push_str(&format!("&from={}", enc(&rfc3339(f))));
        }
        if let Some(t) = self.to {
            q.push_str(&format!("&to={}", enc(&rfc3339(t))));
        }
        q
    }
}

/// What the server acknowledged: `(url, ts ms)` per event.
#[derive(Default, Clone)]
pub struct Model {
    /// `(url, ts ms)`, in the order sent.
    pub events: Vec<(String, i64)>,
}

impl Model {
    /// Views of `url` in `r`.
    pub fn views(&self, url: &str, r: Range) -> u64 {
        self.events
            .iter()
            .filter(|(u, ts)| u == url && r.contains(*ts))
            .count() as u64
    }

    /// Views of `url` in `r` per non-empty bucket of `granularity` (`hour`, `day`, `month`).
    pub fn series(&self, url: &str, r: Range, granularity: &str) -> Vec<(i64, u64)> {
        let bucket = |ts: i64| -> i64 {
            match granularity {
                "hour" => ts.div_euclid(HOUR_MS) * HOUR_MS,
                "day" => ts.div_euclid(DAY_MS) * DAY_MS,
                "month" => {
                    use chrono::Datelike;
                    let d = DateTime::from_timestamp_millis(ts).unwrap().date_naive();
                    chrono::NaiveDate::from_ymd_opt(d.year(), d.month(), 1)
                        .unwrap()
                        .and_hms_opt(0, 0, 0)
                        .unwrap()
                        .and_utc()
                        .timestamp_millis()
                }
                g => panic!("granularity {g}"),
            }
        };
        let mut buckets: BTreeMap<i64, u64> = BTreeMap::new();
        for (u, ts) in &self.events {
            if u == url && r.contains(*ts) {
                *buckets.entry(bucket(*ts)).or_insert(0) += 1;
            }
        }
        buckets.into_iter().collect()
    }

    /// The `limit` most viewed URLs in `r` (optionally of one host), most views first, ties by
    /// URL.
    pub fn top(&self, limit: usize, host: Option<&str>, r: Range) -> Vec<(String, u64)> {
        let mut counts: HashMap<&str, u64> = HashMap::new();
        for (u, ts) in &self.events {
            if r.contains(*ts) && host.is_none_or(|h| host_of(u) == h) {
                *counts.entry(u.as_str()).or_insert(0) += 1;
            }
        }
        let mut items: Vec<(String, u64)> = counts
            .into_iter()
            .map(|(u, n)| (u.to_string(), n))
            .collect();
        items.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        items.truncate(limit);
        items
    }
}

/// URLs over several hosts, some with a query string.
pub fn make_urls(n: usize, hosts: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let host = format!("site{}.test", i % hosts);
            if i % 5 == 0 {
                format!("https://{host}/p/{i}?ref=x{i}")
            } else {
                format!("https://{host}/p/{i}")
            }
        })
        .collect()
}

/// Posts page views `(url, ts, visitor)` in one `/v1/events` request; they must be accepted.
pub fn post_visits<U: AsRef<str>, V: AsRef<str>>(server: &TestServer, events: &[(U, i64, V)]) {
    let body: Vec<Value> = events
        .iter()
        .map(|(u, ts, v)| json!({"url": u.as_ref(), "ts": ts, "visitor": v.as_ref()}))
        .collect();
    let (code, resp) = server.post_events(Value::Array(body).to_string(), JSON);
    assert_eq!(code, 202, "ingest: {resp}");
}

/// Posts events for these URLs with these timestamps.
pub fn ingest_exact(server: &TestServer, model: &mut Model, events: &[(String, i64)]) {
    let body: Vec<Value> = events
        .iter()
        .map(|(u, ts)| json!({"url": u, "ts": ts}))
        .collect();
    let (code, resp) = server.post_events(Value::Array(body).to_string(), JSON);
    assert_eq!(code, 202, "ingest: {resp}");
    model.events.extend_from_slice(events);
}

/// Posts `n` events on random URLs with `ts` in the last ~30 days; records them in the model.
pub fn ingest_random(
    server: &TestServer,
    model: &mut Model,
    rng: &mut StdRng,
    urls: &[String],
    n: usize,
) {
    let now = now_ms();
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(500);
        let mut batch = Vec::with_capacity(k);
        let mut events = Vec::with_capacity(k);
        for _ in 0..k {
            // Skewed: low indexes are hotter, so top-N has a clear order and ties too.
            let i = rng.random_range(0..urls.len());
            let i = rng.random_range(0..=i);
            let url = urls[i].clone();
            let ts = now - rng.random_range(0..30 * DAY_MS);
            events.push(json!({"url": url, "ts": ts}));
            batch.push((url, ts));
        }
        let (code, body) = server.post_events(Value::Array(events).to_string(), JSON);
        assert_eq!(code, 202, "ingest: {body}");
        assert_eq!(body["accepted"].as_u64(), Some(k as u64), "{body}");
        model.events.extend(batch);
        sent += k;
    }
}

/// A random hour-aligned range within the last ~31 days (sometimes open on one side).
pub fn random_range(rng: &mut StdRng) -> Range {
    let now_h = now_ms().div_euclid(HOUR_MS) * HOUR_MS;
    let from = now_h - rng.random_range(0..31 * 24) * HOUR_MS;
    let to = from + rng.random_range(1..=20 * 24) * HOUR_MS;
    match rng.random_range(0..6) {
        0 => Range {
            from: Some(from),
            to: None,
        },
        1 => Range {
            from: None,
            to: Some(to),
        },
        _ => Range {
            from: Some(from),
            to: Some(to),
        },
    }
}

/// The path and query of `GET /v1/views` for this URL, range and granularity.
pub fn views_query(url: &str, r: Range, granularity: &str) -> String {
    format!(
        "/v1/views?url={}{}&granularity={granularity}",
        enc(url),
        r.query()
    )
}

/// `GET /v1/views` asserting `200` and the internal consistency of the answer.
pub fn get_views(server: &TestServer, url: &str, r: Range, granularity: &str) -> Value {
    let q = views_query(url, r, granularity);
    let (code, body) = server.get(&q);
    assert_eq!(code, 200, "GET {q}: {body}");
    let (v, b, s) = (
        body["views"].as_u64(),
        body["batch_views"].as_u64(),
        body["speed_views"].as_u64(),
    );
    assert!(v.is_some() && b.is_some() && s.is_some(), "GET {q}: {body}");
    assert_eq!(
        v.unwrap(),
        b.unwrap() + s.unwrap(),
        "views != batch + speed: {q}: {body}"
    );
    body
}

/// `GET /v1/views` (total) asserting the count matches the model; returns the answer.
pub fn assert_views(server: &TestServer, model: &Model, url: &str, r: Range) -> Value {
    let body = get_views(server, url, r, "total");
    assert_eq!(
        body["views"].as_u64().unwrap(),
        model.views(url, r),
        "views of {url} in {r:?}: {body}"
    );
    body
}

/// `GET /v1/views` with a series, asserting every bucket and the total match the model.
pub fn assert_series(server: &TestServer, model: &Model, url: &str, r: Range, granularity: &str) {
    let body = get_views(server, url, r, granularity);
    let got: Vec<(i64, u64)> = body["series"]
        .as_array()
        .unwrap_or_else(|| panic!("no series: {body}"))
        .iter()
        .map(|p| (parse_ms(&p["start"]), p["views"].as_u64().expect("views")))
        .collect();
    assert_eq!(
        got,
        model.series(url, r, granularity),
        "{granularity} series of {url} in {r:?}: {body}"
    );
    assert_eq!(
        body["views"].as_u64().unwrap(),
        model.views(url, r),
        "{body}"
    );
}

/// `GET /v1/top`, asserting the ranking matches the model.
pub fn assert_top(server: &TestServer, model: &Model, limit: usize, host: Option<&str>, r: Range) {
    let mut q = format!("/v1/top?limit={limit}{}", r.query());
    if let Some(h) = host {
        q.push_str(&format!("&host={}", enc(h)));
    }
    let (code, body) = server.get(&q);
    assert_eq!(code, 200, "GET {q}: {body}");
    let got = top_items(&body);
    assert_eq!(got, model.top(limit, host, r), "GET {q}: {body}");
}

/// The `(url, views)` items of a `GET /v1/top` answer, in order.
pub fn top_items(body: &Value) -> Vec<(String, u64)> {
    body["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items: {body}"))
        .iter()
        .map(|i| {
            (
                i["url"].as_str().unwrap().to_string(),
                i["views"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Probes views (total + random ranges), day series and top-N against the model.
pub fn assert_exact(server: &TestServer, model: &Model, rng: &mut StdRng, urls: &[String]) {
    let hosts: Vec<&str> = {
        let mut h: Vec<&str> = urls.iter().map(|u| host_of(u)).collect();
        h.sort();
        h.dedup();
        h
    };
    for url in urls.choose_multiple(rng, 8) {
        assert_views(server, model, url, Range::all());
        for _ in 0..3 {
            let r = random_range(rng);
            assert_views(server, model, url, r);
        }
        assert_series(server, model, url, Range::all(), "day");
        let r = random_range(rng);
        assert_series(server, model, url, r, "day");
        let r = random_range(rng);
        assert_series(
            server,
            model,
            url,
            r,
            ["hour", "month"][rng.random_range(0..2)],
        );
    }
    assert_views(server, model, "https://never.seen.test/x", Range::all());
    for limit in [1, 3, 10, 1000] {
        assert_top(server, model, limit, None, Range::all());
    }
    for host in &hosts {
        assert_top(server, model, 5, Some(host), Range::all());
    }
    for _ in 0..3 {
        let r = random_range(rng);
        assert_top(server, model, 10, None, r);
        assert_top(server, model, 10, Some(hosts.choose(rng).unwrap()), r);
    }
}

/// The random seed: `$TALLY_TEST_SEED`, else a fresh one (printed, to replay).
pub fn seed() -> u64 {
    let seed = std::env::var("TALLY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("seed = {seed} (set TALLY_TEST_SEED to replay)");
    seed
}

/// `POST /v1/admin/forget?url_prefix=P&wait=true` on `server`, asserting `200` and that it
/// dropped exactly the model's events under `prefix`, which leave the model; returns the
/// response.
pub fn forget_prefix(server: &TestServer, model: &mut Model, prefix: &str) -> Value {
    let (code, body) = server.post(&format!("/v1/admin/forget?url_prefix={prefix}&wait=true"));
    assert_eq!(code, 200, "{body}");
    let before = model.events.len();
    model.events.retain(|(u, _)| !u.starts_with(prefix));
    assert!(model.events.len() < before);
    assert_eq!(
        body["events_dropped"].as_u64(),
        Some((before - model.events.len()) as u64),
        "{body}"
    );
    body
}

/// `POST /v1/admin/batch?wait=true`, asserting `200`; returns the response.
pub fn batch_run(server: &TestServer) -> Value {
    let (code, body) = server.post("/v1/admin/batch?wait=true");
    assert_eq!(code, 200, "POST /v1/admin/batch?wait=true: {body}");
    assert!(body["version"].is_string(), "{body}");
    body
}
