//! Whole sites (API.md, "Sites, breakdowns, realtime"): `/v1/site` and `/v1/sites` against a
//! model of every acknowledged event — views exact per site, per UTC and local bucket; uniques
//! the distinct visitors of any page of the site (merged across pages and layers, never a sum
//! of per-page uniques) — before a batch run, after it, and with speed events on top.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Datelike, TimeZone};
use chrono_tz::Tz;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tally_e2e::{
    batch_run, enc, now_ms, parse_ms, post_visits, rfc3339, seed, ServerOpts, TestServer, DAY_MS,
};

const HOSTS: [&str; 3] = ["a.site.test", "b.site.test", "c.site.test"];

/// `(url, ts, visitor)` of every acknowledged event.
#[derive(Default)]
struct Model {
    events: Vec<(String, i64, String)>,
}

fn host_of(url: &str) -> &str {
    url.split("://").nth(1).unwrap().split('/').next().unwrap()
}

impl Model {
    fn of_site<'a>(
        &'a self,
        host: &'a str,
        from: i64,
        to: i64,
    ) -> impl Iterator<Item = &'a (String, i64, String)> + 'a {
        self.events
            .iter()
            .filter(move |(u, ts, _)| host_of(u) == host && (from..to).contains(ts))
    }

    fn views(&self, host: &str, from: i64, to: i64) -> u64 {
        self.of_site(host, from, to).count() as u64
    }

    fn uniques(&self, host: &str, from: i64, to: i64) -> u64 {
        let v: BTreeSet<&str> = self.of_site(host, from, to).map(|e| e.2.as_str()).collect();
        v.len() as u64
    }
}

fn ingest(server: &TestServer, model: &mut Model, rng: &mut StdRng, n: usize) {
    let now = now_ms();
    let mut events = Vec::new();
    for _ in 0..n {
        let skew = rng.random_range(0..HOSTS.len());
        let host = HOSTS[rng.random_range(0..=skew)];
        let url = format!("https://{host}/p/{}", rng.random_range(0..6));
        let ts = now - rng.random_range(0..9 * DAY_MS);
        // Visitors of one site visit several of its pages: its uniques are not a sum.
        let visitor = format!("v{}", rng.random_range(0..120));
        events.push((url, ts, visitor));
    }
    post_visits(server, &events);
    model.events.extend(events);
}

/// Sketches are exact (sparse) at these sizes, up to a rare 32-bit hash collision.
fn assert_uniques(got: &Value, want: u64, what: &str) {
    let got = got
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: uniques {got}"));
    assert!(
        got.abs_diff(want) <= 1,
        "{what}: uniques {got}, want {want}"
    );
}

fn check_site(server: &TestServer, model: &Model, host: &str) {
    // All time.
    let (code, body) = server.get(&format!("/v1/site?host={host}"));
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["views"].as_u64(),
        Some(model.views(host, i64::MIN, i64::MAX)),
        "{body}"
    );
    assert_uniques(
        &body["uniques"],
        model.uniques(host, i64::MIN, i64::MAX),
        host,
    );
    assert_eq!(
        body["views"].as_u64(),
        Some(body["batch_views"].as_u64().unwrap() + body["speed_views"].as_u64().unwrap())
    );
    // The last five UTC days, per day: views and uniques of every bucket.
    let today = now_ms().div_euclid(DAY_MS) * DAY_MS;
    let (from, to) = (today - 4 * DAY_MS, today + DAY_MS);
    let q = format!(
        "/v1/site?host={host}&granularity=day&from={}&to={}",
        enc(&rfc3339(from)),
        enc(&rfc3339(to))
    );
    let (code, body) = server.get(&q);
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["views"].as_u64(),
        Some(model.views(host, from, to)),
        "{q}: {body}"
    );
    assert_uniques(&body["uniques"], model.uniques(host, from, to), &q);
    let series = body["series"].as_array().expect("series");
    let mut days = 0;
    for d in (0..5).map(|i| from + i * DAY_MS) {
        let want = model.views(host, d, d + DAY_MS);
        let item = series.iter().find(|b| parse_ms(&b["start"]) == d);
        match item {
            None => assert_eq!(want, 0, "{q}: day {} missing: {body}", rfc3339(d)),
            Some(b) => {
                days += 1;
                assert_eq!(b["views"].as_u64(), Some(want), "{q}: {b}");
                assert_uniques(&b["uniques"], model.uniques(host, d, d + DAY_MS), &q);
            }
        }
    }
    assert_eq!(series.len(), days, "{q}: {body}");
    // Local days of Asia/Kolkata (+5:30), whose midnights are 18:30Z: views and uniques per
    // local day.
    let tz: Tz = "Asia/Kolkata".parse().unwrap();
    let (code, body) = server.get(&format!(
        "/v1/site?host={host}&granularity=day&tz=Asia%2FKolkata&from={}",
        enc(&rfc3339(from))
    ));
    assert_eq!(code, 200, "{body}");
    // Views from the range's start (05:00 local); uniques of whole local days, from the local
    // midnight before it (18:30Z).
    let start = parse_ms(&body["from"]);
    let midnight = start - (start + 5 * 3_600_000 + 1_800_000).rem_euclid(DAY_MS);
    assert_uniques(
        &body["uniques"],
        model.uniques(host, midnight, i64::MAX),
        "Kolkata",
    );
    let mut want: BTreeMap<(i32, u32, u32), (u64, BTreeSet<&str>)> = BTreeMap::new();
    for (_, ts, v) in model.of_site(host, midnight, i64::MAX) {
        let l = tz.timestamp_millis_opt(*ts).unwrap();
        let day = want.entry((l.year(), l.month(), l.day())).or_default();
        day.0 += u64::from(*ts >= start);
        day.1.insert(v);
    }
    let got: BTreeMap<(i32, u32, u32), u64> = body["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let l = DateTime::parse_from_rfc3339(b["start"].as_str().unwrap()).unwrap();
            assert_eq!(l.offset().local_minus_utc(), 5 * 3600 + 1800, "{b}");
            let key = (l.year(), l.month(), l.day());
            let visitors = want.get(&key).map_or(0, |d| d.1.len() as u64);
            assert_uniques(&b["uniques"], visitors, &format!("Kolkata day {b}"));
            (key, b["views"].as_u64().unwrap())
        })
        .collect();
    let want: BTreeMap<(i32, u32, u32), u64> = want
        .into_iter()
        .filter(|d| d.1 .0 > 0)
        .map(|(k, d)| (k, d.0))
        .collect();
    assert_eq!(got, want, "{host} in Asia/Kolkata: {body}");
}

