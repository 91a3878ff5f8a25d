//! How fast the speed layer applies live traffic on a long tail of URLs: the mirror (what
//! queries read) and Redis behind it, without HTTP, JSON or other load on the machine.
//!
//! ```text
//! cargo run --release -p tally-speed --example apply_bench -- [--events 2000000] [--urls 1000000] [--hosts 1000] [--batch 100000]
//! ```
//!
//! Events as `tests/examples/mixed.rs ingest` sends them: URLs by Zipf(1) popularity over
//! `--urls`, spread over `--hosts`; 90% stamped now, 10% over the last 30 days; a random visitor
//! of 1 000 000; six in ten with a referrer (one of 200 sites, by Zipf). They are appended to a
//! master dataset in a temp dir (no fsync) in bodies of 1 000 while a private `redis-server`
//! (`tally_e2e::TestRedis`) backs a `SpeedLayer` with `speed.apply_batch_max` = `--batch` (the config's default).
//! Prints one JSON object: events, the append rate, and the time until the mirror and until
//! Redis had every event (events/s each), with the applier's counters.

/// The allocator of the `tally` binary, so that the applier is timed as it runs there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_core::{Event, Seq, DAY_MS};
use tally_e2e::bench::{arg, Zipf};
use tally_master::{Master, MasterConfig};
use tally_speed::{SpeedConfig, SpeedLayer};

fn events(n: usize, n_urls: usize, n_hosts: usize, now: i64) -> Vec<Event> {
    let mut rng = StdRng::seed_from_u64(7);
    let hosts = Zipf::new(n_hosts);
    let urls: Vec<String> = (0..n_urls)
        .map(|r| format!("https://h{}.bench/page/{r}", hosts.sample(&mut rng)))
        .collect();
    let popularity = Zipf::new(n_urls);
    let referrers = Zipf::new(200);
    (0..n)
        .map(|_| {
            let ts = if rng.random_bool(0.1) {
                now - rng.random_range(0..30 * DAY_MS)
            } else {
                now - rng.random_range(0..1000)
            };
            let referrer = rng
                .random_bool(0.6)
                .then(|| format!("https://ref{}.example/page", referrers.sample(&mut rng)));
            Event {
                ts,
                url: urls[popularity.sample(&mut rng)].clone(),
                visitor: Some(format!("v{}", rng.random_range(0..1_000_000))),
                referrer,
                id: None,
                received_at: now,
            }
        })
        .collect()
}

async fn wait_for(what: impl Fn() -> bool) -> Duration {
    let t = Instant::now();
    while !what() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    t.elapsed()
}

/// Redis's `used_memory`, its keys, and per kind of key (the third `:`-separated part of
/// `e:{start}:{kind}:{id}`, or the name after the epoch) their count and `MEMORY USAGE` bytes,
/// as a JSON object.
async fn redis_memory(url: &str) -> String {
    use std::collections::BTreeMap;
    let client = redis::Client::open(url).expect("redis url");
    // MEMORY USAGE of a hash of every live URL takes a while.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut c = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connect to redis");
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut c)
        .await
        .expect("INFO");
    let used = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap_or("0")
        .trim()
        .to_string();
    let mut kinds: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1_000)
            .query_async(&mut c)
            .await
            .expect("SCAN");
        let mut p = redis::pipe();
        for k in &keys {
            p.cmd("MEMORY").arg("USAGE").arg(k).arg("SAMPLES").arg(0);
        }
        let sizes: Vec<Option<u64>> = p.query_async(&mut c).await.expect("MEMORY USAGE");
        for (k, n) in keys.iter().zip(sizes) {
            let parts: Vec<&str> = k.split(':').collect();
            let kind = match parts.as_slice() {
                [_, "e", _, kind, ..] => kind.to_string(),
                _ => "other".to_string(),
            };
            let e = kinds.entry(kind).or_default();
            e.0 += 1;
            e.1 += n.unwrap_or(0);
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let kinds: Vec<String> = kinds
        .iter()
        .map(|(k, (n, b))| format!("\"{k}\":{{\"keys\":{n},\"bytes\":{b}}}"))
        .collect();
    format!("{{\"used_memory\":{used},{}}}", kinds.join(","))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n = arg(&args, "--events", 2_000_000) as usize;
    let n_urls = arg(&args, "--urls", 1_000_000) as usize;
    let n_hosts = arg(&args, "--hosts", 1000) as usize;
    let batch = arg(&args, "--batch", 100_000) as usize;
    let now = tally_core::now_ms();
    let all = events(n, n_urls, n_hosts, now);

    let redis = tally_e2e::TestRedis::start();
    let dir = tempfile::tempdir().expect("a temp dir");
    let master = Master::open(MasterConfig {
        data_dir: dir.path().to_path_buf(),
        seal_interval: Duration::from_secs(3600),
        seal_max_events: 1_000_000,
        fsync: false,
        tail_capacity: n.max(1),
    })
    .expect("open the master dataset");
    let speed = SpeedLayer::start(
        SpeedConfig {
            redis_url: redis.url(),
            key_prefix: "tally:".into(),
            gc_grace: Duration::from_secs(60),
            apply_batch_max: batch,
            sketch_precision: 14,
            applier_nice: -10,
        },
        master.clone(),
    )
    .await;
    wait_for(|| speed.available()).await;

    let t = Instant::now();
    let mut last = Seq::ZERO;
    let mut rest = all.into_iter();
    loop {
        let body: Vec<Event> = rest.by_ref().take(1000).collect();
        if body.is_empty() {
            break;
        }
        last = master.append(body).await.expect("append").last;
    }
    let append = t.elapsed();
    let mirror = wait_for(|| speed.applied_seq() >= last).await;
    let mirror_total = t.elapsed();
    wait_for(|| speed.redis_applied_seq() >= last).await;
    let redis_total = t.elapsed();
    let memory = redis_memory(&redis.url()).await;
    let s = speed.stats();
    let rate = |d: Duration| (n as f64 / d.as_secs_f64()).round();
    println!(
        "{{\"events\":{n},\"urls\":{n_urls},\"append_events_per_s\":{},\
         \"mirror_s\":{:.3},\"mirror_after_append_s\":{:.3},\"mirror_events_per_s\":{},\
         \"redis_s\":{:.3},\"redis_events_per_s\":{},\"live_urls\":{},\
         \"redis_writes\":{},\"redis_rewrites\":{},\"redis_memory\":{}}}",
        rate(append),
        mirror_total.as_secs_f64(),
        mirror.as_secs_f64(),
        rate(mirror_total),
        redis_total.as_secs_f64(),
        rate(redis_total),
        speed.epochs().iter().map(|e| e.urls).sum::<usize>(),
        s.applies,
        s.resyncs,
        memory,
    );
    speed.shutdown().await;
}
