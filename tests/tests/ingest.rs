//! Ingestion into a durable, append-only Parquet master dataset, end to end against the
//! real binary (API.md: Events, Operations, Files).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use arrow::datatypes::{DataType, TimeUnit};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tally_e2e::{
    count_by_url, master_schemas, now_ms, poll_until, read_master, rfc3339_ms as rfc3339, Row,
    ServerOpts, TestServer, DAY_MS, DEADLINE, JSON, NDJSON,
};

fn ndjson(events: &[Value]) -> String {
    let mut body = String::new();
    for e in events {
        body.push_str(&e.to_string());
        body.push('\n');
    }
    body
}

fn assert_accepted(code: u16, body: &Value, n: usize) {
    assert_eq!(code, 202, "expected 202 for {n} events, got {code}: {body}");
    assert_eq!(
        body["accepted"].as_u64(),
        Some(n as u64),
        "accepted count: {body}"
    );
}

fn assert_error(code: u16, body: &Value, want: u16, what: &str) {
    assert_eq!(code, want, "{what}: expected {want}, got {code}: {body}");
    let msg = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no \"error\" string in {body}"));
    assert!(!msg.is_empty(), "{what}: empty error message");
}

fn ids_of(rows: &[Row]) -> HashMap<String, u32> {
    let mut ids = HashMap::new();
    for row in rows {
        let id = row
            .id
            .clone()
            .unwrap_or_else(|| panic!("row without id: {row:?}"));
        *ids.entry(id).or_insert(0) += 1;
    }
    ids
}

fn assert_unique_seqs(rows: &[Row]) {
    let seqs: HashSet<u64> = rows.iter().map(|r| r.seq).collect();
    assert_eq!(seqs.len(), rows.len(), "seq values are not unique");
}

/// Each normalised URL with spellings of it that must all count as that one URL.
const SPELLINGS: &[(&str, &[&str])] = &[
    (
        "http://example.com/",
        &[
            "http://example.com/",
            "HTTP://EXAMPLE.COM/",
            "http://example.com",
            "http://Example.com:80",
            "http://example.com/#top",
            "Http://EXAMPLE.com:80/#",
        ],
    ),
    (
        "http://example.com/a",
        &[
            "http://example.com/a",
            "HTTP://Example.COM:80/a#top",
            "http://EXAMPLE.com/a#",
        ],
    ),
    // Path case is kept: /A is another page than /a.
    (
        "http://example.com/A",
        &["http://example.com/A", "HTTP://example.COM/A#x"],
    ),
    (
        "https://shop.example.com/Cart?item=42",
        &[
            "https://shop.example.com/Cart?item=42",
            "HTTPS://SHOP.EXAMPLE.COM:443/Cart?item=42",
            "https://Shop.Example.Com/Cart?item=42#reviews",
        ],
    ),
    // A non-default port is part of the URL.
    (
        "http://example.com:8080/a",
        &["http://example.com:8080/a", "HTTP://EXAMPLE.COM:8080/a#x"],
    ),
    (
        "https://example.com:8443/",
        &["https://EXAMPLE.com:8443", "https://example.com:8443/#"],
    ),
    (
        "https://example.com/",
        &[
            "https://example.com/",
            "https://example.com:443",
            "HTTPS://Example.Com/#a",
        ],
    ),
    // Percent-encoding normalised as WHATWG does.
    (
        "http://example.org/caf%C3%A9?q=a%20b",
        &[
            "http://example.org/café?q=a b",
            "HTTP://EXAMPLE.ORG:80/caf%C3%A9?q=a%20b#x",
        ],
    ),
];

/// The URL universe of the volume test: the hand-written spellings plus generated pages.
fn url_universe() -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = SPELLINGS
        .iter()
        .map(|(n, s)| (n.to_string(), s.iter().map(|x| x.to_string()).collect()))
        .collect();
    for k in 0..40 {
        let host = format!("site{}.example.net", k % 7);
        let path = format!("/page/{k}?v={}", k % 3);
        let normalised = format!("https://{host}{path}");
        let spellings = vec![
            normalised.clone(),
            format!("HTTPS://{}{path}", host.to_uppercase()),
            format!("https://{host}:443{path}#s{k}"),
        ];
        out.push((normalised, spellings));
    }
    out
}

