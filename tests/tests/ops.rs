//! Production readiness, end to end against the real binary: metrics, readiness, admin
//! auth, refusing an open bind without a token, graceful shutdown under load, random and
//! malformed requests, and a full disk (API.md: Operations; DESIGN.md: failure behaviour).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::blocking::Client;
use reqwest::Method;
use serde_json::{json, Value};
use tally_e2e::{
    enc, now_ms, poll_until, read_master, tally_bin, ServerOpts, TestServer, DEADLINE, JSON,
};

fn events_body(ids: &[String]) -> String {
    let events: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            json!({
                "url": format!("https://ops.example/p{}", i % 7),
                "ts": now_ms() - 1000,
                "visitor": format!("v{}", i % 13),
                "id": id,
            })
        })
        .collect();
    Value::Array(events).to_string()
}

fn metrics_text(server: &TestServer) -> String {
    let resp = server
        .client()
        .get(format!("{}/metrics", server.base_url()))
        .send()
        .expect("GET /metrics");
    assert_eq!(resp.status().as_u16(), 200);
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(ct.starts_with("text/plain"), "content-type {ct:?}");
    resp.text().expect("metrics body")
}

/// The value of the first sample of `name` (with any labels) in Prometheus text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn readyz(server: &TestServer) -> (u16, Value) {
    server.get("/readyz")
}

#[test]
fn metrics_after_traffic_and_readiness_follows_redis() {
    let mut server = TestServer::start(ServerOpts::default());
    let ids: Vec<String> = (0..25).map(|i| format!("m{i}")).collect();
    let (code, body) = server.post_events(events_body(&ids), JSON);
    assert_eq!(code, 202, "{body}");
    let (code, _) = server.post_events("{\"url\": 5}", JSON);
    assert_eq!(code, 400);
    server.wait_caught_up();
    let (code, _) = server.get("/v1/views?url=https%3A%2F%2Fops.example%2Fp1");
    assert_eq!(code, 200);
    // Acknowledged, not yet sealed (seal_interval is a minute): sealing is behind by their age.
    let unsealed = sample(&metrics_text(&server), "tally_seal_lag_seconds");
    assert!(
        unsealed.is_some_and(|s| s > 0.0 && s < 60.0),
        "{unsealed:?}"
    );
    let (code, _) = server.post("/v1/admin/batch?wait=true");
    assert_eq!(code, 200);

    let text = metrics_text(&server);
    for name in [
        "tally_events_accepted_total",
        "tally_events_rejected_total",
        "tally_http_requests_total",
        "tally_acked_seq",
        "tally_speed_applied_seq",
        "tally_redis_up",
        "tally_batch_view_cutoff_seq",
        "tally_batch_view_age_seconds",
        "tally_batch_runs_total",
        "tally_speed_apply_lag_events",
        "tally_wal_bytes",
        "tally_sealed_seq",
        "tally_redis_errors_total",
        "tally_speed_events_applied_total",
    ] {
        assert!(
            sample(&text, name).is_some(),
            "no {name} in /metrics:\n{text}"
        );
    }
    // Every metric family served has help text and is listed in the README.
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"),
    )
    .expect("README.md");
    for family in text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
    {
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "{family} has no help text"
        );
        assert!(
            readme.contains(&format!("`{family}`")),
            "README.md does not list {family}"
        );
    }
    let acked = server.acked_seq() as f64;
    assert_eq!(sample(&text, "tally_events_accepted_total"), Some(25.0));
    assert_eq!(sample(&text, "tally_acked_seq"), Some(acked));
    assert_eq!(sample(&text, "tally_redis_up"), Some(1.0));
    assert_eq!(sample(&text, "tally_batch_view_cutoff_seq"), Some(acked));
    assert_eq!(sample(&text, "tally_speed_apply_lag_events"), Some(0.0));
    assert_eq!(
        sample(&text, "tally_seal_lag_seconds"),
        Some(0.0),
        "all sealed by the run"
    );
    assert_eq!(
        sample(&text, "tally_speed_events_applied_total"),
        Some(acked),
        "every acknowledged event was applied once"
    );
    // Request latency is a Prometheus histogram per route template (never a URL).
    assert!(
        text.lines().any(
            |l| l.starts_with("tally_http_request_duration_seconds_bucket{")
                && l.contains("route=\"/v1/views\"")
        ),
        "no latency histogram buckets for /v1/views:\n{text}"
    );
    assert!(
        !text.contains("ops.example"),
        "a URL leaked into a metric label"
    );

    // Ready while Redis answers; 503 with a reason when it is gone; ready again when it is back.
    let (code, body) = readyz(&server);
    assert_eq!(code, 200, "{body}");
    server.redis().expect("private redis").kill();
    let body = poll_until("/readyz to answer 503", DEADLINE, || {
        let (code, body) = readyz(&server);
        (code == 503).then_some(body)
    });
    let reason = body["error"]
        .as_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(reason.contains("redis"), "readyz reason: {body}");
    let (code, _) = server.get("/healthz");
    assert_eq!(code, 200, "healthz stays 200 while Redis is down");
    poll_until("tally_redis_up 0", DEADLINE, || {
        (sample(&metrics_text(&server), "tally_redis_up") == Some(0.0)).then_some(())
    });
    let ids: Vec<String> = (0..5).map(|i| format!("down{i}")).collect();
    let (code, body) = server.post_events(events_body(&ids), JSON);
    assert_eq!(code, 202, "ingestion continues while Redis is down: {body}");
    poll_until(
        "tally_redis_errors_total to count the failures",
        DEADLINE,
        || {
            (sample(&metrics_text(&server), "tally_redis_errors_total").unwrap_or(0.0) > 0.0)
                .then_some(())
        },
    );
    server.redis().expect("private redis").restart_empty();
    poll_until("/readyz to answer 200 again", DEADLINE, || {
        (readyz(&server).0 == 200).then_some(())
    });
    server.wait_caught_up();
}

