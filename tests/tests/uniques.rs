//! Unique visitors merged across the batch and speed layers (`GET /v1/uniques`), and
//! the Plausible-compatible event endpoint (`POST /api/event`), end to end against the real
//! binary (API.md: `/v1/uniques`, `POST /api/event`).
//!
//! Every expectation is computed from a model of what the test sent: exact distinct visitor
//! counts per range, compared with the estimate within the `relative_error` the server reports.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tally_e2e::{enc, now_ms, rfc3339, ServerOpts, TestServer, DAY_MS, HOUR_MS, NDJSON};
const CHUNK: usize = 10_000;

/// One page view the test sends (and remembers).
#[derive(Debug, Clone)]
struct View {
    url: String,
    ts: i64,
    visitor: Option<String>,
}

/// Sends `events` as NDJSON in chunks, asserting each chunk is acknowledged.
fn ingest(server: &TestServer, events: &[View]) {
    for chunk in events.chunks(CHUNK) {
        let mut body = String::new();
        for e in chunk {
            let mut v = json!({ "url": e.url, "ts": e.ts });
            if let Some(visitor) = &e.visitor {
                v["visitor"] = json!(visitor);
            }
            body.push_str(&v.to_string());
            body.push('\n');
        }
        let (code, resp) = server.post_events(body, NDJSON);
        assert_eq!(code, 202, "ingest: {resp}");
        assert_eq!(resp["accepted"].as_u64(), Some(chunk.len() as u64));
    }
}

/// `POST /v1/admin/batch?wait=true`, asserting the new view covers everything acknowledged.
fn batch_run(server: &TestServer) -> u64 {
    let acked = server.acked_seq();
    let (code, body) = server.post("/v1/admin/batch?wait=true");
    assert_eq!(code, 200, "batch run: {body}");
    let cutoff = body["cutoff_seq"].as_u64().expect("cutoff_seq");
    assert!(cutoff >= acked, "cutoff {cutoff} < acked {acked}: {body}");
    cutoff
}

/// The exact model: distinct visitors of `url` whose view falls in `[from_day, to_day)`.
fn exact_uniques(events: &[View], url: &str, from_day: i64, to_day: i64) -> usize {
    events
        .iter()
        .filter(|e| e.url == url)
        .filter(|e| (from_day..to_day).contains(&e.ts.div_euclid(DAY_MS)))
        .filter_map(|e| e.visitor.as_deref())
        .collect::<HashSet<_>>()
        .len()
}

/// `GET /v1/uniques` over the whole days `[from_day, to_day)`, checking the echoed range.
fn uniques(server: &TestServer, url: &str, from_day: i64, to_day: i64) -> Value {
    let path = format!(
        "/v1/uniques?url={}&from={}&to={}",
        enc(url),
        enc(&rfc3339(from_day * DAY_MS)),
        enc(&rfc3339(to_day * DAY_MS))
    );
    let (code, body) = server.get(&path);
    assert_eq!(code, 200, "GET {path}: {body}");
    assert_eq!(body["from"], json!(rfc3339(from_day * DAY_MS)), "{body}");
    assert_eq!(body["to"], json!(rfc3339(to_day * DAY_MS)), "{body}");
    assert_eq!(body["speed_available"], json!(true), "{body}");
    body
}

fn estimate(body: &Value) -> (u64, f64) {
    let n = body["uniques"].as_u64().expect("uniques is an integer");
    let e = body["relative_error"].as_f64().expect("relative_error");
    assert!(e > 0.0 && e < 0.3, "relative_error {e}");
    (n, e)
}

fn assert_close(what: &str, got: u64, want: usize, rel_err: f64) {
    let tolerance = 4.0 * rel_err * want as f64;
    eprintln!("{what}: estimated {got}, exact {want}");
    let diff = (got as f64 - want as f64).abs();
    assert!(
        diff <= tolerance.max(1.0),
        "{what}: estimated {got}, exact {want}, off by {diff} > 4 x {rel_err} x {want} = {tolerance}"
    );
}

/// A day well in the past that no test second crosses: yesterday (UTC).
fn base_day() -> i64 {
    now_ms().div_euclid(DAY_MS) - 1
}

/// A random moment within `day`.
fn in_day(rng: &mut StdRng, day: i64) -> i64 {
    day * DAY_MS + rng.random_range(0..DAY_MS)
}

