//! A randomized soak of everything that can go wrong at once: ingest (with past, pre-1970 and
//! future timestamps, on URLs that include a pair with colliding 64-bit hashes and an IDN host)
//! going on while batch runs, single and double discards, runs failing for a while, `CURRENT`
//! deleted, Redis flushes, restarts and outages, `kill -9` and graceful restarts happen. After
//! each step the server is checked against a model of what it acknowledged: every answer is
//! exact, or an honest `503` or degraded answer — never a wrong number with `200`.
//!
//! Bounded in time: `TALLY_SOAK_SECS` (default 60) of steps; `TALLY_TEST_SEED` replays a run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use tally_e2e::{
    enc, ingest_exact, make_urls, now_ms, poll_until, seed, top_items, views_query, Model, Range,
    ServerOpts, TestRedis, TestServer, DAY_MS, DEADLINE, HOUR_MS,
};

fn soak_secs() -> u64 {
    std::env::var("TALLY_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
}

/// Sends small batches with past and near-future timestamps until `stop`; records what was
/// acknowledged.
fn ingest_until(
    server: &TestServer,
    model: &Mutex<Model>,
    urls: &[String],
    seed: u64,
    stop: &AtomicBool,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.load(Ordering::Relaxed) {
        let n = rng.random_range(1..=40);
        let now = now_ms();
        let batch: Vec<(String, i64)> = (0..n)
            .map(|_| {
                let url = urls.choose(&mut rng).unwrap().clone();
                let ts = match rng.random_range(0..20) {
                    0 | 1 => now + rng.random_range(0..4 * 60_000), // up to 4 minutes ahead
                    2 => -rng.random_range(1..3 * 365 * DAY_MS),    // before 1970
                    _ => now - rng.random_range(0..30 * DAY_MS),
                };
                (url, ts)
            })
            .collect();
        let mut acked = Model::default();
        ingest_exact(server, &mut acked, &batch);
        model.lock().unwrap().events.extend(acked.events);
    }
}

/// Answers seen by a check: exact 200s, 503s and degraded 200s.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    exact: u32,
    unavailable: u32,
    degraded: u32,
}

/// Every URL's all-time and last-day views, and the top 10, against the model (no ingest going
/// on). With the speed layer caught up (`exact`), a 200 that says the speed layer was available
/// must be exact; otherwise a 200 may only miss events, never add any.
fn check(server: &TestServer, model: &Model, urls: &[String], seen: &mut Seen, exact: bool) {
    // A range without `to` ends at the next full hour: events up to 5 minutes ahead may lie
    // past it. Compare only when the hour did not turn during the request.
    let next_hour = || Some((now_ms().div_euclid(HOUR_MS) + 1) * HOUR_MS);
    for url in urls {
        for from in [None, Some(now_ms().div_euclid(HOUR_MS) * HOUR_MS - DAY_MS)] {
            let asked = Range { from, to: None };
            let q = views_query(url, asked, "total");
            let before = next_hour();
            let (code, body) = server.get(&q);
            if next_hour() != before {
                continue;
            }
            let want = model.views(url, Range { from, to: before });
            match code {
                200 if exact && body["speed_available"] == true => {
                    assert_eq!(
                        body["views"].as_u64(),
                        Some(want),
                        "a wrong number: {q}: {body}"
                    );
                    seen.exact += 1;
                }
                200 => {
                    let got = body["views"].as_u64().unwrap();
                    assert!(got <= want, "an answer above the truth: {q}: {body}");
                    seen.degraded += 1;
                }
                503 => seen.unavailable += 1,
                _ => panic!("GET {q}: {code} {body}"),
            }
        }
    }
    // Overall and per host; each host also as its users write it (the IDN in Unicode).
    let mut tops: Vec<(String, Option<&str>)> = vec![("/v1/top?limit=10".into(), None)];
    for (asked, host) in HOSTS {
        tops.push((format!("/v1/top?limit=5&host={}", enc(asked)), Some(host)));
    }
    for (q, host) in tops {
        let before = next_hour();
        let (code, body) = server.get(&q);
        if next_hour() != before {
            continue;
        }
        match code {
            200 if exact && body["speed_available"] == true => {
                let limit = if host.is_some() { 5 } else { 10 };
                let want = model.top(
                    limit,
                    host,
                    Range {
                        from: None,
                        to: before,
                    },
                );
                assert_eq!(top_items(&body), want, "GET {q}: {body}");
            }
            200 | 503 => {}
            _ => panic!("GET {q}: {code} {body}"),
        }
    }
}