struct Sent {
    url: String,
    ts: Option<i64>,
    visitor: Option<String>,
    referrer: Option<String>,
}

#[test]
fn sixty_thousand_events_in_three_formats_land_in_parquet_exactly() {
    let server = TestServer::start(ServerOpts::default());
    let universe = url_universe();
    let mut rng = StdRng::seed_from_u64(2);
    let start_ms = now_ms();
    const TOTAL: usize = 60_000;

    let mut sent: HashMap<String, Sent> = HashMap::with_capacity(TOTAL);
    let mut events = Vec::with_capacity(TOTAL);
    for n in 0..TOTAL {
        let (normalised, spellings) = &universe[rng.random_range(0..universe.len())];
        let spelling = &spellings[rng.random_range(0..spellings.len())];
        let id = format!("ev-{n}");
        let mut e = json!({"url": spelling, "id": id});
        let ts = match n % 3 {
            0 => None,
            _ => Some(start_ms - rng.random_range(0..30 * DAY_MS)),
        };
        match (n % 3, ts) {
            (1, Some(ts)) => e["ts"] = json!(rfc3339(ts)),
            (2, Some(ts)) => e["ts"] = json!(ts),
            _ => {}
        }
        let visitor = (n % 2 == 0).then(|| format!("visitor-{}", rng.random_range(0..500)));
        if let Some(v) = &visitor {
            e["visitor"] = json!(v);
        }
        let referrer = (n % 5 == 0).then(|| "https://news.example/item?id=1".to_string());
        if let Some(r) = &referrer {
            e["referrer"] = json!(r);
        }
        if n % 7 == 0 {
            e["unknown_field"] = json!({"ignored": true});
        }
        events.push(e);
        sent.insert(
            id,
            Sent {
                url: normalised.clone(),
                ts,
                visitor,
                referrer,
            },
        );
    }

    // Sequential requests: 30 NDJSON bodies of 1000 (with a blank line), 56 arrays of 500.
    let mut sequential_requests: Vec<Vec<String>> = Vec::new();
    let ids = |chunk: &[Value]| {
        chunk
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect()
    };
    for chunk in events[..30_000].chunks(1000) {
        let (a, b) = chunk.split_at(chunk.len() / 2);
        let body = format!("{}\n{}", ndjson(a), ndjson(b));
        let (code, resp) = server.post_events(body, NDJSON);
        assert_accepted(code, &resp, chunk.len());
        sequential_requests.push(ids(chunk));
    }
    for chunk in events[30_000..58_000].chunks(500) {
        let (code, resp) = server.post_events(Value::Array(chunk.to_vec()).to_string(), JSON);
        assert_accepted(code, &resp, chunk.len());
        sequential_requests.push(ids(chunk));
    }
    // 2000 single objects from 4 concurrent clients.
    let singles: Vec<Value> = events[58_000..].to_vec();
    thread::scope(|s| {
        for part in singles.chunks(500) {
            let server = &server;
            s.spawn(move || {
                for (i, e) in part.iter().enumerate() {
                    let ct = if i % 2 == 0 {
                        JSON
                    } else {
                        "application/json; charset=utf-8"
                    };
                    let (code, resp) = server.post_events(e.to_string(), ct);
                    assert_accepted(code, &resp, 1);
                }
            });
        }
    });
    let end_ms = now_ms();

    let acked = server.acked_seq();
    let sealed = server.flush();
    let rows = read_master(server.data_dir());
    assert_eq!(rows.len(), TOTAL, "rows in master/**/*.parquet");
    assert_unique_seqs(&rows);
    let max_seq = rows.iter().map(|r| r.seq).max().unwrap();
    assert!(
        sealed >= max_seq,
        "sealed_through_seq {sealed} < max seq {max_seq}"
    );
    assert_eq!(acked, max_seq, "acked_seq is the last seq assigned");
    let status = server.status();
    assert!(
        status["sealed_seq"].as_u64() >= Some(max_seq),
        "sealed_seq after flush: {status}"
    );

    // Exactly the per-URL counts sent, under the normalised URL.
    let mut expected: HashMap<String, u64> = HashMap::new();
    for s in sent.values() {
        *expected.entry(s.url.clone()).or_insert(0) += 1;
    }
    let got = count_by_url(&rows);
    for (url, n) in &expected {
        assert_eq!(got.get(url), Some(n), "count for {url}");
    }
    assert_eq!(
        got.len(),
        expected.len(),
        "URLs in master: {:?}",
        got.keys().collect::<Vec<_>>()
    );

    // Every event exactly once, with its fields.
    let by_id = ids_of(&rows);
    assert_eq!(by_id.len(), TOTAL, "distinct ids");
    for row in &rows {
        let id = row.id.as_deref().unwrap();
        let s = sent.get(id).unwrap_or_else(|| panic!("unknown id {id}"));
        assert_eq!(row.url, s.url, "url of {id}");
        assert_eq!(row.visitor, s.visitor, "visitor of {id}");
        assert_eq!(row.referrer, s.referrer, "referrer of {id}");
        match s.ts {
            Some(ts) => assert_eq!(row.ts, ts, "ts of {id}"),
            None => assert!(
                (start_ms - 1000..=end_ms + 1000).contains(&row.ts),
                "default ts of {id} is the receive time: {} not in [{start_ms}, {end_ms}]",
                row.ts
            ),
        }
        assert!(
            (start_ms - 1000..=end_ms + 1000).contains(&row.received_at),
            "received_at of {id}: {}",
            row.received_at
        );
    }

    // seq increases in acknowledgement order: a request acknowledged before another was sent
    // has only smaller seqs.
    let seq_of: HashMap<&str, u64> = rows
        .iter()
        .map(|r| (r.id.as_deref().unwrap(), r.seq))
        .collect();
    let mut previous_max = 0;
    for (i, req) in sequential_requests.iter().enumerate() {
        let seqs: Vec<u64> = req.iter().map(|id| seq_of[id.as_str()]).collect();
        let (lo, hi) = (*seqs.iter().min().unwrap(), *seqs.iter().max().unwrap());
        assert!(
            i == 0 || lo > previous_max,
            "request {i}: seq {lo} not above {previous_max}"
        );
        previous_max = hi;
    }

    // Column types as API.md says.
    let schemas = master_schemas(server.data_dir());
    assert!(!schemas.is_empty());
    for (path, schema) in &schemas {
        let ty = |name: &str| {
            schema
                .field_with_name(name)
                .unwrap_or_else(|_| panic!("{}: no column {name}", path.display()))
                .clone()
        };
        assert_eq!(
            ty("seq").data_type(),
            &DataType::UInt64,
            "{}: seq",
            path.display()
        );
        for col in ["ts", "received_at"] {
            match ty(col).data_type() {
                DataType::Timestamp(TimeUnit::Millisecond, Some(tz))
                    if tz.as_ref() == "UTC" || tz.as_ref() == "+00:00" => {}
                other => panic!(
                    "{}: {col} is {other}, want Timestamp(ms, UTC)",
                    path.display()
                ),
            }
        }
        for col in ["url", "visitor", "referrer", "id"] {
            assert_eq!(
                ty(col).data_type(),
                &DataType::Utf8,
                "{}: {col}",
                path.display()
            );
        }
        for col in ["visitor", "referrer", "id"] {
            assert!(
                ty(col).is_nullable(),
                "{}: {col} must be nullable",
                path.display()
            );
        }
    }
    // Nothing else than sealed Parquet matches the glob: every matched file was readable above.
}