#[test]
fn a_visitor_in_both_layers_counts_once() {
    let server = TestServer::start(ServerOpts::default());
    let mut rng = StdRng::seed_from_u64(5);
    let url = "https://overlap.example/page";
    let last = base_day();
    let days = [last - 2, last - 1, last];
    let old: Vec<String> = (0..20_000).map(|i| format!("visitor-{i}")).collect();
    let new: Vec<String> = (20_000..25_000).map(|i| format!("visitor-{i}")).collect();

    let view = |rng: &mut StdRng, v: &String| View {
        url: url.to_string(),
        ts: {
            let d = days[rng.random_range(0..days.len())];
            in_day(rng, d)
        },
        visitor: Some(v.clone()),
    };
    let batch_events: Vec<View> = old.iter().map(|v| view(&mut rng, v)).collect();
    ingest(&server, &batch_events);
    let cutoff = batch_run(&server);

    let mut speed_events: Vec<View> = old.iter().chain(&new).map(|v| view(&mut rng, v)).collect();
    speed_events.shuffle(&mut rng);
    ingest(&server, &speed_events);
    server.wait_caught_up();
    let status = server.status();
    assert_eq!(
        status["batch_cutoff_seq"].as_u64(),
        Some(cutoff),
        "the second half must be in the speed layer only: {status}"
    );

    let all: Vec<View> = batch_events.iter().chain(&speed_events).cloned().collect();
    let want = exact_uniques(&all, url, days[0], last + 1);
    assert_eq!(want, 25_000);
    let body = uniques(&server, url, days[0], last + 1);
    let (got, err) = estimate(&body);
    assert_close("uniques across batch + speed", got, want, err);
    assert!(
        got < 30_000,
        "visitors seen by both layers were counted twice: {body}"
    );
    assert!(
        body["batch"]["cutoff_seq"].as_u64() == Some(cutoff),
        "{body}"
    );

    // The views of the same range are exact and add both layers.
    let path = format!(
        "/v1/views?url={}&from={}&to={}",
        enc(url),
        enc(&rfc3339(days[0] * DAY_MS)),
        enc(&rfc3339((last + 1) * DAY_MS))
    );
    let (code, views) = server.get(&path);
    assert_eq!(code, 200, "{views}");
    assert_eq!(views["views"].as_u64(), Some(all.len() as u64), "{views}");
    assert_eq!(
        views["batch_views"].as_u64(),
        Some(batch_events.len() as u64)
    );

    // Each single day, too (visitors that came on several days count once per day).
    for &day in &days {
        let body = uniques(&server, url, day, day + 1);
        let (got, err) = estimate(&body);
        assert_close(
            &format!("uniques on day {day}"),
            got,
            exact_uniques(&all, url, day, day + 1),
            err,
        );
    }
}

/// A busy URL-day in the speed layer (more visitors than a sparse sketch holds) is answered from
/// the registers the mirror keeps for it, a quiet one from its hashes; either way the answer is
/// the very sketch the batch layer later builds from the same events: the same number, not
/// merely one within the error.
#[test]
fn the_speed_layer_answers_the_same_sketch_the_batch_layer_builds() {
    let server = TestServer::start(ServerOpts::default());
    let mut rng = StdRng::seed_from_u64(11);
    let last = base_day();
    let busy = "https://busy.example/";
    let quiet = "https://quiet.example/";
    let view = |rng: &mut StdRng, url: &str, day: i64, visitor: String| View {
        url: url.to_string(),
        ts: in_day(rng, day),
        visitor: Some(visitor),
    };
    let mut events = Vec::new();
    // 6 000 visitors on `last` (past the 4 096 a sparse sketch holds at precision 14), some
    // twice, and 300 on the day before; the quiet URL has 50.
    for i in 0..6_000 {
        for _ in 0..rng.random_range(1..=2) {
            events.push(view(&mut rng, busy, last, format!("b{i}")));
        }
    }
    for i in 0..300 {
        events.push(view(&mut rng, busy, last - 1, format!("b{i}")));
    }
    for i in 0..50 {
        events.push(view(&mut rng, quiet, last, format!("q{i}")));
    }
    events.shuffle(&mut rng);
    ingest(&server, &events);
    server.wait_caught_up();
    let ranges = [(last, last + 1), (last - 1, last + 1), (last - 1, last)];
    let speed_only: Vec<(Value, Value)> = ranges
        .iter()
        .map(|&(a, b)| (uniques(&server, busy, a, b), uniques(&server, quiet, a, b)))
        .collect();
    for (body, _) in &speed_only {
        assert!(body["batch"].is_null(), "no batch view yet: {body}");
    }
    batch_run(&server);
    for (&(a, b), (busy_speed, quiet_speed)) in ranges.iter().zip(&speed_only) {
        let busy_batch = uniques(&server, busy, a, b);
        assert_eq!(
            busy_speed["uniques"], busy_batch["uniques"],
            "busy URL on days [{a}, {b}): speed {busy_speed} vs batch {busy_batch}"
        );
        assert_eq!(busy_speed["exact"], busy_batch["exact"]);
        let quiet_batch = uniques(&server, quiet, a, b);
        assert_eq!(quiet_speed["uniques"], quiet_batch["uniques"]);
    }
    let (busy_day, _) = &speed_only[0];
    assert_eq!(
        busy_day["exact"],
        json!(false),
        "past the sparse limit: {busy_day}"
    );
    let (got, err) = estimate(busy_day);
    assert_close(
        "busy day",
        got,
        exact_uniques(&events, busy, last, last + 1),
        err,
    );
    assert_eq!(speed_only[0].1["uniques"], json!(50));
    assert_eq!(
        speed_only[2].0["uniques"],
        json!(300),
        "the quiet day before is exact"
    );
}