/// The hosts checked by `/v1/top?host=`: (as asked, as stored).
const HOSTS: [(&str, &str); 3] = [
    ("site0.test", "site0.test"),
    ("bücher.test", "xn--bcher-kva.test"),
    ("c.io", "c.io"),
];

/// The URLs: ordinary ones, a pair whose 64-bit FNV-1a hashes collide, an IDN host.
fn soak_urls() -> Vec<String> {
    let mut urls = make_urls(12, 3);
    urls.extend(
        [
            "http://c.io/dd039ca600ea1926",
            "http://c.io/3b80930a4b2ce040",
            "https://xn--bcher-kva.test/",
            "https://xn--bcher-kva.test/kauf",
        ]
        .map(String::from),
    );
    urls
}

fn speed_available(server: &TestServer) -> bool {
    server.status()["speed_available"] == true
}

/// Every acknowledged event is visible to queries (the speed layer available and caught up).
fn caught_up(server: &TestServer) -> bool {
    let s = server.status();
    s["speed_available"] == true && s["speed_applied_seq"] == s["acked_seq"]
}

#[test]
fn soak_every_answer_is_exact_or_honest() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut redis = TestRedis::start();
    let mut server = TestServer::start(
        ServerOpts::default()
            .redis_url(redis.url())
            .env("TALLY_INGEST_MAX_AGE", "36500d")
            .env("TALLY_SPEED_GC_GRACE", "1s")
            .env("TALLY_BATCH_RETRY_BACKOFF", "100ms"),
    );
    let urls = soak_urls();
    let views = server.data_dir().join("views").join("batch");
    // While set: a master file replaced by garbage (its bytes kept), so batch runs fail.
    let mut sabotaged: Option<(std::path::PathBuf, Vec<u8>)> = None;
    let model = Mutex::new(Model::default());
    let mut seen = Seen::default();
    let mut redis_down = false;
    let deadline = Instant::now() + Duration::from_secs(soak_secs());
    let mut steps = 0u32;
    let mut log: Vec<&str> = Vec::new();
    while Instant::now() < deadline {
        steps += 1;
        let op = rng.random_range(0..110);
        // Kills happen without ingest going on: a request in flight at a kill may or may not
        // be stored, and the model could not tell.
        if op >= 100 {
            // Runs fail for a while (a master file unreadable), or work again.
            if let Some((path, bytes)) = sabotaged.take() {
                std::fs::write(&path, bytes).expect("restore the master file");
                log.push("runs work again");
            } else {
                server.flush();
                let files = tally_e2e::master_files(server.data_dir());
                if let Some(path) = files.first() {
                    let bytes = std::fs::read(path).expect("read a master file");
                    std::fs::write(path, b"not parquet").expect("sabotage");
                    sabotaged = Some((path.clone(), bytes));
                }
                log.push("runs fail");
            }
        } else if (88..92).contains(&op) {
            // Someone deletes (or empties) CURRENT.
            let current = views.join("CURRENT");
            if op % 2 == 0 {
                let _ = std::fs::remove_file(&current);
            } else if current.exists() {
                std::fs::write(&current, "").expect("empty CURRENT");
            }
            log.push("CURRENT removed");
        } else if op >= 92 {
            if op < 97 {
                server.kill9();
                log.push("kill -9 and restart");
            } else {
                assert!(server.stop(), "graceful stop:\n{}", server.log());
                log.push("graceful restart");
            }
            server.restart();
        } else {
            let stop = AtomicBool::new(false);
            let ingest_seed = rng.random();
            let pause = Duration::from_millis(rng.random_range(5..60));
            let failing = sabotaged.is_some();
            let (server, model, urls) = (&server, &model, &urls);
            thread::scope(|s| {
                let ingester = s.spawn(|| ingest_until(server, model, urls, ingest_seed, &stop));
                thread::sleep(pause);
                let what = match op {
                    0..=29 => {
                        let (code, body) = server.post("/v1/admin/batch?wait=true");
                        let failed = failing && code == 500;
                        assert!(code == 200 || code == 409 || failed, "batch: {code} {body}");
                        "batch run"
                    }
                    30..=41 => {
                        let wait = if op % 2 == 0 { "?wait=true" } else { "" };
                        let (code, body) = server.post(&format!("/v1/admin/batch/discard{wait}"));
                        let failed = failing && code == 500;
                        assert!(
                            code == 200 || code == 202 || failed,
                            "discard: {code} {body}"
                        );
                        "discard"
                    }
                    42..=49 => {
                        for _ in 0..2 {
                            let (code, body) = server.post("/v1/admin/batch/discard");
                            assert!(code == 202 || code == 200, "discard: {code} {body}");
                        }
                        "double discard"
                    }
                    50..=59 => {
                        if !redis_down {
                            redis.cli(&["FLUSHALL"]);
                        }
                        "redis flushall"
                    }
                    60..=69 => {
                        redis.restart_empty();
                        redis_down = false;
                        "redis restarted empty"
                    }
                    70..=79 if redis_down => {
                        redis.restart_empty();
                        redis_down = false;
                        "redis back (empty)"
                    }
                    70..=79 => {
                        redis.kill();
                        redis_down = true;
                        "redis down"
                    }
                    _ => "ingest only",
                };
                log.push(what);
                stop.store(true, Ordering::Relaxed);
                ingester.join().expect("ingester");
            });
        }
        eprintln!("soak step {steps}: {}", log.last().unwrap_or(&""));
        let model = model.lock().unwrap();
        if redis_down || sabotaged.is_some() {
            // The speed layer may not catch up (Redis is down, or a rebuild needs the
            // unreadable master file): a 200 may lag, never exceed what was acknowledged.
            check(&server, &model, &urls, &mut seen, caught_up(&server));
        } else {
            server.wait_caught_up();
            poll_until("the speed layer is available", DEADLINE, || {
                speed_available(&server).then_some(())
            });
            check(&server, &model, &urls, &mut seen, true);
        }
    }
    // Finally everything heals: Redis up, runs work, a run publishes, every answer is exact.
    if redis_down {
        redis.restart_empty();
    }
    if let Some((path, bytes)) = sabotaged.take() {
        std::fs::write(&path, bytes).expect("restore the master file");
    }
    poll_until("a batch run succeeds", DEADLINE, || {
        (server.post("/v1/admin/batch?wait=true").0 == 200).then_some(())
    });
    server.wait_caught_up();
    poll_until("the speed layer is available", DEADLINE, || {
        speed_available(&server).then_some(())
    });
    let model = model.lock().unwrap();
    let before = seen.unavailable;
    poll_until("every answer exact", DEADLINE, || {
        let mut s = Seen::default();
        check(&server, &model, &urls, &mut s, true);
        (s.unavailable == 0 && s.degraded == 0).then_some(())
    });
    let total = model.events.len();
    let mut kinds: std::collections::BTreeMap<&str, u32> = std::collections::BTreeMap::new();
    for what in &log {
        *kinds.entry(what).or_default() += 1;
    }
    eprintln!(
        "soak (seed {seed}): {steps} steps {kinds:?}, {total} events; answers: {} exact, {} 503 \
         ({before} before healing), {} degraded",
        seen.exact, seen.unavailable, seen.degraded
    );
    assert!(seen.exact > 0);
    let (code, body) = server.get(&format!("/v1/views?url={}", enc(&urls[0])));
    assert_eq!(code, 200, "{body}");
}
