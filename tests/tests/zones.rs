//! Time zones (API.md, "Time zones"): `/v1/views` series and totals and `/v1/top` in local
//! hours, days and months of zones with DST (23- and 25-hour days, the repeated hour of a
//! fall-back night), half- and quarter-hour offsets and a 30-minute DST shift, against a model
//! that buckets every acknowledged event by its local time — before a batch run, after it, and
//! with new events in the speed layer on top of the batch view. The same for unique visitors
//! (`/v1/uniques`, `/v1/site` and its buckets, `/v1/breakdown`, the Stats API): exact here,
//! where every set is below the sketch's sparse limit, in every zone — also where local
//! midnights are not UTC midnights.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, Offset, TimeZone, Timelike};
use chrono_tz::Tz;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tally_e2e::{
    batch_run, enc, ingest_exact, parse_ms, post_visits, seed, top_items, Model, ServerOpts,
    TestServer, HOUR_MS,
};

/// Zones with DST, 30/45-minute offsets, Lord Howe's 30-minute DST and a midnight DST gap.
/// The pages every test here sends views to.
const URLS: [&str; 3] = [
    "https://a.test/",
    "https://a.test/pricing",
    "https://b.test/",
];

const ZONES: &[&str] = &[
    "UTC",
    "Europe/Berlin",
    "America/St_Johns",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "Australia/Eucla",
    "America/Havana",
];

/// DST transitions of 2026 in those zones (UTC), around which the events cluster.
const TRANSITIONS: &[&str] = &[
    "2026-03-08T05:00:00Z", // America/Havana springs forward at local midnight
    "2026-03-08T05:30:00Z", // America/St_Johns springs forward
    "2026-03-29T01:00:00Z", // Europe/Berlin springs forward (a 23-hour day)
    "2026-04-04T15:00:00Z", // Australia/Lord_Howe falls back by 30 minutes
    "2026-10-03T15:30:00Z", // Australia/Lord_Howe springs forward by 30 minutes
    "2026-10-25T01:00:00Z", // Europe/Berlin falls back (a 25-hour day, 02:00 twice)
    "2026-11-01T04:30:00Z", // America/St_Johns falls back
];

fn ms(s: &str) -> i64 {
    DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
}

/// What identifies a local bucket: date and hour at one UTC offset for `hour` (so the two
/// 02:00 hours of a fall-back night differ), the local date for `day`, year and month for
/// `month`.
type Label = (i32, u32, u32, u32, i32);

fn label(tz: Tz, ts: i64, granularity: &str) -> Label {
    let dt = tz.timestamp_millis_opt(ts).unwrap();
    let off = dt.offset().fix().local_minus_utc();
    match granularity {
        "hour" => (dt.year(), dt.month(), dt.day(), dt.hour(), off),
        "day" => (dt.year(), dt.month(), dt.day(), 0, 0),
        "month" => (dt.year(), dt.month(), 0, 0, 0),
        g => panic!("granularity {g}"),
    }
}

/// The first instant at or after local time `naive` (the end of a DST gap when it has none).
fn instant(tz: Tz, naive: NaiveDateTime) -> i64 {
    let mut t = naive;
    loop {
        if let Some(d) = tz.from_local_datetime(&t).earliest() {
            return d.timestamp_millis();
        }
        t += chrono::Duration::minutes(15);
    }
}

/// A local-hour-aligned range of a few hours to a few days around a transition, as the local
/// date-times the query sends (`2026-10-25T01:00`) and the instants they name.
fn local_range(rng: &mut StdRng, tz: Tz) -> (String, String, i64, i64) {
    let t = ms(TRANSITIONS[rng.random_range(0..TRANSITIONS.len())]);
    let a = t - rng.random_range(0..40) * HOUR_MS;
    let b = t + rng.random_range(1..40) * HOUR_MS;
    let naive = |ts: i64| {
        let l = tz.timestamp_millis_opt(ts).unwrap().naive_local();
        l.date().and_hms_opt(l.hour(), 0, 0).unwrap()
    };
    let (na, nb) = (naive(a), naive(b));
    let fmt = |n: NaiveDateTime| n.format("%Y-%m-%dT%H:%M").to_string();
    (fmt(na), fmt(nb), instant(tz, na), instant(tz, nb))
}