/// A set of visitors of one URL over 30 days: each visitor comes 1–3 times on random days.
fn visits(rng: &mut StdRng, url: &str, visitors: usize, last: i64, tag: &str) -> Vec<View> {
    let mut out = Vec::new();
    for i in 0..visitors {
        for _ in 0..rng.random_range(1..=3) {
            out.push(View {
                url: url.to_string(),
                ts: {
                    let d = last - rng.random_range(0..30);
                    in_day(rng, d)
                },
                visitor: Some(format!("{tag}-{i}")),
            });
        }
    }
    // Views without a visitor never count.
    for _ in 0..visitors / 10 + 1 {
        out.push(View {
            url: url.to_string(),
            ts: {
                let d = last - rng.random_range(0..30);
                in_day(rng, d)
            },
            visitor: None,
        });
    }
    out.shuffle(rng);
    out
}

/// Ingests the first half of `events`, runs the batch layer, ingests the rest (speed layer).
fn half_batch_half_speed(server: &TestServer, events: &[View]) {
    let (batch, speed) = events.split_at(events.len() / 2);
    ingest(server, batch);
    batch_run(server);
    ingest(server, speed);
    server.wait_caught_up();
}

#[test]
fn small_sets_are_exact_over_1_7_and_30_days() {
    let server = TestServer::start(ServerOpts::default());
    let mut rng = StdRng::seed_from_u64(7);
    let last = base_day();
    let sizes = [1usize, 2, 3, 10, 37, 100];
    let mut events = Vec::new();
    for &n in &sizes {
        let url = format!("https://small.example/n{n}");
        events.extend(visits(&mut rng, &url, n, last, &format!("s{n}")));
    }
    events.shuffle(&mut rng);
    half_batch_half_speed(&server, &events);

    for &n in &sizes {
        let url = format!("https://small.example/n{n}");
        assert_eq!(exact_uniques(&events, &url, last - 29, last + 1), n);
        for days in [1i64, 7, 30] {
            let want = exact_uniques(&events, &url, last - days + 1, last + 1);
            let body = uniques(&server, &url, last - days + 1, last + 1);
            assert_eq!(
                body["uniques"].as_u64(),
                Some(want as u64),
                "{n} visitors over {days} days: small sets are exact: {body}"
            );
        }
    }
}

#[test]
fn a_large_set_is_within_the_error_over_1_7_and_30_days() {
    let server = TestServer::start(ServerOpts::default());
    let mut rng = StdRng::seed_from_u64(30);
    let last = base_day();
    let url = "https://large.example/";
    let events = visits(&mut rng, url, 100_000, last, "big");
    half_batch_half_speed(&server, &events);

    assert_eq!(exact_uniques(&events, url, last - 29, last + 1), 100_000);
    for days in [1i64, 7, 30] {
        let want = exact_uniques(&events, url, last - days + 1, last + 1);
        let body = uniques(&server, url, last - days + 1, last + 1);
        let (got, err) = estimate(&body);
        assert_close(
            &format!("100 000 visitors over {days} days"),
            got,
            want,
            err,
        );
    }
}

