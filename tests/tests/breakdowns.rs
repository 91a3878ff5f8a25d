//! Breakdowns (API.md, "Sites, breakdowns, realtime"): `/v1/breakdown` by every dimension
//! against a model of every acknowledged event — views exact per value, uniques the distinct
//! visitors of the value (merged across pages and layers) — before a batch run, after it, with
//! speed events on top, and after a restart (the speed layer's source keys reloaded from Redis).
//!
//! The model knows each event's page, referrer and UTM values from how it was generated, not by
//! parsing what the server stored: the server's derivation is what is under test.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tally_e2e::{batch_run, enc, now_ms, rfc3339, seed, ServerOpts, TestServer, DAY_MS, JSON};

const HOSTS: [&str; 2] = ["shop.test", "www.blog.test"];
const DIMS: [&str; 7] = [
    "page",
    "url",
    "referrer",
    "source",
    "utm_source",
    "utm_medium",
    "utm_campaign",
];

/// One acknowledged event and its expected value of every dimension.
struct Ev {
    host: &'static str,
    url: String,
    ts: i64,
    visitor: String,
    values: BTreeMap<&'static str, String>,
}

#[derive(Default)]
struct Model {
    events: Vec<Ev>,
}

impl Model {
    /// value → (views, distinct visitors) of `host` by `dim` in `[from, to)`, only of `url`
    /// when given.
    fn breakdown(
        &self,
        host: &str,
        dim: &str,
        url: Option<&str>,
        (from, to): (i64, i64),
    ) -> BTreeMap<String, (u64, BTreeSet<&str>)> {
        let mut out: BTreeMap<String, (u64, BTreeSet<&str>)> = BTreeMap::new();
        for e in self.events.iter().filter(|e| {
            e.host == host && (from..to).contains(&e.ts) && url.is_none_or(|u| u == e.url)
        }) {
            let item = out.entry(e.values[dim].clone()).or_default();
            item.0 += 1;
            item.1.insert(&e.visitor);
        }
        out
    }
}

/// A random page view: a page with or without UTM tags (and another query parameter), a
/// referrer that is absent, a search engine with and without `www.`, another site, the page's
/// own site, or not a URL.
fn event(rng: &mut StdRng, now: i64) -> (Value, Ev) {
    let host = HOSTS[rng.random_range(0..HOSTS.len())];
    let path = ["/", "/pricing", "/blog/a", "/blog/b"][rng.random_range(0..4)];
    let utm = [
        None,
        None,
        Some(("newsletter", "email", "spring")),
        Some(("twitter", "social", "")),
    ][rng.random_range(0..4)];
    let url = match utm {
        None if rng.random_range(0..3) == 0 => format!("https://{host}{path}?ref=x"),
        None => format!("https://{host}{path}"),
        Some((s, m, c)) => {
            format!("https://{host}{path}?utm_source={s}&utm_medium={m}&utm_campaign={c}")
        }
    };
    let own = format!("https://{host}/elsewhere");
    let (referrer, ref_host) = [
        (None, "(direct)"),
        (None, "(direct)"),
        (Some("https://www.google.com/search?q=tally"), "google.com"),
        (Some("https://google.com/"), "google.com"),
        (Some("http://news.test/item?id=7"), "news.test"),
        (Some(own.as_str()), "(direct)"),
        (Some("not a url"), "(direct)"),
    ][rng.random_range(0..7)];
    let ts = now - rng.random_range(0..6 * DAY_MS);
    let visitor = format!("v{}", rng.random_range(0..90));
    let mut values = BTreeMap::new();
    values.insert("page", path.to_string());
    values.insert("url", url.clone());
    values.insert("referrer", ref_host.to_string());
    let (s, m, c) = utm.unwrap_or(("", "", ""));
    let or_none = |v: &str| if v.is_empty() { "(none)" } else { v }.to_string();
    values.insert("utm_source", or_none(s));
    values.insert("utm_medium", or_none(m));
    values.insert("utm_campaign", or_none(c));
    values.insert(
        "source",
        if s.is_empty() { ref_host } else { s }.to_string(),
    );
    let body = json!({"url": url, "ts": ts, "visitor": visitor, "referrer": referrer});
    let ev = Ev {
        host,
        url,
        ts,
        visitor,
        values,
    };
    (body, ev)
}

fn ingest(server: &TestServer, model: &mut Model, rng: &mut StdRng, n: usize) {
    let now = now_ms();
    let (bodies, events): (Vec<Value>, Vec<Ev>) = (0..n).map(|_| event(rng, now)).unzip();
    let (code, resp) = server.post_events(Value::Array(bodies).to_string(), JSON);
    assert_eq!(code, 202, "{resp}");
    model.events.extend(events);
}

/// Sketches are exact (sparse) at these sizes, up to a rare 32-bit hash collision.
fn close(got: &Value, want: usize) -> bool {
    got.as_u64().is_some_and(|g| g.abs_diff(want as u64) <= 1)
}

