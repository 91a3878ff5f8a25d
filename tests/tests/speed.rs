//! The speed layer and the exact merge end to end against the real binary and a
//! private `redis-server` — model-based interleavings of ingest, flush, batch runs and queries;
//! hot URLs through batch swaps; Redis loss; `kill -9` (API.md: Queries, Operations;
//! DESIGN.md: epochs, invariant 4, failure table).
//!
//! Every assertion compares the server against a reference model of the events it acknowledged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tally_e2e::{
    assert_exact, assert_views, batch_run, count_by_url, get_views, ingest_exact, make_urls,
    now_ms, poll_until, random_range, read_master, seed, top_items, views_query, Model, Range,
    ServerOpts, TestServer, DAY_MS, DEADLINE, JSON,
};

// ---------------------------------------------------------------------------------------------
// Sending events (the reference model and its helpers are in `tally_e2e::model`)
// ---------------------------------------------------------------------------------------------

/// Posts `n` events: half in the last minutes (the current hour, the speed layer's own), half
/// spread over 30 days.
fn ingest_mixed(
    server: &TestServer,
    model: &mut Model,
    rng: &mut StdRng,
    urls: &[String],
    n: usize,
) {
    let now = now_ms();
    let events: Vec<(String, i64)> = (0..n)
        .map(|_| {
            let i = rng.random_range(0..urls.len());
            let url = urls[rng.random_range(0..=i)].clone();
            let ts = if rng.random_bool(0.5) {
                now - rng.random_range(0..10 * 60_000)
            } else {
                now - rng.random_range(0..30 * DAY_MS)
            };
            (url, ts)
        })
        .collect();
    ingest_exact(server, model, &events);
}

/// `GET path` with the response headers: `(status, X-Tally-Degraded, body)`.
fn get_with_degraded(server: &TestServer, path: &str) -> (u16, Option<String>, Value) {
    let resp = server
        .client()
        .get(format!("{}{}", server.base_url(), path))
        .send()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let code = resp.status().as_u16();
    let degraded = resp
        .headers()
        .get("x-tally-degraded")
        .map(|v| v.to_str().unwrap().to_string());
    let text = resp.text().unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (code, degraded, body)
}

/// Sets the flag when dropped, so that helper threads stop even when the test panics.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A seeded random generator, a server with its own Redis, 30 URLs over 3 hosts and an empty
/// model.
fn start_with_30_urls() -> (StdRng, TestServer, Vec<String>, Model) {
    let rng = StdRng::seed_from_u64(seed());
    let server = TestServer::start(ServerOpts::default());
    (rng, server, make_urls(30, 3), Model::default())
}

/// Waits until Redis is up again and the speed layer has applied every acknowledged event.
fn wait_redis_up_and_caught_up(server: &TestServer) {
    poll_until("redis up and caught up", DEADLINE, || {
        let s = server.status();
        (s["redis"] == "up" && s["speed_applied_seq"] == s["acked_seq"]).then_some(())
    });
}

/// The total of every URL, then [`assert_exact`]'s probes, against the model.
fn assert_every_url_exact(server: &TestServer, model: &Model, rng: &mut StdRng, urls: &[String]) {
    for url in urls {
        assert_views(server, model, url, Range::all());
    }
    assert_exact(server, model, rng, urls);
}