/// Checks one `/v1/views` series in `zone` against the model, bucket by bucket, each with its
/// batch and speed parts (the model's first `in_batch` events are in the batch view).
fn check_series(
    server: &TestServer,
    model: &Model,
    in_batch: usize,
    url: &str,
    zone: &str,
    g: &str,
    range: Option<(String, String, i64, i64)>,
) {
    let tz: Tz = zone.parse().unwrap();
    let mut q = format!(
        "/v1/views?url={}&granularity={g}&tz={}",
        enc(url),
        enc(zone)
    );
    let (from, to) = match &range {
        Some((fs, ts, f, t)) => {
            q.push_str(&format!("&from={}&to={}", enc(fs), enc(ts)));
            (*f, *t)
        }
        None => (i64::MIN, i64::MAX),
    };
    let (code, body) = server.get(&q);
    assert_eq!(code, 200, "GET {q}: {body}");
    assert_eq!(body["tz"], zone, "{body}");
    if range.is_some() {
        assert_eq!(parse_ms(&body["from"]), from, "echoed from of {q}: {body}");
        assert_eq!(parse_ms(&body["to"]), to, "echoed to of {q}: {body}");
    }
    let mut want: BTreeMap<Label, (u64, u64)> = BTreeMap::new();
    let mut total = 0;
    for (i, (u, ts)) in model.events.iter().enumerate() {
        if u == url && (from..to).contains(ts) {
            let parts = want.entry(label(tz, *ts, g)).or_default();
            if i < in_batch {
                parts.0 += 1;
            } else {
                parts.1 += 1;
            }
            total += 1;
        }
    }
    let mut got: BTreeMap<Label, (u64, u64)> = BTreeMap::new();
    let mut last = i64::MIN;
    for b in body["series"]
        .as_array()
        .unwrap_or_else(|| panic!("no series: {body}"))
    {
        let start = parse_ms(&b["start"]);
        assert!(start > last, "buckets ascend: {q}: {body}");
        last = start;
        // Each start is the first instant of its local bucket.
        assert_ne!(
            label(tz, start - 1, g),
            label(tz, start, g),
            "{} is not where a local {g} starts in {zone}: {q}",
            b["start"]
        );
        let parts = (
            b["batch_views"].as_u64().unwrap(),
            b["speed_views"].as_u64().unwrap(),
        );
        assert_eq!(b["views"].as_u64(), Some(parts.0 + parts.1), "{q}: {b}");
        let prev = got.insert(label(tz, start, g), parts);
        assert!(prev.is_none(), "two buckets for one local {g}: {q}: {body}");
    }
    assert_eq!(got, want, "{g} series of {url} in {zone}: {q}");
    assert_eq!(body["views"].as_u64(), Some(total), "total of {q}: {body}");
}

fn check_top(server: &TestServer, model: &Model, zone: &str, rng: &mut StdRng) {
    let tz: Tz = zone.parse().unwrap();
    let (fs, ts, from, to) = local_range(rng, tz);
    let q = format!(
        "/v1/top?limit=10&tz={}&from={}&to={}",
        enc(zone),
        enc(&fs),
        enc(&ts)
    );
    let (code, body) = server.get(&q);
    assert_eq!(code, 200, "GET {q}: {body}");
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    for (u, t) in &model.events {
        if (from..to).contains(t) {
            *counts.entry(u).or_default() += 1;
        }
    }
    let mut want: Vec<(String, u64)> = counts
        .into_iter()
        .map(|(u, n)| (u.to_string(), n))
        .collect();
    want.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    want.truncate(10);
    assert_eq!(top_items(&body), want, "GET {q}: {body}");
}

fn probe(server: &TestServer, model: &Model, in_batch: usize, urls: &[&str], rng: &mut StdRng) {
    server.wait_caught_up();
    for zone in ZONES {
        let tz: Tz = zone.parse().unwrap();
        for url in urls {
            for g in ["hour", "day", "month"] {
                check_series(server, model, in_batch, url, zone, g, None);
                let range = Some(local_range(rng, tz));
                check_series(server, model, in_batch, url, zone, g, range);
            }
        }
        check_top(server, model, zone, rng);
    }
}