#[test]
fn uniques_parameters() {
    let server = TestServer::start(ServerOpts::default());
    let now = now_ms();
    let url = "https://params.example/a";
    let events: Vec<View> = (0..5)
        .map(|i| View {
            url: url.to_string(),
            ts: now - i * HOUR_MS / 10,
            visitor: (i != 4).then(|| format!("p{}", i % 3)),
        })
        .collect();
    ingest(&server, &events);
    server.wait_caught_up();

    // Missing from/to: the beginning of time up to and including today.
    let (code, body) = server.get(&format!("/v1/uniques?url={}", enc(url)));
    assert_eq!(code, 200, "{body}");
    let want: HashSet<_> = events.iter().filter_map(|e| e.visitor.clone()).collect();
    assert_eq!(body["uniques"].as_u64(), Some(want.len() as u64), "{body}");
    assert_eq!(body["batch"], Value::Null, "{body}");
    // Spellings of the same URL are one URL.
    let (_, body) = server.get(&format!(
        "/v1/uniques?url={}",
        enc("HTTPS://Params.EXAMPLE:443/a#frag")
    ));
    assert_eq!(body["uniques"].as_u64(), Some(want.len() as u64), "{body}");
    assert_eq!(body["url"], json!(url), "{body}");
    // An unknown URL is 0.
    let (code, body) = server.get("/v1/uniques?url=https%3A%2F%2Fnobody.example%2F");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["uniques"].as_u64(), Some(0), "{body}");
    // Day-aligned range echo.
    let (code, body) = server.get(&format!(
        "/v1/uniques?url={}&from=2026-01-05T13:00:00Z&to=2026-01-07T01:00:00Z",
        enc(url)
    ));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["from"], json!("2026-01-05T00:00:00Z"), "{body}");
    assert_eq!(body["to"], json!("2026-01-08T00:00:00Z"), "{body}");
    // Bad parameters are 400 with a sentence.
    for bad in [
        "/v1/uniques".to_string(),
        "/v1/uniques?url=not-a-url".to_string(),
        format!("/v1/uniques?url={}&from=yesterday", enc(url)),
        format!(
            "/v1/uniques?url={}&from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z",
            enc(url)
        ),
    ] {
        let (code, body) = server.get(&bad);
        assert_eq!(code, 400, "GET {bad}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|s| !s.is_empty()),
            "{body}"
        );
    }
}

// -----------------------------------------------------------------------------------------------
// POST /api/event (Plausible)
// -----------------------------------------------------------------------------------------------

/// `POST /api/event` as the trackers send it: `text/plain`, with an IP and a User-Agent.
fn plausible(
    server: &TestServer,
    body: &str,
    ip: &str,
    ua: &str,
) -> (u16, String, reqwest::header::HeaderMap) {
    let resp = server
        .client()
        .post(format!("{}/api/event", server.base_url()))
        .header("Content-Type", "text/plain")
        .header("X-Forwarded-For", ip)
        .header("User-Agent", ua)
        .header("Origin", "https://blog.example")
        .body(body.to_string())
        .send()
        .expect("POST /api/event");
    let code = resp.status().as_u16();
    let headers = resp.headers().clone();
    (code, resp.text().unwrap_or_default(), headers)
}

fn views_of(server: &TestServer, url: &str) -> u64 {
    server.wait_caught_up();
    let (code, body) = server.get(&format!("/v1/views?url={}", enc(url)));
    assert_eq!(code, 200, "{body}");
    body["views"].as_u64().expect("views")
}

fn uniques_now(server: &TestServer, url: &str) -> u64 {
    server.wait_caught_up();
    let (code, body) = server.get(&format!("/v1/uniques?url={}", enc(url)));
    assert_eq!(code, 200, "{body}");
    body["uniques"].as_u64().expect("uniques")
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display())) {
            let entry = entry.expect("dir entry");
            let kind = entry.file_type().expect("file type");
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                out.push(entry.path());
            }
        }
    }
    out
}