fn check(server: &TestServer, q: &str, want: BTreeMap<String, (u64, BTreeSet<&str>)>) {
    let (code, body) = server.get(q);
    assert_eq!(code, 200, "{q}: {body}");
    let items = body["items"].as_array().expect("items");
    let got: BTreeMap<String, u64> = items
        .iter()
        .map(|i| {
            (
                i["value"].as_str().unwrap().to_string(),
                i["views"].as_u64().unwrap(),
            )
        })
        .collect();
    let want_views: BTreeMap<String, u64> = want.iter().map(|(k, v)| (k.clone(), v.0)).collect();
    assert_eq!(got, want_views, "{q}: {body}");
    // Most viewed first, then by value.
    let order: Vec<(u64, &str)> = items
        .iter()
        .map(|i| (i["views"].as_u64().unwrap(), i["value"].as_str().unwrap()))
        .collect();
    let mut sorted = order.clone();
    sorted.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    assert_eq!(order, sorted, "{q}");
    for i in items {
        let v = &want[i["value"].as_str().unwrap()];
        assert!(
            close(&i["uniques"], v.1.len()),
            "{q}: {i}, want {} uniques",
            v.1.len()
        );
    }
}

fn probe(server: &TestServer, model: &Model) {
    server.wait_caught_up();
    let today = now_ms().div_euclid(DAY_MS) * DAY_MS;
    let (from, to) = (today - 2 * DAY_MS, today + DAY_MS);
    for host in HOSTS {
        for dim in DIMS {
            // All time.
            let q = format!("/v1/breakdown?host={host}&by={dim}&limit=1000");
            check(
                server,
                &q,
                model.breakdown(host, dim, None, (i64::MIN, i64::MAX)),
            );
            // The last three UTC days.
            let q = format!(
                "/v1/breakdown?host={host}&by={dim}&limit=1000&from={}&to={}",
                enc(&rfc3339(from)),
                enc(&rfc3339(to))
            );
            check(server, &q, model.breakdown(host, dim, None, (from, to)));
            // From 06:00 UTC: views in the range; uniques, as for `/v1/uniques`, of every day
            // the range touches — also visitors who came that morning under another key of
            // the same value (another referrer or UTM tag of the page).
            let from_mid = from + 6 * 3_600_000;
            let q = format!(
                "/v1/breakdown?host={host}&by={dim}&limit=1000&from={}&to={}",
                enc(&rfc3339(from_mid)),
                enc(&rfc3339(to))
            );
            let whole = model.breakdown(host, dim, None, (from, to));
            let mut want = model.breakdown(host, dim, None, (from_mid, to));
            for (value, item) in want.iter_mut() {
                item.1 = whole[value].1.clone();
            }
            check(server, &q, want);
        }
        // One page's sources.
        let url = model
            .events
            .iter()
            .find(|e| e.host == host)
            .map(|e| e.url.clone())
            .unwrap();
        let q = format!(
            "/v1/breakdown?host={host}&by=source&limit=1000&url={}",
            enc(&url)
        );
        check(
            server,
            &q,
            model.breakdown(host, "source", Some(&url), (i64::MIN, i64::MAX)),
        );
    }
    // From a local hour of Asia/Kolkata (+5:30; 00:30 UTC is 06:00 there): views in the range,
    // uniques of the local days it touches, from the local midnight (18:30 UTC).
    let start = today - DAY_MS + 1_800_000;
    let q = format!(
        "/v1/breakdown?host={}&by=referrer&limit=1000&tz=Asia%2FKolkata&from={start}",
        HOSTS[0]
    );
    let midnight = start - 6 * 3_600_000;
    let whole = model.breakdown(HOSTS[0], "referrer", None, (midnight, i64::MAX));
    let mut want = model.breakdown(HOSTS[0], "referrer", None, (start, i64::MAX));
    for (value, item) in want.iter_mut() {
        item.1 = whole[value].1.clone();
    }
    check(server, &q, want);
}

#[test]
fn breakdowns_by_every_dimension_match_the_model_across_layers() {
    let mut rng = StdRng::seed_from_u64(seed());
    let mut server = TestServer::start(ServerOpts::default());
    let mut model = Model::default();
    ingest(&server, &mut model, &mut rng, 1200);
    probe(&server, &model);
    batch_run(&server);
    probe(&server, &model);
    ingest(&server, &mut model, &mut rng, 600);
    probe(&server, &model);
    // The speed layer's source keys come back from Redis.
    server.restart();
    probe(&server, &model);
}

#[test]
fn a_limit_keeps_the_most_viewed_and_bad_breakdowns_are_refused() {
    let server = TestServer::start(ServerOpts::default());
    let now = now_ms();
    let mut body = Vec::new();
    for (page, n) in [("/a", 5), ("/b", 3), ("/c", 3), ("/d", 1)] {
        for _ in 0..n {
            body.push(json!({"url": format!("https://x.test{page}"), "ts": now}));
        }
    }
    let (code, resp) = server.post_events(Value::Array(body).to_string(), JSON);
    assert_eq!(code, 202, "{resp}");
    server.wait_caught_up();
    let (code, got) = server.get("/v1/breakdown?host=x.test&by=page&limit=2");
    assert_eq!(code, 200, "{got}");
    assert_eq!(
        got["items"],
        json!([{"value": "/a", "views": 5, "uniques": 0}, {"value": "/b", "views": 3, "uniques": 0}])
    );
    for q in [
        "/v1/breakdown?by=page",
        "/v1/breakdown?host=x.test",
        "/v1/breakdown?host=x.test&by=browser",
        "/v1/breakdown?host=x.test&by=page&limit=0",
        "/v1/breakdown?host=x.test&by=page&url=https%3A%2F%2Fother.test%2F",
        "/v1/breakdown?host=x.test&by=page&url=nope",
        "/v1/breakdown?host=x.test&by=page&tz=Nowhere%2FLand",
    ] {
        let (code, body) = server.get(q);
        assert_eq!(code, 400, "GET {q}: {body}");
        assert!(body["error"].is_string(), "{q}: {body}");
    }
}
