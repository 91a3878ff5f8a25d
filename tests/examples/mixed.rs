//! The load generator of `scripts/bench.sh mixed`: a long tail of URLs and live traffic.
//!
//! ```text
//! mixed load   BASE DIR [--urls N] [--hosts N] [--events N]
//! mixed ingest BASE DIR [--rate EVENTS_PER_S] [--seconds S]
//! ```
//!
//! `load` posts `--events` (default 10 000 000) events over `--urls` (default 1 000 000) URLs —
//! URL popularity Zipf (s = 1), URLs spread over `--hosts` (default 1 000) hosts by Zipf too —
//! with timestamps over the last 30 days, as NDJSON bodies of 10 000 events on 4 connections. It
//! writes `DIR/urls.txt` (100 000 URLs drawn by popularity, for the query scripts),
//! `DIR/hosts.txt` (every host, most URLs first) and `DIR/uniques.txt` (URLs with visitors).
//!
//! Six events in ten carry a referrer (one of 200 sites, by Zipf), for the source breakdowns.
//!
//! `ingest` sends `--rate` (default 100 000) events per second for `--seconds` as NDJSON bodies
//! of 1 000 events, each body new (URLs by popularity, random visitors), paced every 10 ms, with
//! timestamps of now (90%) or the last 30 days (10%).
//! Meanwhile it measures ingest-to-visible: every 50 ms it posts one event on a fresh URL and
//! polls `/v1/views` until the event counts; and it samples `/v1/admin/status` every 20 ms for
//! the applier's lag in events. It prints one JSON object: events sent and the achieved rate,
//! visible latency p50/p99/max (ms), lag events p50/p99/max, and non-2xx answers.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tally_e2e::bench::{arg, Zipf};
use tally_e2e::{now_ms, DAY_MS};

/// The URL universe: URL `r` (popularity rank) lives on a host drawn by Zipf, fixed by a seed so
/// that every run and both subcommands agree.
struct Universe {
    urls: Vec<String>,
    popularity: Zipf,
    hosts: usize,
    /// Referring sites, by Zipf.
    referrers: Zipf,
}

impl Universe {
    fn new(n_urls: usize, n_hosts: usize) -> Universe {
        let host_of = Zipf::new(n_hosts);
        let mut rng = StdRng::seed_from_u64(11);
        let urls = (0..n_urls)
            .map(|r| {
                let h = host_of.sample(&mut rng);
                format!("https://h{h}.bench/p/{r}")
            })
            .collect();
        Universe {
            urls,
            popularity: Zipf::new(n_urls),
            hosts: n_hosts,
            referrers: Zipf::new(200),
        }
    }

    fn url(&self, rng: &mut StdRng) -> &str {
        &self.urls[self.popularity.sample(rng)]
    }
}

fn ndjson(universe: &Universe, rng: &mut StdRng, n: usize, past_share: f64) -> String {
    let now = now_ms();
    let mut body = String::with_capacity(n * 80);
    for _ in 0..n {
        let ts = if rng.random_bool(past_share) {
            now - rng.random_range(0..30 * DAY_MS)
        } else {
            now - rng.random_range(0..1000)
        };
        let v: u32 = rng.random_range(0..1_000_000);
        body.push_str(&format!(
            "{{\"url\":\"{}\",\"ts\":{ts},\"visitor\":\"v{v}\"",
            universe.url(rng)
        ));
        // Six views in ten come from another site: one of 200, by Zipf (a search engine first).
        if rng.random_bool(0.6) {
            let r = universe.referrers.sample(rng);
            body.push_str(&format!(",\"referrer\":\"https://ref{r}.example/page\""));
        }
        body.push_str("}\n");
    }
    body
}

async fn post(client: &reqwest::Client, base: &str, body: String) -> bool {
    match client
        .post(format!("{base}/v1/events"))
        .header("Content-Type", "application/x-ndjson")
        .body(body)
        .send()
        .await
    {
        Ok(r) => r.status().as_u16() == 202,
        Err(_) => false,
    }
}

fn write_lines(path: &std::path::Path, lines: impl IntoIterator<Item = String>) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create list"));
    for l in lines {
        writeln!(f, "{l}").expect("write list");
    }
}