/// Every admin endpoint: method, path, and the status a successful call may have.
const ADMIN: &[(&str, &str)] = &[
    ("POST", "/v1/admin/flush"),
    ("POST", "/v1/admin/batch?wait=true"),
    ("GET", "/v1/admin/batch"),
    ("GET", "/v1/admin/status"),
    ("POST", "/v1/admin/batch/discard?wait=true"),
];

fn call(client: &Client, base: &str, method: &str, path: &str, auth: Option<&str>) -> (u16, Value) {
    let mut req = client.request(
        Method::from_bytes(method.as_bytes()).unwrap(),
        format!("{base}{path}"),
    );
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    let resp = req
        .send()
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let code = resp.status().as_u16();
    let text = resp.text().unwrap_or_default();
    (
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[test]
fn admin_endpoints_need_the_token_and_nothing_else_does() {
    let server = TestServer::start(ServerOpts::default().env("TALLY_AUTH_ADMIN_TOKEN", "secret"));
    let client = Client::new();
    let base = server.base_url();

    // Ingestion and queries need no token.
    let ids: Vec<String> = (0..10).map(|i| format!("a{i}")).collect();
    let resp = client
        .post(format!("{base}/v1/events"))
        .header("Content-Type", JSON)
        .body(events_body(&ids))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    for path in [
        "/v1/views?url=https%3A%2F%2Fops.example%2Fp1",
        "/v1/top",
        "/v1/uniques?url=https%3A%2F%2Fops.example%2Fp1",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        let (code, body) = call(&client, &base, "GET", path, None);
        assert_eq!(code, 200, "GET {path} without a token: {body}");
    }
    let resp = client
        .post(format!("{base}/api/event"))
        .header("Content-Type", "text/plain")
        .body(r#"{"n":"pageview","u":"https://ops.example/","d":"ops.example"}"#)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);

    // Without a token, with a wrong one, or with a malformed header: 401 with a JSON error.
    for &(method, path) in ADMIN {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Bearer secre"),
            Some("Bearer secretsecret"),
            Some("Bearer "),
            Some("secret"),
            Some("Basic c2VjcmV0"),
            Some("bearer-secret"),
        ] {
            let (code, body) = call(&client, &base, method, path, auth);
            assert_eq!(code, 401, "{method} {path} with {auth:?}: {body}");
            assert!(
                body["error"].as_str().is_some_and(|s| !s.is_empty()),
                "{body}"
            );
        }
    }
    // Nothing was done by the refused calls.
    let (_, status) = call(
        &client,
        &base,
        "GET",
        "/v1/admin/status",
        Some("Bearer secret"),
    );
    assert_eq!(status["batch_cutoff_seq"], Value::Null, "{status}");

    // With the right token, each works (in this order: a view exists before the discard).
    for &(method, path) in ADMIN {
        let (code, body) = call(&client, &base, method, path, Some("Bearer secret"));
        assert!(
            code == 200 || code == 202,
            "{method} {path} with the token: {code} {body}"
        );
    }
}

/// API.md, "Read access": with `auth.read_token` set, every query endpoint needs it (or the
/// admin token); ingestion and health stay open.
#[test]
fn a_read_token_closes_the_query_endpoints_and_nothing_else() {
    let server = TestServer::start(
        ServerOpts::default()
            .env("TALLY_AUTH_ADMIN_TOKEN", "admin-secret")
            .env("TALLY_AUTH_READ_TOKEN", "read-secret"),
    );
    let client = Client::new();
    let base = server.base_url();
    let ids: Vec<String> = (0..3).map(|i| format!("r{i}")).collect();
    let (code, body) = server.post_events(events_body(&ids), JSON);
    assert_eq!(code, 202, "ingestion needs no token: {body}");
    let resp = client
        .post(format!("{base}/api/event"))
        .header("Content-Type", "text/plain")
        .header(
            "User-Agent",
            "Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0",
        )
        .body(r#"{"n":"pageview","u":"https://ops.example/"}"#)
        .send()
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        202,
        "the Plausible endpoint needs no token"
    );
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let (code, body) = call(&client, &base, "GET", path, None);
        assert_eq!(code, 200, "GET {path} without a token: {body}");
    }
    let queries = [
        "/v1/views?url=https%3A%2F%2Fops.example%2Fp1",
        "/v1/top",
        "/v1/uniques?url=https%3A%2F%2Fops.example%2Fp1",
        "/v1/site?host=ops.example",
        "/v1/sites",
        "/v1/breakdown?host=ops.example&by=source",
        "/v1/realtime?host=ops.example",
    ];
    // The Stats API takes the read token too, and is closed without it.
    for (auth, want) in [(None, 401), (Some("Bearer read-secret"), 200)] {
        let mut req = client
            .post(format!("{base}/api/v2/query"))
            .body(r#"{"site_id": "ops.example", "metrics": ["pageviews"], "date_range": "day"}"#);
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let code = req.send().unwrap().status().as_u16();
        assert_eq!(code, want, "POST /api/v2/query with {auth:?}");
    }
    for path in queries {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("read-secret"),
            Some("Bearer "),
        ] {
            let (code, body) = call(&client, &base, "GET", path, auth);
            assert_eq!(code, 401, "GET {path} with {auth:?}: {body}");
            assert!(
                body["error"]
                    .as_str()
                    .is_some_and(|s| s.contains("read token")),
                "{body}"
            );
        }
        for auth in ["Bearer read-secret", "Bearer admin-secret"] {
            let (code, body) = call(&client, &base, "GET", path, Some(auth));
            assert_eq!(code, 200, "GET {path} with {auth}: {body}");
        }
    }
    // The read token is not an admin token.
    let (code, body) = call(
        &client,
        &base,
        "GET",
        "/v1/admin/status",
        Some("Bearer read-secret"),
    );
    assert_eq!(code, 401, "{body}");
}

#[test]
fn an_open_bind_without_a_token_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(tally_bin())
        .arg("serve")
        .env("TALLY_HTTP_ADDR", "0.0.0.0:0")
        .env("TALLY_AUTH_ADMIN_TOKEN", "")
        .env("TALLY_STORAGE_DATA_DIR", dir.path().join("data"))
        .env(
            "TALLY_REDIS_URL",
            format!("unix://{}/none.sock", dir.path().display()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tally serve");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tally serve kept running on 0.0.0.0 without an admin token");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "exit status {status}");
    assert!(
        stderr.contains("admin_token"),
        "the message should name auth.admin_token:\n{stderr}"
    );
    assert!(!stdout.contains("listening on"), "{stdout}");
}