/// API.md, "Hash-routed pages": with `h: 1` the fragment is part of the page, and queries keep
/// it with `hash=1`; without `h` it is dropped as before.
#[test]
fn hash_routed_pages_are_pages_of_their_own() {
    let server = TestServer::start(ServerOpts::default());
    let ua = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0";
    let send = |body: serde_json::Value| {
        let (code, text, _) = plausible(&server, &body.to_string(), "203.0.113.9", ua);
        assert_eq!(code, 202, "{body}: {text}");
    };
    for _ in 0..2 {
        send(
            json!({"n": "pageview", "u": "https://spa.test/app#/settings", "d": "spa.test", "h": 1}),
        );
    }
    send(json!({"n": "pageview", "u": "https://spa.test/app#/billing", "d": "spa.test", "h": 1}));
    send(json!({"n": "pageview", "u": "https://spa.test/app#/ignored", "d": "spa.test"}));
    server.wait_caught_up();
    let views = |q: &str| {
        let (code, body) = server.get(q);
        assert_eq!(code, 200, "GET {q}: {body}");
        body["views"].as_u64().expect("views")
    };
    let settings = enc("https://spa.test/app#/settings");
    assert_eq!(views(&format!("/v1/views?url={settings}&hash=1")), 2);
    let billing = enc("https://spa.test/app#/billing");
    assert_eq!(views(&format!("/v1/views?url={billing}&hash=1")), 1);
    // Without hash=1 the fragment of the url parameter is dropped: the page without one.
    assert_eq!(views(&format!("/v1/views?url={settings}")), 1);
    let (code, body) = server.get("/v1/top?limit=10");
    assert_eq!(code, 200, "{body}");
    let urls: Vec<&str> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["url"].as_str().unwrap())
        .collect();
    assert_eq!(
        urls,
        [
            "https://spa.test/app#/settings",
            "https://spa.test/app",
            "https://spa.test/app#/billing"
        ]
    );
    let (code, body) = server.get(&format!("/v1/views?url={settings}&hash=yes"));
    assert_eq!(code, 400, "{body}");
}

/// Events from known bots and crawlers are accepted (`202`, `X-Plausible-Dropped: 1`, as
/// Plausible answers) and not counted; a browser's are counted.
#[test]
fn bots_are_answered_and_not_counted() {
    let server = TestServer::start(ServerOpts::default());
    let body = json!({"n": "pageview", "u": "https://bots.test/", "d": "bots.test"}).to_string();
    for ua in [
        "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm) Chrome/116.0 Safari/537.36",
        "curl/8.5.0",
    ] {
        let (code, text, headers) = plausible(&server, &body, "198.51.100.1", ua);
        assert_eq!(code, 202, "{ua}: {text}");
        assert_eq!(
            headers.get("x-plausible-dropped").and_then(|v| v.to_str().ok()),
            Some("1"),
            "{ua}"
        );
    }
    let browser = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15";
    let (code, _, headers) = plausible(&server, &body, "198.51.100.2", browser);
    assert_eq!(code, 202);
    assert!(headers.get("x-plausible-dropped").is_none());
    assert_eq!(views_of(&server, "https://bots.test/"), 1);
    let status = server.status();
    assert_eq!(
        status["acked_seq"], 1,
        "bots' events are not stored: {status}"
    );
}