/// A batch run, then [`assert_exact`] once the speed layer has caught up.
fn batch_run_then_exact(server: &TestServer, model: &Model, rng: &mut StdRng, urls: &[String]) {
    batch_run(server);
    server.wait_caught_up();
    assert_exact(server, model, rng, urls);
}
// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Random interleavings (seeded) of ingest, flush, batch runs (waited for or not) and queries:
/// after each catch-up every probed URL/range and top-N equals the model; before catch-up no
/// answer ever exceeds what was acknowledged.
#[test]
fn model_based_random_interleavings() {
    let mut rng = StdRng::seed_from_u64(seed());
    // A short grace so that epoch GC happens during the test too.
    let server = TestServer::start(ServerOpts::default().env("TALLY_SPEED_GC_GRACE", "2s"));
    let urls = make_urls(40, 4);
    let mut model = Model::default();
    let (mut runs, mut probes) = (0, 0);
    let mut ops = Vec::new();
    for _ in 0..150 {
        match rng.random_range(0..100) {
            0..45 => {
                let n = rng.random_range(1..=150);
                ingest_mixed(&server, &mut model, &mut rng, &urls, n);
                ops.push(format!("ingest {n}"));
            }
            45..55 => {
                server.flush();
                ops.push("flush".into());
            }
            55..65 if runs < 16 => {
                // 409 when a run started without waiting is still going.
                let (code, run) = server.post("/v1/admin/batch?wait=true");
                assert!(
                    code == 200 || code == 409,
                    "POST /v1/admin/batch?wait=true: {run}"
                );
                runs += 1;
                ops.push(format!("batch wait ({code}, cutoff {})", run["cutoff_seq"]));
            }
            65..72 if runs < 16 => {
                let (code, body) = server.post("/v1/admin/batch");
                assert!(
                    code == 202 || code == 409,
                    "POST /v1/admin/batch: {code} {body}"
                );
                runs += 1;
                ops.push(format!("batch nowait ({code})"));
            }
            72..82 => {
                // Not caught up yet: whatever is visible was acknowledged.
                for url in urls.choose_multiple(&mut rng, 5) {
                    let r = random_range(&mut rng);
                    let body = get_views(&server, url, r, "total");
                    let v = body["views"].as_u64().unwrap();
                    assert!(
                        v <= model.views(url, r),
                        "more than acknowledged: {url} {r:?}: {body} (ops: {ops:?})"
                    );
                }
                ops.push("query (no catch-up)".into());
            }
            _ => {
                server.wait_caught_up();
                assert_exact(&server, &model, &mut rng, &urls);
                probes += 1;
                ops.push("catch up + probe".into());
            }
        }
    }
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);
    for url in &urls {
        assert_views(&server, &model, url, Range::all());
    }
    eprintln!(
        "{runs} batch runs, {probes} probes, {} events; ops: {ops:?}",
        model.events.len()
    );
    // One more run after everything: still exact, and the speed layer is empty for all URLs.
    poll_until("no batch run going", DEADLINE, || {
        let (code, body) = server.get("/v1/admin/batch");
        assert_eq!(code, 200, "{body}");
        body["running"].is_null().then_some(())
    });
    batch_run(&server);
    server.wait_caught_up();
    for url in &urls {
        let body = assert_views(&server, &model, url, Range::all());
        assert_eq!(body["speed_views"].as_u64(), Some(0), "{body}");
    }
}

/// Two writers ingest hot URLs while three batch runs swap views and a prober queries every
/// few milliseconds: a total never goes down, never exceeds what was sent (acknowledged + in
/// flight), and at the end equals what was acknowledged.
#[test]
fn hot_urls_never_go_down_through_batch_swaps() {
    let seed = seed();
    let server = TestServer::start(ServerOpts::default().env("TALLY_SPEED_GC_GRACE", "2s"));
    let hot = [
        "https://hot.test/a",
        "https://hot.test/b?x=1",
        "https://hot2.test/",
    ];
    let sent: [AtomicU64; 3] = Default::default();
    let acked: [AtomicU64; 3] = Default::default();
    let stop = AtomicBool::new(false);
    let probes = AtomicU64::new(0);
    let versions_seen = Mutex::new(Vec::<Value>::new());
    let acked_total = || acked.iter().map(|a| a.load(Ordering::SeqCst)).sum::<u64>();

    thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        for w in 0..2u64 {
            let (server, sent, acked, stop, hot) = (&server, &sent, &acked, &stop, &hot);
            s.spawn(move || {
                let _stop = StopOnDrop(stop);
                let mut rng = StdRng::seed_from_u64(seed ^ (w + 1));
                while !stop.load(Ordering::SeqCst) {
                    let i = rng.random_range(0..hot.len());
                    let k = rng.random_range(1..=20u64);
                    let now = now_ms();
                    let events: Vec<Value> = (0..k)
                        .map(|j| json!({"url": hot[i], "ts": now - (j as i64) * 1000}))
                        .collect();
                    sent[i].fetch_add(k, Ordering::SeqCst);
                    let (code, body) = server.post_events(Value::Array(events).to_string(), JSON);
                    assert_eq!(code, 202, "writer {w}: {body}");
                    acked[i].fetch_add(k, Ordering::SeqCst);
                }
            });
        }
        {
            let (server, sent, stop, hot, probes, versions_seen) =
                (&server, &sent, &stop, &hot, &probes, &versions_seen);
            s.spawn(move || {
                let _stop = StopOnDrop(stop);
                let mut last = [0u64; 3];
                while !stop.load(Ordering::SeqCst) {
                    for (i, url) in hot.iter().enumerate() {
                        let body = get_views(server, url, Range::all(), "total");
                        let v = body["views"].as_u64().unwrap();
                        let bound = sent[i].load(Ordering::SeqCst);
                        assert!(
                            v >= last[i],
                            "{url} went down from {} to {v}: {body}",
                            last[i]
                        );
                        assert!(v <= bound, "{url}: {v} > {bound} sent: {body}");
                        last[i] = v;
                        probes.fetch_add(1, Ordering::Relaxed);
                        let mut seen = versions_seen.lock().unwrap();
                        if !seen.contains(&body["batch"]["version"]) {
                            seen.push(body["batch"]["version"].clone());
                        }
                    }
                    thread::sleep(Duration::from_millis(3));
                }
            });
        }
        for _ in 0..3 {
            let before = acked_total();
            poll_until("writers to make progress", DEADLINE, || {
                (acked_total() >= before + 4000 || stop.load(Ordering::SeqCst)).then_some(())
            });
            assert!(
                !stop.load(Ordering::SeqCst),
                "a helper thread stopped early"
            );
            batch_run(&server);
        }
        let before = acked_total();
        poll_until("writers to make progress", DEADLINE, || {
            (acked_total() >= before + 4000 || stop.load(Ordering::SeqCst)).then_some(())
        });
        stop.store(true, Ordering::SeqCst);
    });

    server.wait_caught_up();
    let mut want_top: Vec<(String, u64)> = Vec::new();
    for (i, url) in hot.iter().enumerate() {
        let n = acked[i].load(Ordering::SeqCst);
        let body = get_views(&server, url, Range::all(), "total");
        assert_eq!(body["views"].as_u64(), Some(n), "{url}: {body}");
        want_top.push((url.to_string(), n));
    }
    want_top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let (code, body) = server.get("/v1/top?limit=3");
    assert_eq!(code, 200, "{body}");
    let got = top_items(&body);
    assert_eq!(got, want_top, "{body}");
    let seen = versions_seen.lock().unwrap();
    eprintln!(
        "{} probes, {} events, batch versions seen by the prober: {seen:?}",
        probes.load(Ordering::Relaxed),
        acked_total()
    );
    assert!(probes.load(Ordering::Relaxed) > 30, "the prober ran");
    assert!(seen.len() >= 3, "the prober saw the swaps: {seen:?}");
}