/// Events at arbitrary milliseconds around every transition of 2026, on three URLs.
fn events_around_transitions(rng: &mut StdRng, urls: &[&str], n: usize) -> Vec<(String, i64)> {
    (0..n)
        .map(|_| {
            let t = ms(TRANSITIONS[rng.random_range(0..TRANSITIONS.len())]);
            let ts = t + rng.random_range(-30 * HOUR_MS..30 * HOUR_MS);
            (urls[rng.random_range(0..urls.len())].to_string(), ts)
        })
        .collect()
}

#[test]
fn counts_in_local_hours_days_and_months_of_any_zone_match_the_model() {
    let mut rng = StdRng::seed_from_u64(seed());
    let server = TestServer::start(ServerOpts::default());
    let urls = URLS;
    let mut model = Model::default();
    let events = events_around_transitions(&mut rng, &urls, 1500);
    ingest_exact(&server, &mut model, &events);
    probe(&server, &model, 0, &urls, &mut rng);
    batch_run(&server);
    let in_batch = model.events.len();
    probe(&server, &model, in_batch, &urls, &mut rng);
    // New events in the speed layer on top of the batch view.
    let events = events_around_transitions(&mut rng, &urls, 700);
    ingest_exact(&server, &mut model, &events);
    probe(&server, &model, in_batch, &urls, &mut rng);
}

#[test]
fn unknown_zones_are_refused() {
    let server = TestServer::start(ServerOpts::default());
    for q in [
        "/v1/views?url=https%3A%2F%2Fa.test%2F&tz=Mars%2FOlympus",
        "/v1/top?tz=UTC%2B1",
        "/v1/uniques?url=https%3A%2F%2Fa.test%2F&tz=Asia%2FBombay2&from=2026-11-01",
    ] {
        let (code, body) = server.get(q);
        assert_eq!(code, 400, "GET {q}: {body}");
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(
            msg.ends_with('.') && !msg.contains('\n'),
            "one sentence: {body}"
        );
    }
    // Uniques are day-aligned in the zone: London's midnights are UTC midnights in November.
    let (code, body) = server.get(
        "/v1/uniques?url=https%3A%2F%2Fa.test%2F&tz=Europe%2FLondon&from=2026-11-01&to=2026-11-03",
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["tz"], "Europe/London");
    assert_eq!(
        parse_ms(&body["from"]),
        ms("2026-11-01T00:00:00Z"),
        "{body}"
    );
    assert_eq!(parse_ms(&body["to"]), ms("2026-11-03T00:00:00Z"), "{body}");
}

/// Every acknowledged event with its visitor: `(url, ts, visitor)`.
#[derive(Default)]
struct VisitorModel {
    events: Vec<(String, i64, String)>,
}

impl VisitorModel {
    /// Distinct visitors of the events in `[from, to)` that `keep(url)` keeps.
    fn distinct(&self, from: i64, to: i64, keep: impl Fn(&str) -> bool) -> u64 {
        let set: BTreeSet<&str> = self
            .events
            .iter()
            .filter(|(u, t, _)| (from..to).contains(t) && keep(u))
            .map(|(_, _, v)| v.as_str())
            .collect();
        set.len() as u64
    }

    /// Distinct visitors per local bucket of granularity `g` (label), of the events in
    /// `[from, to)` that `keep` keeps.
    fn by_bucket(
        &self,
        tz: Tz,
        g: &str,
        (from, to): (i64, i64),
        keep: impl Fn(&str) -> bool,
    ) -> BTreeMap<Label, BTreeSet<&str>> {
        let mut out: BTreeMap<Label, BTreeSet<&str>> = BTreeMap::new();
        for (u, t, v) in &self.events {
            if (from..to).contains(t) && keep(u) {
                out.entry(label(tz, *t, g)).or_default().insert(v);
            }
        }
        out
    }