#[test]
fn a_bad_request_is_refused_whole_and_stores_nothing() {
    let server = TestServer::start(ServerOpts::default());
    let good: Vec<Value> = (0..10)
        .map(|i| json!({"url": format!("http://example.com/ok/{i}"), "id": format!("ok-{i}")}))
        .collect();
    let (code, resp) = server.post_events(Value::Array(good).to_string(), JSON);
    assert_accepted(code, &resp, 10);
    let acked = server.acked_seq();

    let batch = |bad_at: usize, bad: Value| -> Vec<Value> {
        (0..500)
            .map(|i| {
                if i == bad_at {
                    bad.clone()
                } else {
                    json!({"url": format!("http://example.com/bad-batch/{i}"), "id": format!("bad-{bad_at}-{i}")})
                }
            })
            .collect()
    };
    let expect_index = |code: u16, resp: &Value, index: u64, what: &str| {
        assert_error(code, resp, 400, what);
        let details = resp["details"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: no details: {resp}"));
        assert_eq!(
            details.len(),
            1,
            "{what}: exactly one invalid event: {resp}"
        );
        assert_eq!(
            details[0]["index"].as_u64(),
            Some(index),
            "{what}: index: {resp}"
        );
        assert!(
            details[0]["error"].as_str().is_some_and(|s| !s.is_empty()),
            "{what}: {resp}"
        );
    };

    // One invalid event among 500: array and NDJSON.
    let (code, resp) = server.post_events(
        Value::Array(batch(317, json!({"url": "ftp://example.com/x"}))).to_string(),
        JSON,
    );
    expect_index(code, &resp, 317, "ftp url in array");
    let (code, resp) = server.post_events(
        ndjson(&batch(123, json!({"ts": "2026-11-21T10:00:00Z"}))),
        NDJSON,
    );
    expect_index(code, &resp, 123, "missing url in NDJSON");
    let future = rfc3339(now_ms() + DAY_MS);
    let (code, resp) = server.post_events(
        Value::Array(batch(42, json!({"url": "http://a.com/", "ts": future}))).to_string(),
        JSON,
    );
    expect_index(code, &resp, 42, "ts a day ahead");
    let (code, resp) = server.post_events(
        Value::Array(batch(
            499,
            json!({"url": "http://a.com/", "visitor": "v".repeat(257)}),
        ))
        .to_string(),
        JSON,
    );
    expect_index(code, &resp, 499, "visitor too long");
    let (code, resp) = server.post_events(
        Value::Array(batch(0, json!({"url": "http://a.com/", "ts": "yesterday"}))).to_string(),
        JSON,
    );
    expect_index(code, &resp, 0, "unparseable ts");

    // Malformed bodies.
    for (body, ct, what) in [
        (r#"{"url": "http://a.com/""#, JSON, "truncated object"),
        (r#"[{"url": "http://a.com/"},"#, JSON, "truncated array"),
        ("not json at all", JSON, "not json"),
        ("42", JSON, "a number"),
        (
            "{\"url\":\"http://a.com/\"}\n{\"url\":\n{\"url\":\"http://a.com/\"}\n",
            NDJSON,
            "bad NDJSON line",
        ),
    ] {
        let (code, resp) = server.post_events(body, ct);
        assert_error(code, &resp, 400, what);
    }

    // Other content types.
    for ct in ["text/plain", "application/xml"] {
        let (code, resp) = server.post_events(r#"{"url":"http://a.com/"}"#, ct);
        assert_error(code, &resp, 415, ct);
    }

    // Too large: an 11 MB body, and more than 100 000 events.
    let line = format!(
        "{}\n",
        json!({"url": "http://example.com/big", "id": "big"})
    );
    let big = line.repeat(11 * 1024 * 1024 / line.len() + 1);
    assert!(big.len() > 11 * 1024 * 1024);
    let (code, resp) = post_tolerating_early_close(&server, big, NDJSON);
    assert_error(code, &resp, 413, "11 MB body");
    let many = "{\"url\":\"http://a.b/\"}\n".repeat(100_001);
    let (code, resp) = post_tolerating_early_close(&server, many, NDJSON);
    assert_error(code, &resp, 413, "100 001 events");

    // None of it was stored.
    assert_eq!(
        server.acked_seq(),
        acked,
        "acked_seq moved after refused requests"
    );
    server.flush();
    let rows = read_master(server.data_dir());
    let mut ids: Vec<String> = rows
        .iter()
        .map(|r| r.id.clone().unwrap_or_default())
        .collect();
    ids.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("ok-{i}")).collect();
    want.sort();
    assert_eq!(ids, want, "master holds exactly the accepted events");
}

/// A server may answer `413` before it has read the whole body and close the connection; the
/// client may then see a reset instead of the answer. Retry a few times before failing.
fn post_tolerating_early_close(server: &TestServer, body: String, ct: &str) -> (u16, Value) {
    let mut last_err = None;
    for _ in 0..5 {
        match server.try_post_events(body.clone(), ct) {
            Ok(answer) => return answer,
            Err(e) => last_err = Some(e),
        }
    }
    panic!("no answer to a large body: {last_err:?}");
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    Acked,
    Unknown,
}

/// Ingests from 6 client threads until at least `min_acked` events were acknowledged, then
/// `kill -9`s the server. Returns every request sent with its ids and outcome.
fn ingest_and_kill(
    server: &mut TestServer,
    round: usize,
    min_acked: usize,
) -> Vec<(Vec<String>, Outcome)> {
    let base = server.base_url();
    let stop = Arc::new(AtomicBool::new(false));
    let acked_events = Arc::new(AtomicUsize::new(0));
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for t in 0..6 {
        let (base, stop, acked_events, log) = (
            base.clone(),
            stop.clone(),
            acked_events.clone(),
            log.clone(),
        );
        handles.push(thread::spawn(move || {
            let client = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap();
            let mut rng = StdRng::seed_from_u64((round * 100 + t) as u64);
            let mut n = 0usize;
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let size = rng.random_range(1..=40);
                let events: Vec<Value> = (0..size)
                    .map(|_| {
                        n += 1;
                        json!({
                            "url": format!("http://crash.example/{}", rng.random_range(0..20)),
                            "id": format!("r{round}-t{t}-{n}"),
                        })
                    })
                    .collect();
                let ids: Vec<String> = events
                    .iter()
                    .map(|e| e["id"].as_str().unwrap().to_string())
                    .collect();
                k += 1;
                let (body, ct) = match k % 3 {
                    0 => (ndjson(&events), NDJSON),
                    1 => (Value::Array(events).to_string(), JSON),
                    _ => (events[0].to_string(), JSON),
                };
                let ids = if k % 3 == 2 { ids[..1].to_vec() } else { ids };
                let result = client
                    .post(format!("{base}/v1/events"))
                    .header("content-type", ct)
                    .body(body)
                    .send();
                match result {
                    Ok(resp) if resp.status().as_u16() == 202 => {
                        acked_events.fetch_add(ids.len(), Ordering::Relaxed);
                        log.lock().unwrap().push((ids, Outcome::Acked));
                    }
                    Ok(resp) => {
                        let code = resp.status();
                        log.lock().unwrap().push((ids, Outcome::Unknown));
                        assert!(code.is_server_error(), "unexpected {code} while ingesting");
                        break;
                    }
                    Err(_) => {
                        log.lock().unwrap().push((ids, Outcome::Unknown));
                        break;
                    }
                }
            }
        }));
    }
    poll_until(
        "enough acknowledged events before the kill",
        DEADLINE,
        || (acked_events.load(Ordering::Relaxed) >= min_acked).then_some(()),
    );
    server.kill9();
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("client thread");
    }
    Arc::try_unwrap(log).unwrap().into_inner().unwrap()
}

#[test]
fn kill_9_during_ingest_loses_no_acknowledged_event() {
    // Small segments so that sealing runs while the clients ingest and the kill can hit it.
    let mut server =
        TestServer::start(ServerOpts::default().env("TALLY_INGEST_SEAL_MAX_EVENTS", 1000));
    let mut requests = Vec::new();
    for round in 0..2 {
        requests.extend(ingest_and_kill(&mut server, round, 5000));
        let files = tally_e2e::master_files(server.data_dir()).len();
        eprintln!("round {round}: killed with {files} master files sealed");
        server.restart();
    }
    let acked_before = server.acked_seq();
    server.flush();
    let rows = read_master(server.data_dir());
    assert_unique_seqs(&rows);
    let ids = ids_of(&rows);
    let mut acked = 0;
    for (req_ids, outcome) in &requests {
        let present = req_ids
            .iter()
            .filter(|id| ids.contains_key(id.as_str()))
            .count();
        for id in req_ids {
            assert!(
                ids.get(id.as_str()).copied().unwrap_or(0) <= 1,
                "{id} stored more than once"
            );
        }
        match outcome {
            Outcome::Acked => {
                acked += req_ids.len();
                assert_eq!(
                    present,
                    req_ids.len(),
                    "acknowledged request lost events: {req_ids:?}"
                );
            }
            Outcome::Unknown => assert!(
                present == 0 || present == req_ids.len(),
                "a request cut by the crash was stored in part ({present} of {}): {req_ids:?}",
                req_ids.len()
            ),
        }
    }
    let cut = requests
        .iter()
        .filter(|(_, o)| *o == Outcome::Unknown)
        .count();
    eprintln!(
        "{acked} events acknowledged, {cut} requests cut by the kills, {} rows",
        rows.len()
    );
    assert!(acked >= 10_000, "only {acked} events acknowledged");
    let max_before = rows.iter().map(|r| r.seq).max().unwrap();
    assert_eq!(
        acked_before, max_before,
        "acked_seq after restart is the last seq stored"
    );

    // New events get seqs above everything stored before.
    let fresh: Vec<Value> = (0..10)
        .map(|i| json!({"url": "http://crash.example/after", "id": format!("after-{i}")}))
        .collect();
    let (code, resp) = server.post_events(Value::Array(fresh).to_string(), JSON);
    assert_accepted(code, &resp, 10);
    server.flush();
    let rows = read_master(server.data_dir());
    assert_unique_seqs(&rows);
    let after: Vec<&Row> = rows
        .iter()
        .filter(|r| r.id.as_deref().is_some_and(|i| i.starts_with("after-")))
        .collect();
    assert_eq!(after.len(), 10);
    for r in after {
        assert!(
            r.seq > max_before,
            "seq {} of {:?} not above {max_before}",
            r.seq,
            r.id
        );
    }
}

#[test]
fn status_reports_the_ingest_state() {
    let server = TestServer::start(ServerOpts::default());
    let (code, _) = server.get("/healthz");
    assert_eq!(code, 200, "/healthz");
    let (code, body) = server.get("/readyz");
    assert!(
        code == 200 || code == 503,
        "/readyz answered {code}: {body}"
    );

    let before = server.status();
    for field in ["acked_seq", "sealed_seq", "wal_bytes", "uptime_s"] {
        assert!(
            before[field].is_number(),
            "status field {field} missing or not a number: {before}"
        );
    }
    let events: Vec<Value> = (0..5)
        .map(|i| json!({"url": "http://status.example/", "id": format!("s{i}")}))
        .collect();
    let (code, resp) = server.post_events(Value::Array(events).to_string(), JSON);
    assert_accepted(code, &resp, 5);
    let after = server.status();
    assert_eq!(
        after["acked_seq"].as_u64().unwrap(),
        before["acked_seq"].as_u64().unwrap() + 5,
        "acked_seq counts acknowledged events: {after}"
    );
    assert!(
        after["wal_bytes"].as_u64().unwrap() > 0,
        "wal holds the new events: {after}"
    );
    let sealed = server.flush();
    let status = server.status();
    assert_eq!(
        status["sealed_seq"], status["acked_seq"],
        "after flush: {status}"
    );
    assert_eq!(Some(sealed), status["acked_seq"].as_u64());
    server.wait_caught_up();
    // The harness's private Redis (a unix socket URL) is the server's speed layer.
    poll_until("redis: up in the status", DEADLINE, || {
        (server.status()["redis"] == "up").then_some(())
    });
}

#[test]
fn graceful_shutdown_seals_and_restart_continues_the_sequence() {
    let mut server = TestServer::start(ServerOpts::default());
    let events: Vec<Value> = (0..100)
        .map(|i| json!({"url": "http://stop.example/", "id": format!("g{i}")}))
        .collect();
    let (code, resp) = server.post_events(ndjson(&events), NDJSON);
    assert_accepted(code, &resp, 100);
    let acked = server.acked_seq();
    assert!(server.stop(), "tally exits 0 on SIGTERM:\n{}", server.log());
    let rows = read_master(server.data_dir());
    assert_eq!(
        rows.len(),
        100,
        "graceful shutdown seals the WAL into master"
    );

    server.restart();
    assert_eq!(server.acked_seq(), acked, "acked_seq survives a restart");
    let (code, resp) = server.post_events(r#"{"url":"http://stop.example/","id":"g-after"}"#, JSON);
    assert_accepted(code, &resp, 1);
    server.flush();
    let rows = read_master(server.data_dir());
    assert_eq!(rows.len(), 101);
    assert_unique_seqs(&rows);
    let last = rows
        .iter()
        .find(|r| r.id.as_deref() == Some("g-after"))
        .unwrap();
    assert!(last.seq > acked);
}