/// Redis killed: queries `200` batch-only with `speed_available: false` and
/// `X-Tally-Degraded: speed`, ingestion `202`. Redis back empty: exact again after catch-up.
#[test]
fn redis_down_degrades_and_redis_back_empty_is_rebuilt() {
    let (mut rng, mut server, urls, mut model) = start_with_30_urls();
    ingest_mixed(&server, &mut model, &mut rng, &urls, 600);
    batch_run(&server);
    let batch_model = model.clone();
    ingest_mixed(&server, &mut model, &mut rng, &urls, 300);
    server.flush(); // part of the speed layer's events sealed in master files, part in the WAL
    ingest_mixed(&server, &mut model, &mut rng, &urls, 200);
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);

    server.redis().unwrap().kill();
    let probe: Vec<String> = urls.choose_multiple(&mut rng, 8).cloned().collect();
    poll_until("a degraded answer", DEADLINE, || {
        let (code, _, body) =
            get_with_degraded(&server, &views_query(&probe[0], Range::all(), "total"));
        assert_eq!(code, 200, "{body}");
        (body["speed_available"] == json!(false)).then_some(())
    });
    let check_degraded = |batch_model: &Model| {
        for url in &probe {
            let q = views_query(url, Range::all(), "total");
            let (code, degraded, body) = get_with_degraded(&server, &q);
            assert_eq!(code, 200, "{q}: {body}");
            assert_eq!(degraded.as_deref(), Some("speed"), "{q}: {body}");
            assert_eq!(body["speed_available"], json!(false), "{body}");
            assert_eq!(body["speed_views"].as_u64(), Some(0), "{body}");
            let want = batch_model.views(url, Range::all());
            assert_eq!(body["views"].as_u64(), Some(want), "batch only: {body}");
            assert_eq!(body["batch_views"].as_u64(), Some(want), "{body}");
        }
        let (code, degraded, body) = get_with_degraded(&server, "/v1/top?limit=10");
        assert_eq!(code, 200, "{body}");
        assert_eq!(degraded.as_deref(), Some("speed"), "{body}");
        assert_eq!(body["speed_available"], json!(false), "{body}");
        let got = top_items(&body);
        assert_eq!(got, batch_model.top(10, None, Range::all()), "{body}");
    };
    check_degraded(&batch_model);
    // Ingestion goes on while Redis is down.
    ingest_mixed(&server, &mut model, &mut rng, &urls, 200);
    check_degraded(&batch_model);
    poll_until("status redis: down", DEADLINE, || {
        (server.status()["redis"] == "down").then_some(())
    });

    // Redis back, empty: the live epochs are rebuilt from master files and the WAL.
    server.redis().unwrap().restart_empty();
    ingest_mixed(&server, &mut model, &mut rng, &urls, 50);
    wait_redis_up_and_caught_up(&server);
    for url in &urls {
        let body = assert_views(&server, &model, url, Range::all());
        assert_eq!(body["speed_available"], json!(true), "{body}");
    }
    assert_exact(&server, &model, &mut rng, &urls);
    // And the next batch run still lines up with the rebuilt speed layer.
    ingest_mixed(&server, &mut model, &mut rng, &urls, 50);
    batch_run_then_exact(&server, &model, &mut rng, &urls);
}