    fn ingest(&mut self, server: &TestServer, rng: &mut StdRng, urls: &[&str], n: usize) {
        let events: Vec<(String, i64, String)> = events_around_transitions(rng, urls, n)
            .into_iter()
            .map(|(u, t)| (u, t, format!("v{}", rng.random_range(0..120))))
            .collect();
        post_visits(server, &events);
        self.events.extend(events);
    }
}

/// The first instant of the local day of `ts`.
fn local_midnight(tz: Tz, ts: i64) -> i64 {
    let d = tz.timestamp_millis_opt(ts).unwrap().date_naive();
    instant(tz, d.and_hms_opt(0, 0, 0).unwrap())
}

/// The first instant of the local day after the one of `ts`.
fn next_local_midnight(tz: Tz, ts: i64) -> i64 {
    let d = tz.timestamp_millis_opt(ts).unwrap().date_naive();
    instant(tz, d.succ_opt().unwrap().and_hms_opt(0, 0, 0).unwrap())
}

/// `[from, to)` widened to local midnights, as uniques count.
fn local_days(tz: Tz, from: i64, to: i64) -> (i64, i64) {
    let end = match local_midnight(tz, to) {
        t if t == to => t,
        _ => next_local_midnight(tz, to),
    };
    (local_midnight(tz, from), end)
}

fn check_zone_uniques(server: &TestServer, m: &VisitorModel, zone: &str, rng: &mut StdRng) {
    let tz: Tz = zone.parse().unwrap();
    let (fs, ts, from, to) = local_range(rng, tz);
    let (a, b) = local_days(tz, from, to);
    let range = format!("tz={}&from={}&to={}", enc(zone), enc(&fs), enc(&ts));
    // One URL.
    let url = "https://a.test/pricing";
    let q = format!("/v1/uniques?url={}&{range}", enc(url));
    let (code, body) = server.get(&q);
    assert_eq!(code, 200, "GET {q}: {body}");
    assert_eq!(
        (parse_ms(&body["from"]), parse_ms(&body["to"])),
        (a, b),
        "{q}: {body}"
    );
    let want = m.distinct(a, b, |u| u == url);
    assert_eq!(body["uniques"].as_u64(), Some(want), "GET {q}: {body}");
    // A site: its total over the local days, and every bucket's own visitors (a day or month
    // bucket whole, an hour bucket within the range).
    let on_a = |u: &str| u.starts_with("https://a.test/");
    for g in ["hour", "day", "month"] {
        let q = format!("/v1/site?host=a.test&granularity={g}&{range}");
        let (code, body) = server.get(&q);
        assert_eq!(code, 200, "GET {q}: {body}");
        assert_eq!(
            body["uniques"].as_u64(),
            Some(m.distinct(a, b, on_a)),
            "{q}: {body}"
        );
        let span = match g {
            "hour" => (from, to),
            _ => (i64::MIN, i64::MAX),
        };
        let want = m.by_bucket(tz, g, span, on_a);
        for item in body["series"].as_array().unwrap() {
            let l = label(tz, parse_ms(&item["start"]), g);
            let n = want.get(&l).map_or(0, |s| s.len() as u64);
            assert_eq!(
                item["uniques"].as_u64(),
                Some(n),
                "{g} bucket of {q}: {item}"
            );
        }
    }
    // A breakdown by page: the pages viewed in the range, each with its visitors of the days.
    let q = format!("/v1/breakdown?host=a.test&by=page&limit=100&{range}");
    let (code, body) = server.get(&q);
    assert_eq!(code, 200, "GET {q}: {body}");
    let got: BTreeMap<String, (u64, u64)> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let page = i["value"].as_str().unwrap().to_string();
            (
                page,
                (i["views"].as_u64().unwrap(), i["uniques"].as_u64().unwrap()),
            )
        })
        .collect();
    let mut want: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for page in ["/", "/pricing"] {
        let this = |u: &str| u == format!("https://a.test{page}");
        let views = m
            .events
            .iter()
            .filter(|(u, t, _)| (from..to).contains(t) && this(u))
            .count() as u64;
        if views > 0 {
            want.insert(page.to_string(), (views, m.distinct(a, b, this)));
        }
    }
    assert_eq!(got, want, "GET {q}: {body}");
    // The Stats API: visitors and pageviews per local day of two dates around the range, and
    // per local hour of the first — grouped by the hour's label, as Plausible groups them: the
    // two 02:00 hours of a fall-back night are one row.
    let first = tz.timestamp_millis_opt(from).unwrap().date_naive();
    let last = first.succ_opt().unwrap();
    let fmt = |d: NaiveDate| d.format("%Y-%m-%d").to_string();
    let (s, e) = (
        instant(tz, first.and_hms_opt(0, 0, 0).unwrap()),
        instant(tz, last.succ_opt().unwrap().and_hms_opt(0, 0, 0).unwrap()),
    );
    let day_label = |t: i64| fmt(tz.timestamp_millis_opt(t).unwrap().date_naive());
    check_stats(
        server,
        m,
        zone,
        [fmt(first), fmt(last)],
        "time:day",
        (s, e),
        day_label,
    );
    let hour_label = |t: i64| {
        let l = tz.timestamp_millis_opt(t).unwrap().naive_local();
        l.format("%Y-%m-%d %H:00:00").to_string()
    };
    let e = next_local_midnight(tz, s);
    check_stats(
        server,
        m,
        zone,
        [fmt(first), fmt(first)],
        "time:hour",
        (s, e),
        hour_label,
    );
}