#[test]
fn plausible_events_are_counted_like_plausible() {
    // The test client is the reverse proxy (127.0.0.1) in front of a 10.x balancer; the
    // visitor's address is what they append to X-Forwarded-For.
    let server = TestServer::start(
        ServerOpts::default().env("TALLY_HTTP_TRUSTED_PROXIES", "127.0.0.1,10.0.0.0/8"),
    );
    let day_at_start = now_ms().div_euclid(DAY_MS);
    let page = "https://blog.example/post?id=1";
    let ip_a = "198.51.100.77";
    let ip_b = "203.0.113.201";
    let ua = "Mozilla/5.0 (X11; Linux x86_64) tally-test";
    let mut expected_views = 0u64;
    let mut model_visitors: HashSet<(String, String)> = HashSet::new();

    // pageview, short keys, p as an object: counted.
    let (code, text, headers) = plausible(
        &server,
        &json!({"n": "pageview", "u": page, "d": "blog.example", "r": null, "p": {"author": "x"}})
            .to_string(),
        ip_a,
        ua,
    );
    assert_eq!((code, text.as_str()), (202, "ok"));
    assert_eq!(
        headers
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("*")
    );
    expected_views += 1;
    model_visitors.insert((ip_a.into(), ua.into()));
    assert_eq!(views_of(&server, page), expected_views);

    // pageview, long keys, props as a JSON string, a referrer, same IP + UA: another view, the
    // same visitor. The visitor also wrote an X-Forwarded-For of its own (left of its real
    // address, which our balancer 10.0.0.1 appended): the right-most untrusted address counts.
    let (code, text, _) = plausible(
        &server,
        &json!({"name": "pageview", "url": page, "domain": "blog.example",
                "referrer": "https://news.example/", "props": "{\"author\":\"x\"}"})
        .to_string(),
        &format!("6.6.6.6, {ip_a}, 10.0.0.1"),
        ua,
    );
    assert_eq!((code, text.as_str()), (202, "ok"));
    expected_views += 1;
    assert_eq!(views_of(&server, page), expected_views);

    // Another IP: another visitor.
    let (code, _, _) = plausible(
        &server,
        &json!({"n": "pageview", "u": page, "d": "blog.example"}).to_string(),
        ip_b,
        ua,
    );
    assert_eq!(code, 202);
    expected_views += 1;
    model_visitors.insert((ip_b.into(), ua.into()));
    assert_eq!(views_of(&server, page), expected_views);

    // engagement and custom events: accepted, never counted.
    for body in [
        json!({"n": "engagement", "u": page, "d": "blog.example", "sd": 80, "e": 12000}),
        json!({"name": "Signup", "url": page, "domain": "blog.example", "props": {"plan": "pro"}}),
        json!({"n": "Outbound Link: Click", "u": page, "d": "blog.example", "p": "{\"url\":\"https://x.example\"}"}),
    ] {
        let (code, text, _) = plausible(&server, &body.to_string(), ip_a, ua);
        assert_eq!((code, text.as_str()), (202, "ok"), "{body}");
    }
    assert_eq!(views_of(&server, page), expected_views);

    let day_at_end = now_ms().div_euclid(DAY_MS);
    if day_at_start == day_at_end {
        assert_eq!(
            uniques_now(&server, page),
            model_visitors.len() as u64,
            "same IP + User-Agent is one visitor, another IP another"
        );
    } else {
        eprintln!("the UTC day changed during the test (the salt rotated): uniques not compared");
    }

    // Malformed bodies: 400 with a JSON error sentence, CORS headers still there.
    for bad in [
        "",
        "not json",
        "{\"n\": \"pageview\"",
        "[1, 2]",
        "{\"n\": \"pageview\"}",
        "{\"u\": \"https://blog.example/\"}",
        "{\"n\": 7, \"u\": \"https://blog.example/\"}",
        "{\"n\": \"pageview\", \"u\": \"javascript:alert(1)\"}",
    ] {
        let (code, text, headers) = plausible(&server, bad, ip_a, ua);
        assert_eq!(code, 400, "body {bad:?}: {text}");
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("body {bad:?}: not JSON ({e}): {text}"));
        assert!(v["error"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
        assert_eq!(
            headers
                .get("access-control-allow-origin")
                .and_then(|v| v.to_str().ok()),
            Some("*")
        );
    }
    assert_eq!(views_of(&server, page), expected_views);

    // CORS preflight, as a browser sends it before a cross-origin POST.
    let resp = server
        .client()
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/api/event", server.base_url()),
        )
        .header("Origin", "https://blog.example")
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "content-type")
        .send()
        .expect("OPTIONS /api/event");
    assert!(
        resp.status().is_success(),
        "preflight: {}",
        resp.status().as_u16()
    );
    let h = resp.headers();
    assert_eq!(
        h.get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("*")
    );
    let methods = h
        .get("access-control-allow-methods")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(methods.contains("POST"), "allow-methods {methods:?}");
    let allowed = h
        .get("access-control-allow-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("content-type"),
        "allow-headers {allowed:?}"
    );

    // No client IP anywhere under data_dir once everything is sealed.
    server.flush();
    let files = files_under(server.data_dir());
    assert!(
        !tally_e2e::master_files(server.data_dir()).is_empty(),
        "flush sealed nothing"
    );
    for file in &files {
        let bytes = fs::read(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        for ip in [ip_a, ip_b] {
            assert!(
                !bytes.windows(ip.len()).any(|w| w == ip.as_bytes()),
                "{} contains the client IP {ip}",
                file.display()
            );
        }
    }
    // Nor in Redis key names.
    let mut server = server;
    if let Some(redis) = server.redis() {
        let keys = redis.cli(&["--scan"]);
        for ip in [ip_a, ip_b] {
            assert!(!keys.contains(ip), "a redis key contains {ip}: {keys}");
        }
    }
    let rows = tally_e2e::read_master(server.data_dir());
    let counted: HashMap<String, u64> = tally_e2e::count_by_url(&rows).into_iter().collect();
    assert_eq!(counted.get(page).copied(), Some(expected_views));
    assert!(
        rows.iter().all(|r| r.visitor.is_some()),
        "every Plausible pageview has a derived visitor id"
    );
}