/// `kill -9` while two writers ingest (and after a batch run): after restart, once caught up,
/// every URL counts each stored event exactly once (no double apply), every acknowledged
/// event is there, and ranges/top equal the master dataset.
#[test]
fn kill9_while_ingesting_is_exact_after_restart() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut server = TestServer::start(ServerOpts::default());
    let urls = make_urls(12, 2);
    let acked_total = std::sync::Arc::new(AtomicU64::new(0));
    let base = server.base_url();

    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (urls, base, acked_total) = (urls.clone(), base.clone(), acked_total.clone());
            thread::spawn(move || {
                let client = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .build()
                    .unwrap();
                let mut rng = StdRng::seed_from_u64(seed ^ (w + 7));
                let mut acked: HashMap<String, u64> = HashMap::new();
                let mut uncertain: HashMap<String, u64> = HashMap::new();
                loop {
                    let now = now_ms();
                    let batch: Vec<(String, i64)> = (0..rng.random_range(20..100))
                        .map(|_| {
                            let url = urls.choose(&mut rng).unwrap().clone();
                            (url, now - rng.random_range(0..2 * DAY_MS))
                        })
                        .collect();
                    let body: Vec<Value> = batch
                        .iter()
                        .map(|(u, ts)| json!({"url": u, "ts": ts}))
                        .collect();
                    let resp = client
                        .post(format!("{base}/v1/events"))
                        .header("content-type", JSON)
                        .body(Value::Array(body).to_string())
                        .send();
                    let ok = matches!(&resp, Ok(r) if r.status().as_u16() == 202);
                    let into = if ok { &mut acked } else { &mut uncertain };
                    for (u, _) in &batch {
                        *into.entry(u.clone()).or_insert(0) += 1;
                    }
                    if !ok {
                        return (acked, uncertain);
                    }
                    acked_total.fetch_add(batch.len() as u64, Ordering::SeqCst);
                }
            })
        })
        .collect();

    poll_until("1500 events acknowledged", DEADLINE, || {
        (acked_total.load(Ordering::SeqCst) >= 1500).then_some(())
    });
    batch_run(&server);
    let after_run = acked_total.load(Ordering::SeqCst);
    poll_until("1500 more events acknowledged", DEADLINE, || {
        (acked_total.load(Ordering::SeqCst) >= after_run + 1500).then_some(())
    });
    server.kill9();
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut uncertain: HashMap<String, u64> = HashMap::new();
    for w in writers {
        let (a, u) = w.join().expect("writer thread");
        for (k, v) in a {
            *acked.entry(k).or_insert(0) += v;
        }
        for (k, v) in u {
            *uncertain.entry(k).or_insert(0) += v;
        }
    }

    server.restart();
    server.wait_caught_up();
    server.flush();
    let rows = read_master(server.data_dir());
    let stored = count_by_url(&rows);
    let mut seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), rows.len(), "each event stored once");
    assert_eq!(
        rows.len() as u64,
        server.acked_seq(),
        "master holds every acked seq"
    );
    for url in &urls {
        let (a, u, s) = (
            acked.get(url).copied().unwrap_or(0),
            uncertain.get(url).copied().unwrap_or(0),
            stored.get(url).copied().unwrap_or(0),
        );
        assert!(
            a <= s && s <= a + u,
            "{url}: acked {a}, in flight {u}, stored {s}"
        );
    }
    let model = Model {
        events: rows.iter().map(|r| (r.url.clone(), r.ts)).collect(),
    };
    assert_every_url_exact(&server, &model, &mut rng, &urls);
    batch_run_then_exact(&server, &model, &mut rng, &urls);
}