/// `POST /api/v2/query` for site a.test's visitors and pageviews by `dimension` over `dates`
/// (the instants `[s, e)`) in `zone`, against the model's buckets named by `label_of`.
fn check_stats(
    server: &TestServer,
    m: &VisitorModel,
    zone: &str,
    dates: [String; 2],
    dimension: &str,
    (s, e): (i64, i64),
    label_of: impl Fn(i64) -> String,
) {
    let body = json!({"site_id": "a.test", "metrics": ["visitors", "pageviews"],
        "date_range": dates, "timezone": zone, "dimensions": [dimension]});
    let resp = server
        .client()
        .post(format!("{}/api/v2/query", server.base_url()))
        .body(body.to_string())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "{body}");
    let resp: Value = resp.json().unwrap();
    let mut got: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for r in resp["results"].as_array().unwrap() {
        let m = &r["metrics"];
        let label = r["dimensions"][0].as_str().unwrap().to_string();
        let counts = (m[0].as_u64().unwrap(), m[1].as_u64().unwrap());
        assert!(
            got.insert(label.clone(), counts).is_none(),
            "{body}: two rows labelled {label}: {resp}"
        );
    }
    let mut buckets: BTreeMap<String, (BTreeSet<&str>, u64)> = BTreeMap::new();
    for (u, t, v) in &m.events {
        if (s..e).contains(t) && u.starts_with("https://a.test/") {
            let b = buckets.entry(label_of(*t)).or_default();
            b.0.insert(v);
            b.1 += 1;
        }
    }
    let want: BTreeMap<String, (u64, u64)> = buckets
        .into_iter()
        .map(|(k, (v, n))| (k, (v.len() as u64, n)))
        .collect();
    assert_eq!(got, want, "{body}: {resp}");
}

fn probe_uniques(server: &TestServer, m: &VisitorModel, rng: &mut StdRng) {
    server.wait_caught_up();
    for zone in ZONES {
        for _ in 0..3 {
            check_zone_uniques(server, m, zone, rng);
        }
    }
}

#[test]
fn uniques_in_local_days_hours_and_months_of_any_zone_match_the_model() {
    let mut rng = StdRng::seed_from_u64(seed());
    let server = TestServer::start(ServerOpts::default());
    let urls = URLS;
    let mut m = VisitorModel::default();
    m.ingest(&server, &mut rng, &urls, 1500);
    probe_uniques(&server, &m, &mut rng);
    batch_run(&server);
    probe_uniques(&server, &m, &mut rng);
    // New events in the speed layer on top of the batch view: visitors seen by both layers
    // count once.
    m.ingest(&server, &mut rng, &urls, 700);
    probe_uniques(&server, &m, &mut rng);
}