fn check_sites(server: &TestServer, model: &Model) {
    let (code, body) = server.get("/v1/sites?limit=2");
    assert_eq!(code, 200, "{body}");
    let mut want: Vec<(&str, u64)> = HOSTS
        .iter()
        .map(|h| (*h, model.views(h, i64::MIN, i64::MAX)))
        .filter(|x| x.1 > 0)
        .collect();
    want.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    want.truncate(2);
    let items = body["items"].as_array().expect("items");
    let got: Vec<(&str, u64)> = items
        .iter()
        .map(|i| (i["host"].as_str().unwrap(), i["views"].as_u64().unwrap()))
        .collect();
    assert_eq!(got, want, "{body}");
    for i in items {
        let h = i["host"].as_str().unwrap();
        assert_uniques(&i["uniques"], model.uniques(h, i64::MIN, i64::MAX), h);
    }
    // A site picker's list: the same sites and views, without the uniques it does not need.
    let (code, names) = server.get("/v1/sites?limit=2&uniques=false");
    assert_eq!(code, 200, "{names}");
    let without: Vec<Value> = items
        .iter()
        .map(|i| json!({"host": i["host"], "views": i["views"]}))
        .collect();
    assert_eq!(names["items"], json!(without), "{names}");
}

fn probe(server: &TestServer, model: &Model) {
    server.wait_caught_up();
    for host in HOSTS {
        check_site(server, model, host);
    }
    check_sites(server, model);
}

#[test]
fn site_views_and_uniques_match_the_model_across_layers() {
    let mut rng = StdRng::seed_from_u64(seed());
    let server = TestServer::start(ServerOpts::default());
    let mut model = Model::default();
    ingest(&server, &mut model, &mut rng, 1500);
    probe(&server, &model);
    batch_run(&server);
    probe(&server, &model);
    // New events in the speed layer: a visitor seen in both layers counts once.
    ingest(&server, &mut model, &mut rng, 800);
    probe(&server, &model);
    // The sum of per-page uniques overstates the site's (visitors see several pages).
    let host = HOSTS[0];
    let pages: HashMap<&str, BTreeSet<&str>> =
        model
            .of_site(host, i64::MIN, i64::MAX)
            .fold(HashMap::new(), |mut m, e| {
                m.entry(e.0.as_str()).or_default().insert(e.2.as_str());
                m
            });
    let sum: usize = pages.values().map(BTreeSet::len).sum();
    assert!(sum as u64 > model.uniques(host, i64::MIN, i64::MAX));
}

#[test]
fn bad_site_queries_are_refused() {
    let server = TestServer::start(ServerOpts::default());
    for q in [
        "/v1/site",
        "/v1/site?host=a%2Fb",
        "/v1/site?host=x.test&granularity=week",
        "/v1/site?host=x.test&tz=Nowhere%2FLand",
        "/v1/sites?limit=0",
        "/v1/sites?limit=1001",
        "/v1/sites?uniques=maybe",
    ] {
        let (code, body) = server.get(q);
        assert_eq!(code, 400, "GET {q}: {body}");
    }
    let (code, body) = server.get("/v1/site?host=nobody.test");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["views"], 0);
    assert_eq!(body["uniques"], 0);
}