/// `kill -9` while a batch run is going (its epoch closed, its view not published), and Redis
/// restarted empty during another run: after restart and catch-up, exact; the next run too.
#[test]
fn crashes_during_batch_runs_stay_exact() {
    let (mut rng, mut server, urls, mut model) = start_with_30_urls();
    ingest_mixed(&server, &mut model, &mut rng, &urls, 2000);
    batch_run(&server);
    for round in 0..3 {
        ingest_mixed(&server, &mut model, &mut rng, &urls, 1500);
        let (code, body) = server.post("/v1/admin/batch");
        assert_eq!(code, 202, "POST /v1/admin/batch: {body}");
        ingest_mixed(&server, &mut model, &mut rng, &urls, 100);
        server.kill9();
        server.restart();
        server.wait_caught_up();
        assert_every_url_exact(&server, &model, &mut rng, &urls);
        eprintln!("round {round}: exact after kill -9 during a run");
    }
    // Redis lost while a run is going.
    ingest_mixed(&server, &mut model, &mut rng, &urls, 1500);
    let (code, body) = server.post("/v1/admin/batch");
    assert_eq!(code, 202, "POST /v1/admin/batch: {body}");
    server.redis().unwrap().restart_empty();
    ingest_mixed(&server, &mut model, &mut rng, &urls, 100);
    poll_until("no batch run going", DEADLINE, || {
        let (_, body) = server.get("/v1/admin/batch");
        body["running"].is_null().then_some(())
    });
    wait_redis_up_and_caught_up(&server);
    assert_every_url_exact(&server, &model, &mut rng, &urls);
    batch_run_then_exact(&server, &model, &mut rng, &urls);
}

/// Redis emptied while the server is down (stopped gracefully, then `kill -9`): at start-up the
/// live epochs are rebuilt from the master dataset and the WAL; exact once caught up.
#[test]
fn redis_emptied_while_the_server_is_down_is_rebuilt_at_start() {
    let (mut rng, mut server, urls, mut model) = start_with_30_urls();
    ingest_mixed(&server, &mut model, &mut rng, &urls, 800);
    batch_run(&server);
    ingest_mixed(&server, &mut model, &mut rng, &urls, 400);
    server.flush();
    ingest_mixed(&server, &mut model, &mut rng, &urls, 300);
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);

    assert!(server.stop(), "graceful stop:\n{}", server.log());
    server.redis().unwrap().restart_empty();
    server.restart();
    server.wait_caught_up();
    assert_every_url_exact(&server, &model, &mut rng, &urls);

    ingest_mixed(&server, &mut model, &mut rng, &urls, 300);
    server.kill9();
    server.redis().unwrap().restart_empty();
    server.restart();
    server.wait_caught_up();
    assert_every_url_exact(&server, &model, &mut rng, &urls);
    batch_run_then_exact(&server, &model, &mut rng, &urls);
}