#[test]
fn sigterm_while_clients_ingest_exits_0_and_loses_nothing() {
    let mut server = TestServer::start(ServerOpts::default());
    let base = server.base_url();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for t in 0..4 {
        let (acked, stop, sent, base) = (acked.clone(), stop.clone(), sent.clone(), base.clone());
        clients.push(thread::spawn(move || {
            let client = Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let ids: Vec<String> = (0..20).map(|i| format!("t{t}-{n}-{i}")).collect();
                n += 1;
                sent.fetch_add(1, Ordering::Relaxed);
                let resp = client
                    .post(format!("{base}/v1/events"))
                    .header("Content-Type", JSON)
                    .body(events_body(&ids))
                    .send();
                match resp {
                    Ok(r) if r.status().as_u16() == 202 => {
                        acked.lock().unwrap().extend(ids);
                    }
                    Ok(r) => {
                        let code = r.status().as_u16();
                        assert_eq!(code, 503, "during shutdown only 503 is acceptable");
                    }
                    // The listener is closed: the server is going away.
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
    }
    poll_until("clients to ingest for a while", DEADLINE, || {
        (acked.lock().unwrap().len() >= 2_000).then_some(())
    });
    let start = Instant::now();
    let clean = server.stop();
    let took = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    assert!(
        clean,
        "tally did not exit 0 after SIGTERM:\n{}",
        server.log()
    );
    assert!(took < Duration::from_secs(15), "shutdown took {took:?}");
    eprintln!(
        "{} requests sent, {} events acknowledged, shutdown in {took:?}",
        sent.load(Ordering::Relaxed),
        acked.lock().unwrap().len()
    );

    // The graceful shutdown sealed the WAL: the master files alone hold every acknowledged event.
    let sealed: HashSet<String> = read_master(server.data_dir())
        .into_iter()
        .filter_map(|r| r.id)
        .collect();
    let unsealed = acked
        .lock()
        .unwrap()
        .iter()
        .filter(|id| !sealed.contains(*id))
        .count();
    assert_eq!(unsealed, 0, "acknowledged events not sealed at shutdown");

    server.restart();
    server.flush();
    let rows = read_master(server.data_dir());
    let mut count: HashMap<String, u32> = HashMap::new();
    for row in &rows {
        *count.entry(row.id.clone().unwrap_or_default()).or_default() += 1;
    }
    let acked = acked.lock().unwrap();
    let missing: Vec<&String> = acked.iter().filter(|id| !count.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events are missing after restart, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "events stored twice: {twice:?}");
    server.wait_caught_up();
}

// -----------------------------------------------------------------------------------------------
// Random and malformed requests
// -----------------------------------------------------------------------------------------------

const PATHS: &[&str] = &[
    "/v1/events",
    "/api/event",
    "/v1/views",
    "/v1/top",
    "/v1/uniques",
    "/v1/admin/flush",
    "/v1/admin/batch",
    "/v1/admin/batch/discard",
    "/v1/admin/status",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/",
    "/v1",
    "/v1/",
    "/v1/views/",
    "/v1/nope",
    "/api/event/x",
    "/v2/events",
    "/%FF%FE",
    "/v1/views%00",
    "/../../etc/passwd",
    "//v1//views",
];

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"];

const CONTENT_TYPES: &[&str] = &[
    "application/json",
    "application/x-ndjson",
    "text/plain",
    "application/json; charset=utf-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
    "",
    "application/json; charset=latin1",
    "APPLICATION/JSON",
];

fn random_string(rng: &mut StdRng) -> String {
    const PIECES: &[&str] = &[
        "https://ex.example/a",
        "http://EX.example:80/b#f",
        "javascript:alert(1)",
        "ftp://x",
        "",
        " ",
        "%",
        "%zz",
        "%FF",
        "\u{0}",
        "é",
        "🙂",
        "2026-11-21T10:00:00Z",
        "2026-13-45T99:00:00Z",
        "-1",
        "0",
        "1000",
        "1001",
        "18446744073709551616",
        "9223372036854775807",
        "-9223372036854775808",
        "1e309",
        "NaN",
        "true",
        "null",
        "hour",
        "day",
        "month",
        "year",
        "&",
        "=",
        "[]",
        "{}",
    ];
    let mut s = String::new();
    for _ in 0..rng.random_range(0..3) {
        s.push_str(PIECES[rng.random_range(0..PIECES.len())]);
    }
    if rng.random_bool(0.1) {
        s.push_str(&"x".repeat(rng.random_range(0..5000)));
    }
    s
}

fn random_query(rng: &mut StdRng) -> String {
    const KEYS: &[&str] = &[
        "url",
        "from",
        "to",
        "granularity",
        "limit",
        "host",
        "wait",
        "x",
        "url[]",
        "",
    ];
    let mut parts = Vec::new();
    for _ in 0..rng.random_range(0..5) {
        let k = KEYS[rng.random_range(0..KEYS.len())];
        let v = random_string(rng);
        match rng.random_range(0..4) {
            0 => parts.push(k.to_string()),
            1 => parts.push(format!("{k}={v}").replace([' ', '#'], "+")),
            _ => parts.push(format!("{k}={}", enc(&v))),
        }
    }
    if rng.random_bool(0.05) {
        parts.push("%ZZ=%".to_string());
    }
    parts.join("&")
}

fn random_body(rng: &mut StdRng) -> Vec<u8> {
    match rng.random_range(0..12) {
        0 => Vec::new(),
        1 => (0..rng.random_range(1..2000)).map(|_| rng.random()).collect(),
        2 => b"{".to_vec(),
        3 => b"[]".to_vec(),
        4 => b"null".to_vec(),
        5 => json!({"url": random_string(rng), "ts": random_string(rng), "visitor": random_string(rng)})
            .to_string()
            .into_bytes(),
        6 => json!([{"url": "https://ex.example/", "ts": rng.random::<i64>()}, {"url": 5}])
            .to_string()
            .into_bytes(),
        7 => format!(
            "{{\"url\":\"https://ex.example/{}\"}}\n\n{{\"url\":\"{}\"}}\nnot json\n",
            rng.random::<u16>(),
            random_string(rng).replace(['"', '\\'], "")
        )
        .into_bytes(),
        8 => json!({"n": random_string(rng), "u": random_string(rng), "p": random_string(rng)})
            .to_string()
            .into_bytes(),
        9 => json!({"n": "pageview", "u": "https://ex.example/p", "p": {"a": [1, {"b": null}]}})
            .to_string()
            .into_bytes(),
        10 => "[".repeat(rng.random_range(1..5000)).into_bytes(),
        _ => {
            let depth = rng.random_range(1..200);
            format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth)).into_bytes()
        }
    }
}

#[test]
fn random_and_malformed_requests_never_get_a_server_error() {
    let mut server = TestServer::start(
        ServerOpts::default()
            .env("TALLY_AUTH_ADMIN_TOKEN", "fuzz-token")
            // Bounded: no endless batch reruns triggered by random discards.
            .env("TALLY_BATCH_SCHEDULE", "0 0 0 1 1 *"),
    );
    let base = server.base_url();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let total = 3_000;
    let threads = 3;
    let mut handles = Vec::new();
    for t in 0..threads {
        let (base, failures) = (base.clone(), failures.clone());
        handles.push(thread::spawn(move || {
            let client = Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap();
            let mut rng = StdRng::seed_from_u64(600 + t as u64);
            for _ in 0..total / threads {
                let method = METHODS[rng.random_range(0..METHODS.len())];
                let path = PATHS[rng.random_range(0..PATHS.len())];
                let query = random_query(&mut rng);
                let url = if query.is_empty() {
                    format!("{base}{path}")
                } else {
                    format!("{base}{path}?{query}")
                };
                let body = random_body(&mut rng);
                let mut req = client.request(Method::from_bytes(method.as_bytes()).unwrap(), &url);
                let ct = CONTENT_TYPES[rng.random_range(0..CONTENT_TYPES.len())];
                if !ct.is_empty() {
                    req = req.header("Content-Type", ct);
                }
                match rng.random_range(0..4) {
                    0 => req = req.header("Authorization", "Bearer fuzz-token"),
                    1 => req = req.header("Authorization", "Bearer nope"),
                    _ => {}
                }
                if rng.random_bool(0.3) {
                    req = req.header(
                        "X-Forwarded-For",
                        random_string(&mut rng).replace(['\n', '\r', '\0'], ""),
                    );
                }
                let what = format!("{method} {url} [{} bytes, {ct:?}]", body.len());
                let resp = match req.body(body).send() {
                    Ok(r) => r,
                    Err(e) => {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{what}: transport error {e}"));
                        continue;
                    }
                };
                let code = resp.status().as_u16();
                let text = resp.text().unwrap_or_default();
                let shown: String = what.chars().take(300).collect();
                if code >= 500 && code != 503 {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{shown}: {code} {text}"));
                } else if (400..600).contains(&code) && method != "HEAD" {
                    let ok = serde_json::from_str::<Value>(&text)
                        .ok()
                        .and_then(|v| v["error"].as_str().map(|s| !s.is_empty()))
                        .unwrap_or(false);
                    if !ok {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{shown}: {code} without a JSON error: {text:.200}"));
                    }
                }
            }
        }));
    }
    for h in handles {
        h.join().expect("fuzz thread");
    }
    assert!(server.is_running(), "the server died:\n{}", server.log());
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed, e.g.:\n{}",
        failures.len(),
        failures
            .iter()
            .take(15)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Unknown routes are 404, known routes with a wrong method 405, both with a JSON error.
    let client = Client::new();
    for (method, path, want) in [
        ("GET", "/nope", 404),
        ("GET", "/v1/eventz", 404),
        ("POST", "/v1/views/extra", 404),
        ("GET", "/v1/events", 405),
        ("DELETE", "/v1/views", 405),
        ("PUT", "/api/event", 405),
        ("POST", "/healthz", 405),
        ("POST", "/metrics", 405),
    ] {
        let (code, body) = call(&client, &base, method, path, None);
        assert_eq!(code, want, "{method} {path}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|s| !s.is_empty()),
            "{body}"
        );
    }
    let (code, _) = server.get("/healthz");
    assert_eq!(code, 200);
}

// -----------------------------------------------------------------------------------------------
// Disk full
// -----------------------------------------------------------------------------------------------

/// A small tmpfs, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::Builder::new()
            .prefix("tally-tmpfs-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Writes a file until the file system is full; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = fs::File::create(&path).expect("create filler");
    let chunk = vec![0xA5u8; 64 * 1024];
    loop {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    let small = [0u8; 512];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
    path
}

#[test]
fn a_full_disk_answers_503_loses_nothing_and_recovers() {
    let tmpfs = match Tmpfs::mount("24m") {
        Ok(t) => t,
        Err(reason) => {
            tally_e2e::skip(
                "a_full_disk_answers_503_loses_nothing_and_recovers",
                &reason,
            );
            return;
        }
    };
    let data_dir = tmpfs.path().join("data");
    fs::create_dir_all(&data_dir).unwrap();
    let mut server =
        TestServer::start(ServerOpts::default().env("TALLY_STORAGE_DATA_DIR", data_dir.display()));
    let mut acked: Vec<String> = Vec::new();
    let mut refused: Vec<String> = Vec::new();
    let mut n = 0usize;
    let batch = |n: &mut usize| -> Vec<String> {
        *n += 1;
        (0..50).map(|i| format!("d{n}-{i}")).collect()
    };

    for _ in 0..5 {
        let ids = batch(&mut n);
        let (code, body) = server.post_events(events_body(&ids), JSON);
        assert_eq!(code, 202, "{body}");
        acked.extend(ids);
    }

    let filler = fill(tmpfs.path());
    // The WAL may still have room in a page it already holds: keep ingesting until it refuses.
    let mut saw_503 = false;
    for _ in 0..2_000 {
        let ids = batch(&mut n);
        let resp = server
            .client()
            .post(format!("{}/v1/events", server.base_url()))
            .header("Content-Type", JSON)
            .body(events_body(&ids))
            .send()
            .expect("POST /v1/events");
        let code = resp.status().as_u16();
        let retry_after = resp.headers().get("retry-after").is_some();
        let body: Value = resp.json().unwrap_or(Value::Null);
        match code {
            202 => acked.extend(ids),
            503 => {
                assert!(retry_after, "503 without Retry-After");
                assert!(
                    body["error"].as_str().is_some_and(|s| !s.is_empty()),
                    "{body}"
                );
                refused.extend(ids);
                saw_503 = true;
                break;
            }
            other => panic!("disk full: expected 202 or 503, got {other}: {body}"),
        }
    }
    assert!(saw_503, "ingestion never answered 503 on a full disk");
    // Still refusing, still alive, queries still answered.
    for _ in 0..3 {
        let ids = batch(&mut n);
        let (code, body) = server.post_events(events_body(&ids), JSON);
        assert_eq!(code, 503, "{body}");
        refused.extend(ids);
    }
    assert!(server.is_running());
    let (code, _) = server.get("/healthz");
    assert_eq!(code, 200);
    let (code, body) = server.get("/v1/views?url=https%3A%2F%2Fops.example%2Fp1");
    assert_eq!(code, 200, "{body}");

    // Space returns: ingestion recovers without a restart.
    fs::remove_file(&filler).unwrap();
    poll_until(
        "ingestion to recover after space is freed",
        DEADLINE,
        || {
            let ids = batch(&mut n);
            let (code, body) = server.post_events(events_body(&ids), JSON);
            match code {
                202 => {
                    acked.extend(ids);
                    Some(())
                }
                503 => {
                    refused.extend(ids);
                    None
                }
                other => panic!("after freeing space: {other} {body}"),
            }
        },
    );
    for _ in 0..5 {
        let ids = batch(&mut n);
        let (code, body) = server.post_events(events_body(&ids), JSON);
        assert_eq!(code, 202, "{body}");
        acked.extend(ids);
    }
    server.flush();
    server.wait_caught_up();

    // Nothing acknowledged lost, nothing refused stored, across a restart too.
    server.restart();
    server.flush();
    let rows = read_master(&data_dir);
    let stored: HashMap<String, usize> = rows.iter().fold(HashMap::new(), |mut m, r| {
        *m.entry(r.id.clone().unwrap_or_default()).or_default() += 1;
        m
    });
    let missing: Vec<&String> = acked
        .iter()
        .filter(|id| !stored.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged events lost: {:?}",
        &missing[..missing.len().min(5)]
    );
    assert!(stored.values().all(|&c| c == 1), "an event is stored twice");
    let refused: HashSet<&String> = refused.iter().collect();
    let leaked: Vec<&&String> = refused
        .iter()
        .filter(|id| stored.contains_key(**id))
        .collect();
    assert!(
        leaked.is_empty(),
        "events answered 503 were stored: {:?}",
        &leaked[..leaked.len().min(5)]
    );
    assert_eq!(rows.len(), acked.len());
    drop(server);
    drop(tmpfs);
}