async fn load(base: String, dir: std::path::PathBuf, args: &[String]) {
    let n_urls = arg(args, "--urls", 1_000_000) as usize;
    let n_hosts = arg(args, "--hosts", 1000) as usize;
    let n_events = arg(args, "--events", 10_000_000);
    let universe = Arc::new(Universe::new(n_urls, n_hosts));
    let client = reqwest::Client::new();
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let per = 10_000u64;
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            let (universe, client, base) = (universe.clone(), client.clone(), base.clone());
            let (sent, failed) = (sent.clone(), failed.clone());
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(100 + w);
                loop {
                    let done = sent.fetch_add(per, Ordering::Relaxed);
                    if done >= n_events {
                        break;
                    }
                    let k = per.min(n_events - done) as usize;
                    let (u, body) = {
                        let u = universe.clone();
                        let mut r = StdRng::seed_from_u64(rng.random());
                        tokio::task::spawn_blocking(move || {
                            let b = ndjson(&u, &mut r, k, 1.0);
                            (u, b)
                        })
                        .await
                        .expect("build body")
                    };
                    drop(u);
                    if !post(&client, &base, body).await {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
    let mut rng = StdRng::seed_from_u64(5);
    write_lines(
        &dir.join("urls.txt"),
        (0..100_000).map(|_| universe.url(&mut rng).to_string()),
    );
    let mut per_host = vec![0usize; universe.hosts];
    for u in &universe.urls {
        let h: usize = u["https://h".len()..u.find(".bench").expect("bench url")]
            .parse()
            .expect("host number");
        per_host[h] += 1;
    }
    let mut hosts: Vec<usize> = (0..universe.hosts).filter(|h| per_host[*h] > 0).collect();
    hosts.sort_by_key(|h| std::cmp::Reverse(per_host[*h]));
    write_lines(
        &dir.join("hosts.txt"),
        hosts.iter().map(|h| format!("h{h}.bench")),
    );
    println!(
        "{}",
        json!({
            "events": n_events,
            "urls": n_urls,
            "hosts": hosts.len(),
            "seconds": started.elapsed().as_secs_f64(),
            "failed_requests": failed.load(Ordering::Relaxed),
        })
    );
}

fn percentiles(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return json!(null);
    }
    v.sort_by(f64::total_cmp);
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    json!({"p50": p(0.5), "p99": p(0.99), "max": v[v.len() - 1], "samples": v.len()})
}

async fn ingest(base: String, args: &[String]) {
    let rate = arg(args, "--rate", 100_000);
    let seconds = arg(args, "--seconds", 60);
    let n_urls = arg(args, "--urls", 1_000_000) as usize;
    let n_hosts = arg(args, "--hosts", 1000) as usize;
    let universe = Arc::new(Universe::new(n_urls, n_hosts));
    let client = reqwest::Client::new();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();

    // Pacing: one body of `per` events every tick, on as many tasks as needed to keep up.
    let per = 1000u64;
    let tick = Duration::from_secs_f64(per as f64 / rate as f64);
    let sender = {
        let (client, base, stop, sent, failed) = (
            client.clone(),
            base.clone(),
            stop.clone(),
            sent.clone(),
            failed.clone(),
        );
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut i = 0usize;
            let inflight = Arc::new(tokio::sync::Semaphore::new(16));
            while !stop.load(Ordering::Relaxed) {
                interval.tick().await;
                let permit = inflight.clone().acquire_owned().await.expect("semaphore");
                i += 1;
                let (client, base, sent, failed, universe) = (
                    client.clone(),
                    base.clone(),
                    sent.clone(),
                    failed.clone(),
                    universe.clone(),
                );
                tokio::spawn(async move {
                    // Every body is new: fresh URLs of the long tail and fresh visitors, as
                    // live traffic has (a replayed set of bodies would keep the live epoch
                    // to a few tens of thousands of URLs).
                    let body = {
                        let mut rng = StdRng::seed_from_u64(77 + i as u64);
                        ndjson(&universe, &mut rng, per as usize, 0.1)
                    };
                    if post(&client, &base, body).await {
                        sent.fetch_add(per, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(permit);
                });
            }
        })
    };
    let prober = {
        let (client, base, stop) = (client.clone(), base.clone(), stop.clone());
        tokio::spawn(async move {
            let mut lat = Vec::new();
            let tag = now_ms();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let url = format!("https://probe.bench/{tag}/{k}");
                let t0 = Instant::now();
                let ok = client
                    .post(format!("{base}/v1/events"))
                    .header("Content-Type", "application/json")
                    .body(json!({"url": url}).to_string())
                    .send()
                    .await
                    .is_ok_and(|r| r.status().as_u16() == 202);
                if ok {
                    let q = format!("{base}/v1/views?url={url}");
                    loop {
                        let seen = match client.get(&q).send().await {
                            Ok(r) => r
                                .json::<Value>()
                                .await
                                .ok()
                                .and_then(|b| b["views"].as_u64()),
                            Err(_) => None,
                        };
                        if seen == Some(1) {
                            lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                            break;
                        }
                        if t0.elapsed() > Duration::from_secs(30) || stop.load(Ordering::Relaxed) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            lat
        })
    };
    let sampler = {
        let (client, base, stop) = (client.clone(), base.clone(), stop.clone());
        tokio::spawn(async move {
            let mut lag = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) = client.get(format!("{base}/v1/admin/status")).send().await {
                    if let Ok(s) = r.json::<Value>().await {
                        if let (Some(a), Some(b)) =
                            (s["acked_seq"].as_u64(), s["speed_applied_seq"].as_u64())
                        {
                            lag.push(a.saturating_sub(b) as f64);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            lag
        })
    };
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    sender.await.expect("sender");
    let lat = prober.await.expect("prober");
    let lag = sampler.await.expect("sampler");
    let sent = sent.load(Ordering::Relaxed);
    println!(
        "{}",
        json!({
            "events": sent,
            "rate": sent as f64 / elapsed,
            "target_rate": rate,
            "visible_ms": percentiles(lat),
            "lag_events": percentiles(lag),
            "failed_requests": failed.load(Ordering::Relaxed),
        })
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: mixed load|ingest BASE DIR [options]";
    let (cmd, base, dir) = match (args.get(1), args.get(2), args.get(3)) {
        (Some(c), Some(b), Some(d)) => (c.as_str(), b.clone(), std::path::PathBuf::from(d)),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    std::fs::create_dir_all(&dir).expect("create output dir");
    match cmd {
        "load" => load(base, dir, &args[4..]).await,
        "ingest" => ingest(base, &args[4..]).await,
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