/// With the result caches off (`query.result_cache = false`), every `/v1/top` and `/v1/uniques`
/// answer is computed: from the speed layer's incremental all-time rankings (overall and per
/// host), or by scanning for ranges. While ingest goes on (with events up to 4 minutes ahead of
/// the clock, which an all-time answer leaves out until their hour) and batch runs swap views,
/// no answer counts more than was acknowledged; once caught up, every ranking and every
/// uniques answer is exact.
#[test]
fn uncached_top_and_uniques_are_exact_while_ingesting() {
    let mut rng = StdRng::seed_from_u64(seed());
    let server = TestServer::start(
        ServerOpts::default()
            .env("TALLY_QUERY_RESULT_CACHE", "false")
            .env("TALLY_SPEED_GC_GRACE", "1s"),
    );
    let urls = make_urls(40, 4);
    let hosts: Vec<String> = (0..4).map(|h| format!("site{h}.test")).collect();
    // (url, ts, visitor); few visitors per URL, so uniques are exact (the sketch's sparse form).
    let events: Mutex<Vec<(String, i64, String)>> = Mutex::new(Vec::new());
    let model = |events: &[(String, i64, String)]| Model {
        events: events.iter().map(|(u, ts, _)| (u.clone(), *ts)).collect(),
    };
    for round in 0..8 {
        let stop = AtomicBool::new(false);
        let ingest_seed: u64 = rng.random();
        thread::scope(|s| {
            let _stop = StopOnDrop(&stop);
            s.spawn(|| {
                let mut rng = StdRng::seed_from_u64(ingest_seed);
                while !stop.load(Ordering::SeqCst) {
                    let now = now_ms();
                    let batch: Vec<(String, i64, String)> = (0..rng.random_range(1..30))
                        .map(|_| {
                            let i = rng.random_range(0..urls.len());
                            let url = urls[rng.random_range(0..=i)].clone();
                            let ts = match rng.random_range(0..10) {
                                0 => now + rng.random_range(0..240_000),
                                1..=4 => now - rng.random_range(0..60_000),
                                _ => now - rng.random_range(0..20 * DAY_MS),
                            };
                            (url, ts, format!("v{}", rng.random_range(0..25)))
                        })
                        .collect();
                    let body: Vec<Value> = batch
                        .iter()
                        .map(|(u, ts, v)| json!({"url": u, "ts": ts, "visitor": v}))
                        .collect();
                    // Recorded before sending: the server may count an event before its 202
                    // reaches us, never before we sent it (every request here is accepted).
                    events.lock().unwrap().extend(batch);
                    let (code, resp) = server.post_events(Value::Array(body).to_string(), JSON);
                    assert_eq!(code, 202, "{resp}");
                }
            });
            // Probe while ingesting: never more than was sent (checked after the answer).
            for _ in 0..30 {
                let host = hosts.choose(&mut rng).unwrap();
                for q in [
                    "/v1/top?limit=10".to_string(),
                    format!("/v1/top?limit=5&host={host}"),
                ] {
                    let (code, body) = server.get(&q);
                    assert_eq!(code, 200, "GET {q}: {body}");
                    let acked = model(&events.lock().unwrap());
                    for (url, views) in top_items(&body) {
                        assert!(
                            views <= acked.views(&url, Range::all()),
                            "GET {q}: {url} has {views}, more than was sent: {body}"
                        );
                    }
                }
            }
            if round % 2 == 1 {
                batch_run(&server);
            }
            stop.store(true, Ordering::SeqCst);
        });
        server.wait_caught_up();
        let events = events.lock().unwrap();
        let m = model(&events);
        // All time ends at the next full hour: compare only if the hour does not turn meanwhile.
        let next_hour = || (now_ms().div_euclid(tally_e2e::HOUR_MS) + 1) * tally_e2e::HOUR_MS;
        let until = next_hour();
        let all_time = Range {
            from: None,
            to: Some(until),
        };
        let mut checks = Vec::new();
        for limit in [1, 5, 10, 100, 1000] {
            let (_, body) = server.get(&format!("/v1/top?limit={limit}"));
            checks.push((
                format!("top {limit}"),
                top_items(&body),
                m.top(limit, None, all_time),
            ));
        }
        for h in &hosts {
            let (_, body) = server.get(&format!("/v1/top?limit=7&host={h}"));
            checks.push((
                format!("top of {h}"),
                top_items(&body),
                m.top(7, Some(h), all_time),
            ));
            let (_, body) = server.get(&format!("/v1/top?limit=500&host={h}"));
            checks.push((
                format!("top 500 of {h}"),
                top_items(&body),
                m.top(500, Some(h), all_time),
            ));
        }
        if next_hour() == until {
            for (what, got, want) in checks {
                assert_eq!(got, want, "{what}, round {round}");
            }
        }
        // A range (scanned, not ranked); events ahead of the clock make an open end depend on
        // the hour, so it is given.
        let mut r = random_range(&mut rng);
        r.to = r.to.or(Some(until));
        tally_e2e::assert_top(&server, &m, 10, None, r);
        for url in urls.choose_multiple(&mut rng, 6) {
            let from_day = now_ms().div_euclid(DAY_MS) - 30;
            // Without `to`, the last day is the one the next full hour falls in.
            let to_day = (until + DAY_MS - 1).div_euclid(DAY_MS);
            let want: std::collections::HashSet<&str> = events
                .iter()
                .filter(|(u, ts, _)| {
                    u == url && (from_day..to_day).contains(&ts.div_euclid(DAY_MS))
                })
                .map(|(_, _, v)| v.as_str())
                .collect();
            let q = format!(
                "/v1/uniques?url={}&from={}",
                tally_e2e::enc(url),
                tally_e2e::enc(&tally_e2e::rfc3339(from_day * DAY_MS))
            );
            let (code, body) = server.get(&q);
            assert_eq!(code, 200, "{body}");
            assert_eq!(
                body["uniques"].as_u64(),
                Some(want.len() as u64),
                "GET {q}: {body}"
            );
        }
    }
}
