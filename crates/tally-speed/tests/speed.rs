//! Integration tests of the speed layer against a real master dataset (in a tempdir) and a real
//! `redis-server` per test (`tally_e2e::TestRedis`: private unix socket, killed on drop).

// Test helpers fail by panicking, as the tests do.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use tally_core::sketch::visitor_hash32;
use tally_core::{cell_of, hour_of, Event, Seq, CELLS_PER_HOUR, CELL_MS, HOUR_MS};
use tally_e2e::TestRedis;
use tally_master::{Master, MasterConfig};
use tally_speed::{NotCovered, SpeedConfig, SpeedLayer};
use tempfile::TempDir;

const PREFIX: &str = "tally:";

/// A connection to the test's Redis.
async fn conn(redis: &TestRedis) -> MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// `GET key` on the test's Redis.
async fn get<T: redis::FromRedisValue>(
    c: &mut MultiplexedConnection,
    key: impl redis::ToRedisArgs,
) -> T {
    redis::cmd("GET").arg(key).query_async(c).await.unwrap()
}

/// `KEYS pattern` on the test's Redis.
async fn redis_keys(c: &mut MultiplexedConnection, pattern: &str) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(pattern)
        .query_async(c)
        .await
        .unwrap()
}

/// Redis holds exactly what the model says for epoch 1 (the only one): applied up to the
/// acknowledged seq, and per URL (through its id in `urls`) the views of every event.
async fn assert_redis_epoch_1_exact(c: &mut MultiplexedConnection, master: &Master, model: &Model) {
    let applied: u64 = get(c, "tally:e:1:applied").await;
    assert_eq!(Seq(applied), master.acked_seq());
    // Buckets of 64 ids: `nb:{b}` names them by slot, `hb:{b}` holds a field per (id, cell)
    // with the slot above 32 bits.
    let buckets: Vec<u64> = redis::cmd("SMEMBERS")
        .arg("tally:e:1:buckets")
        .query_async(c)
        .await
        .unwrap();
    assert!(!buckets.is_empty());
    let mut totals = HashMap::new();
    for b in buckets {
        let names: HashMap<u64, String> = redis::cmd("HGETALL")
            .arg(format!("tally:e:1:nb:{b}"))
            .query_async(c)
            .await
            .unwrap();
        let cells: HashMap<u64, u64> = redis::cmd("HGETALL")
            .arg(format!("tally:e:1:hb:{b}"))
            .query_async(c)
            .await
            .unwrap();
        for (slot, url) in names {
            let views = cells
                .iter()
                .filter(|(f, _)| **f >> 32 == slot)
                .map(|(_, n)| n)
                .sum::<u64>();
            assert!(totals.insert(url, views).is_none());
        }
    }
    // These events have no referrer: all their views are direct, counted under the URL only
    // (no source key: direct views are kept apart only for URLs with referred ones).
    let want = model.range_totals(Seq(0), i64::MIN, i64::MAX, None);
    assert!(totals.keys().all(|k| !tally_core::dims::is_source_key(k)));
    assert_eq!(totals, want);
}

/// A master dataset in a fresh temporary directory (kept as long as the `TempDir`).
fn open_master() -> (TempDir, Master) {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::open(master_config(dir.path())).unwrap();
    (dir, master)
}

fn master_config(dir: &Path) -> MasterConfig {
    MasterConfig {
        data_dir: dir.to_path_buf(),
        seal_interval: Duration::from_secs(3600),
        seal_max_events: 300,
        fsync: false,
        // Small, so that catching up after an outage reads from storage (`Tail::Gone`).
        tail_capacity: 200,
    }
}

fn speed_config(redis: &TestRedis) -> SpeedConfig {
    SpeedConfig {
        redis_url: redis.url(),
        key_prefix: PREFIX.to_string(),
        gc_grace: Duration::from_millis(50),
        apply_batch_max: 64,
        sketch_precision: PRECISION,
        applier_nice: 0,
    }
}

/// Deterministic pseudo-random numbers (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

const BASE_TS: i64 = 1_795_000_000_000; // 2026-11-18
const HOURS: i64 = 30;

fn url(i: u64) -> String {
    format!("http://h{}.example.com/p{}", i % 3, i)
}

fn random_events(rng: &mut Rng, n: usize) -> Vec<Event> {
    (0..n)
        .map(|_| {
            let ts = BASE_TS + rng.below((HOURS * HOUR_MS) as u64) as i64;
            Event {
                ts,
                url: url(rng.below(25)),
                visitor: Some(format!("v{}", rng.below(50))),
                referrer: None,
                id: None,
                received_at: ts,
            }
        })
        .collect()
}

/// The reference: every acknowledged event with its seq.
#[derive(Default)]
struct Model {
    /// (seq, url, cell, visitor hash)
    events: Vec<(Seq, String, i64, Option<u32>)>,
}

impl Model {
    async fn ingest(&mut self, master: &Master, events: Vec<Event>) {
        let cells: Vec<(String, i64, Option<u32>)> = events
            .iter()
            .map(|e| {
                let v = e.visitor.as_deref().map(|v| visitor_hash32(v.as_bytes()));
                (e.url.clone(), cell_of(e.ts), v)
            })
            .collect();
        let r = master.append(events).await.unwrap();
        assert_eq!(r.last.0 - r.first.0 + 1, cells.len() as u64);
        for (i, (u, h, v)) in cells.into_iter().enumerate() {
            self.events.push((Seq(r.first.0 + i as u64), u, h, v));
        }
    }

    fn matching(
        &self,
        after: Seq,
        from: i64,
        to: i64,
    ) -> impl Iterator<Item = &(Seq, String, i64, Option<u32>)> {
        self.events
            .iter()
            .filter(move |(s, _, h, _)| *s > after && *h >= from && *h < to)
    }

    /// Distinct visitor hashes of `u` on the days `[from_day, to_day)`, ascending.
    fn visitors(&self, u: &str, after: Seq, from_day: i64, to_day: i64) -> Vec<u32> {
        let set: std::collections::BTreeSet<u32> = self
            .events
            .iter()
            .filter(|(s, x, h, _)| {
                let day = h.div_euclid(24 * CELLS_PER_HOUR);
                *s > after && x == u && day >= from_day && day < to_day
            })
            .filter_map(|(_, _, _, v)| *v)
            .collect();
        set.into_iter().collect()
    }

    fn views(&self, u: &str, after: Seq, from: i64, to: i64) -> u64 {
        self.matching(after, from, to)
            .filter(|(_, x, _, _)| x == u)
            .count() as u64
    }

    fn cell_counts(&self, u: &str, after: Seq, from: i64, to: i64) -> Vec<(i64, u64)> {
        let mut m = std::collections::BTreeMap::new();
        for (_, _, h, _) in self.matching(after, from, to).filter(|(_, x, _, _)| x == u) {
            *m.entry(*h).or_insert(0u64) += 1;
        }
        m.into_iter().collect()
    }

    fn range_totals(
        &self,
        after: Seq,
        from: i64,
        to: i64,
        host: Option<&str>,
    ) -> HashMap<String, u64> {
        let mut m = HashMap::new();
        for (_, u, _, _) in self.matching(after, from, to) {
            if host.is_none_or(|h| tally_core::url::host_of(u) == Some(h)) {
                *m.entry(u.clone()).or_insert(0u64) += 1;
            }
        }
        m
    }
}

async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn caught_up(speed: &SpeedLayer, master: &Master) {
    wait_until("the speed layer caught up", Duration::from_secs(30), || {
        speed.available() && speed.applied_seq() == master.acked_seq()
    })
    .await;
}

/// Caught up, and Redis (written behind the mirror) holds everything too.
async fn redis_caught_up(speed: &SpeedLayer, master: &Master) {
    caught_up(speed, master).await;
    wait_until("redis caught up", Duration::from_secs(30), || {
        speed.redis_applied_seq() == master.acked_seq()
    })
    .await;
}

/// Precision of the visitor registers in these tests: a sparse sketch holds 4 hashes, so the
/// model's URLs have busy days.
const PRECISION: u8 = 4;

/// How many [`assert_same_sketch`] checks had registers (busy days), so a test can assert that
/// its data took that path.
static BUSY_CHECKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// `got` describes the same sketch as the distinct hashes `want`: exactly those hashes while
/// they fit a sparse sketch, the same registers past it.
fn assert_same_sketch(got: tally_speed::SpeedVisitors, want: &[u32], what: &str) {
    use tally_core::sketch::{set_register, sparse_limit};
    let regs_of = |hashes: &[u32], start: Option<Box<[u8]>>| {
        let mut r = start.unwrap_or_else(|| vec![0u8; 1 << PRECISION].into_boxed_slice());
        for h in hashes {
            set_register(&mut r, PRECISION, *h);
        }
        r
    };
    if want.len() <= sparse_limit(PRECISION) {
        assert_eq!(got.registers, None, "{what}: no busy day");
        assert_eq!(got.hashes, want, "{what}");
    } else {
        if got.registers.is_some() {
            BUSY_CHECKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        assert_eq!(
            regs_of(&got.hashes, got.registers),
            regs_of(want, None),
            "{what}: registers"
        );
    }
}

/// The first cell of day `day` (saturating: `i64::MIN` and `i64::MAX` stay unbounded).
fn cells(day: i64) -> i64 {
    day.saturating_mul(tally_core::DAY_MS / tally_core::CELL_MS)
}

/// Compares every read of the speed layer with the model, for batch cutoff `after`.
fn assert_exact(speed: &SpeedLayer, model: &Model, after: Seq, rng: &mut Rng) {
    let d0 = tally_core::day_of(BASE_TS);
    for (from, to) in [(i64::MIN, i64::MAX), (d0, d0 + 1), (d0 + 1, d0 + 2)] {
        for i in 0..26 {
            let u = url(i);
            let want = model.visitors(&u, after, from, to);
            // At another precision than the mirror keeps registers for: every hash.
            let exact = speed.visitors(&u, after, cells(from), cells(to), PRECISION + 1);
            assert_eq!(
                exact.map(|v| v.map(|v| (v.hashes, v.registers))),
                Ok(Some((want.clone(), None))),
                "visitors of {u} after {after} on days [{from}, {to})"
            );
            // At the mirror's precision: busy days as registers, the same sketch.
            let got = speed
                .visitors(&u, after, cells(from), cells(to), PRECISION)
                .unwrap()
                .unwrap();
            assert_same_sketch(got, &want, &format!("{u} after {after} on [{from}, {to})"));
        }
    }
    let h0 = cell_of(BASE_TS);
    let cells = HOURS * CELLS_PER_HOUR;
    let ranges = [
        (i64::MIN, i64::MAX),
        (h0, h0 + cells),
        (h0 + 2, h0 + 3),
        {
            let a = h0 + rng.below(cells as u64) as i64;
            (a, a + 1 + rng.below(20) as i64)
        },
        (h0 + 5, h0 + 5),
    ];
    for (from, to) in ranges {
        for i in 0..26 {
            let u = url(i);
            assert_eq!(
                speed.views(&u, after, from, to),
                Ok(Some(model.views(&u, after, from, to))),
                "views of {u} after {after} in [{from}, {to})"
            );
            assert_eq!(
                speed.cell_counts(&u, after, from, to),
                Ok(Some(model.cell_counts(&u, after, from, to))),
                "cell counts of {u} after {after} in [{from}, {to})"
            );
        }
        for host in [None, Some("h1.example.com"), Some("nope.example.com")] {
            assert_eq!(
                speed.range_totals(after, from, to, host),
                Ok(Some(model.range_totals(after, from, to, host))),
                "range totals after {after} in [{from}, {to}) host {host:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_random_ingest_matches_views_and_range_totals() {
    let redis = TestRedis::start();
    let (_dir, master) = open_master();
    let speed = SpeedLayer::start(speed_config(&redis), master.clone()).await;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut model = Model::default();
    for round in 0..30 {
        let n = 1 + rng.below(80) as usize;
        model.ingest(&master, random_events(&mut rng, n)).await;
        if round % 7 == 0 {
            caught_up(&speed, &master).await;
            assert_exact(&speed, &model, Seq(0), &mut rng);
        }
    }
    caught_up(&speed, &master).await;
    assert_exact(&speed, &model, Seq(0), &mut rng);
    assert!(
        BUSY_CHECKS.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "some URL-day is busy enough for registers"
    );
    assert!(speed.redis_up());
    let epochs = speed.epochs();
    assert_eq!(epochs.len(), 1);
    assert_eq!(epochs[0].start, Seq(1));
    assert_eq!(epochs[0].applied, master.acked_seq());
    assert_eq!(epochs[0].urls, 25);

    // Redis holds exactly what the mirror holds.
    redis_caught_up(&speed, &master).await;
    let mut c = conn(&redis).await;
    assert_redis_epoch_1_exact(&mut c, &master, &model).await;
    speed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_epoch_splits_reads_exactly_and_gc_deletes_only_unneeded_epochs() {
    let redis = TestRedis::start();
    let (_dir, master) = open_master();
    let speed = SpeedLayer::start(speed_config(&redis), master.clone()).await;
    let mut rng = Rng(42);
    let mut model = Model::default();
    model.ingest(&master, random_events(&mut rng, 150)).await;
    let c1 = master.cut_epoch().await.unwrap();
    assert_eq!(c1, master.acked_seq());
    model.ingest(&master, random_events(&mut rng, 120)).await;
    caught_up(&speed, &master).await;
    for after in [Seq(0), c1] {
        assert_exact(&speed, &model, after, &mut rng);
    }
    let starts: Vec<Seq> = speed.epochs().iter().map(|e| e.start).collect();
    assert_eq!(starts, vec![Seq(1), c1.next()]);
    assert_eq!(speed.epochs()[0].applied, c1);

    // A second run cuts at c2; its view is published with c1's view as the fallback.
    let c2 = master.cut_epoch().await.unwrap();
    model.ingest(&master, random_events(&mut rng, 90)).await;
    caught_up(&speed, &master).await;
    for after in [Seq(0), c1, c2] {
        assert_exact(&speed, &model, after, &mut rng);
    }
    // The views of c2 and c1 may serve: epoch 1 is needed by neither. A discard within the
    // grace period lowers what is kept back to everything, and the collection scheduled by the
    // rise uses the value current when it runs: nothing is deleted.
    speed.retain_after(c1);
    speed.retain_after(Seq(0));
    wait_until("a collection ran", Duration::from_secs(10), || {
        speed.stats().collections >= 1
    })
    .await;
    assert_eq!(speed.epochs().len(), 3);
    assert_exact(&speed, &model, Seq(0), &mut rng);
    // Kept at c1 this time: epoch 1 (seq <= c1) goes after the grace period.
    speed.retain_after(c1);
    wait_until("epoch 1 is collected", Duration::from_secs(10), || {
        speed.epochs().first().map(|e| e.start) == Some(c1.next())
    })
    .await;
    assert_eq!(master.epochs(), vec![c1.next(), c2.next()]);
    // Redis follows the mirror: the epoch's keys go with the next Redis task.
    let mut c = conn(&redis).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let keys = redis_keys(&mut c, "tally:e:1:*").await;
        if keys.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "epoch 1 keys left: {keys:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let listed: Vec<u64> = redis::cmd("SMEMBERS")
        .arg("tally:epochs")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(!listed.contains(&1));
    // Both views still read exactly; a view older than c1 is refused, never answered short.
    model.ingest(&master, random_events(&mut rng, 40)).await;
    caught_up(&speed, &master).await;
    for after in [c1, c2] {
        assert_exact(&speed, &model, after, &mut rng);
    }
    assert!(speed.covers(c1) && !speed.covers(Seq(0)));
    let refused = Err(NotCovered {
        cutoff: Seq(0),
        floor: c1.next(),
    });
    assert_eq!(speed.views(&url(1), Seq(0), i64::MIN, i64::MAX), refused);
    assert!(speed
        .visitors(&url(1), Seq(0), i64::MIN, i64::MAX, PRECISION)
        .is_err());
    assert!(speed
        .range_totals(Seq(0), i64::MIN, i64::MAX, None)
        .is_err());
    // After a restart the floor still holds (the master dataset forgot epoch 1 durably).
    speed.shutdown().await;
    drop(speed);
    let speed = SpeedLayer::start(speed_config(&redis), master.clone()).await;
    caught_up(&speed, &master).await;
    assert!(speed.covers(c1) && !speed.covers(Seq(0)));
    assert_exact(&speed, &model, c1, &mut rng);
    speed.shutdown().await;
}

/// Two URLs whose 64-bit FNV-1a hashes (the key names of the previous layout) collide keep
/// their own counts, also after the mirror is reloaded from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_with_colliding_hashes_keep_their_own_counts() {
    let redis = TestRedis::start();
    let (_dir, master) = open_master();
    let mut model = Model::default();
    let speed = SpeedLayer::start(speed_config(&redis), master.clone()).await;
    let view = |url: &str, n: usize| -> Vec<Event> {
        (0..n)
            .map(|i| Event {
                ts: BASE_TS + i as i64,
                url: url.to_string(),
                visitor: Some(format!("{url}-{i}")),
                referrer: None,
                id: None,
                received_at: BASE_TS,
            })
            .collect()
    };
    let (a, b) = (
        "http://c.io/dd039ca600ea1926",
        "http://c.io/3b80930a4b2ce040",
    );
    model.ingest(&master, view(a, 5)).await;
    model.ingest(&master, view(b, 3)).await;
    redis_caught_up(&speed, &master).await;
    speed.shutdown().await;
    drop(speed);
    let speed = SpeedLayer::start(speed_config(&redis), master.clone()).await;
    caught_up(&speed, &master).await;
    assert_eq!(speed.stats().loads, 1);
    assert_eq!(speed.views(a, Seq(0), i64::MIN, i64::MAX), Ok(Some(5)));
    assert_eq!(speed.views(b, Seq(0), i64::MIN, i64::MAX), Ok(Some(3)));
    let day = tally_core::day_of(BASE_TS);
    assert_eq!(
        speed
            .visitors(a, Seq(0), cells(day), cells(day + 1), PRECISION + 1)
            .map(|v| v.map(|v| v.hashes.len())),
        Ok(Some(5))
    );
    let mut c = conn(&redis).await;
    assert_redis_epoch_1_exact(&mut c, &master, &model).await;
    speed.shutdown().await;
}

/// Redis keeps the speed state of another master dataset (the `data_dir` was replaced while
/// Redis was down) or of the previous key layout: it is rebuilt from this dataset, never added
/// to its counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_of_another_dataset_or_layout_is_rebuilt_not_merged() {
    let redis = TestRedis::start();
    let mut rng = Rng(3);
    let (_old_dir, old) = open_master();
    let speed = SpeedLayer::start(speed_config(&redis), old.clone()).await;
    let mut old_model = Model::default();
    old_model.ingest(&old, random_events(&mut rng, 100)).await;
    caught_up(&speed, &old).await;
    speed.shutdown().await;
    drop(speed);

    // A new, empty data_dir with its own events: seqs 1..=50 again, other URLs' counts.
    let (_new_dir, new) = open_master();
    assert_ne!(new.dataset_id(), old.dataset_id());
    let mut model = Model::default();
    model.ingest(&new, random_events(&mut rng, 50)).await;
    let speed = SpeedLayer::start(speed_config(&redis), new.clone()).await;
    caught_up(&speed, &new).await;
    assert_exact(&speed, &model, Seq(0), &mut rng);
    assert_eq!(speed.stats().rebuilds, 1);
    assert_eq!(total_views(&speed), Some(50));
    redis_caught_up(&speed, &new).await;
    let mut c = conn(&redis).await;
    assert_redis_epoch_1_exact(&mut c, &new, &model).await;
    speed.shutdown().await;
    drop(speed);

    // A marker of the previous layout (a bare incarnation id) with its keys.
    let _: () = redis::pipe()
        .cmd("SET")
        .arg("tally:instance")
        .arg("18c1f0d2a-4d2-0")
        .cmd("SET")
        .arg("tally:e:1:applied")
        .arg(50)
        .cmd("ZADD")
        .arg("tally:e:1:top")
        .arg(7)
        .arg("http://old.example/")
        .cmd("SADD")
        .arg("tally:e:1:vkeys")
        .arg("tally:e:1:v:42504961764fec74:20000")
        .cmd("SADD")
        .arg("tally:e:1:v:42504961764fec74:20000")
        .arg(1)
        .query_async(&mut c)
        .await
        .unwrap();
    let speed = SpeedLayer::start(speed_config(&redis), new.clone()).await;
    caught_up(&speed, &new).await;
    assert_eq!(speed.stats().rebuilds, 1);
    assert_exact(&speed, &model, Seq(0), &mut rng);
    let left = redis_keys(&mut c, "tally:e:1:*").await;
    assert!(
        left.iter()
            .all(|k| !k.contains(":top") && !k.contains("vkeys") && !k.contains("4250")),
        "keys of the old layout left: {left:?}"
    );
    speed.shutdown().await;
    drop(speed);

    // State of this dataset in the layout before buckets (`v6`: a cell hash and a visitor set
    // per URL id, named `h:{id}` and `v:{id}`): rebuilt, and its per-id keys deleted.
    let mut p = redis::pipe();
    p.cmd("SET")
        .arg("tally:instance")
        .arg(format!("v6/{}/old", new.dataset_id()));
    for id in 0..5 {
        p.cmd("HSET")
            .arg("tally:e:1:urls")
            .arg(id)
            .arg(format!("http://old.example/{id}"));
        p.cmd("HINCRBY")
            .arg(format!("tally:e:1:h:{id}"))
            .arg(0)
            .arg(1000);
        p.cmd("SADD").arg(format!("tally:e:1:v:{id}")).arg(5);
    }
    let _: () = p.query_async(&mut c).await.unwrap();
    let speed = SpeedLayer::start(speed_config(&redis), new.clone()).await;
    caught_up(&speed, &new).await;
    assert_eq!(speed.stats().rebuilds, 1);
    assert_exact(&speed, &model, Seq(0), &mut rng);
    redis_caught_up(&speed, &new).await;
    assert_redis_epoch_1_exact(&mut c, &new, &model).await;
    let mut left = redis_keys(&mut c, "tally:e:1:h:*").await;
    left.extend(redis_keys(&mut c, "tally:e:1:v:*").await);
    left.extend(redis_keys(&mut c, "tally:e:1:urls").await);
    assert!(
        left.is_empty(),
        "per-id keys of the v6 layout left: {left:?}"
    );
    speed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_restarted_empty_rebuilds_exactly() {
    let mut redis = TestRedis::start();
    let (_dir, master) = open_master();
    let speed = SpeedLayer::start(speed_config(&redis), master.clone()).await;
    let mut rng = Rng(7);
    let mut model = Model::default();
    model.ingest(&master, random_events(&mut rng, 100)).await;
    let c1 = master.cut_epoch().await.unwrap();
    model.ingest(&master, random_events(&mut rng, 100)).await;
    caught_up(&speed, &master).await;

    redis.kill();
    // Ingestion goes on; the applier notices and reads answer None.
    for _ in 0..10 {
        model.ingest(&master, random_events(&mut rng, 60)).await;
    }
    wait_until(
        "the speed layer is unavailable",
        Duration::from_secs(10),
        || !speed.available(),
    )
    .await;
    assert!(!speed.redis_up());
    assert_eq!(speed.views(&url(1), Seq(0), i64::MIN, i64::MAX), Ok(None));
    assert_eq!(
        speed.range_totals(Seq(0), i64::MIN, i64::MAX, None),
        Ok(None)
    );
    // The mirror keeps up (reads are refused by contract while Redis is down); Redis cannot.
    assert!(speed.redis_applied_seq() < master.acked_seq());

    redis.restart_empty();
    caught_up(&speed, &master).await;
    for after in [Seq(0), c1] {
        assert_exact(&speed, &model, after, &mut rng);
    }
    let stats = speed.stats();
    // One rebuild at the start (a fresh Redis holds no state); after the restart Redis is
    // rewritten from the mirror.
    assert_eq!(stats.rebuilds, 1, "{stats:?}");
    assert!(stats.resyncs >= 1, "{stats:?}");
    assert!(stats.errors > 0, "{stats:?}");
    redis_caught_up(&speed, &master).await;
    let mut c = conn(&redis).await;
    let applied: Option<u64> = get(&mut c, format!("tally:e:{}:applied", c1.next())).await;
    assert_eq!(applied.map(Seq), Some(master.acked_seq()));

    // Redis restarts empty again while the applier is idle: the heartbeat notices the missing
    // instance marker and rewrites it without any new event arriving.
    let resyncs = speed.stats().resyncs;
    redis.restart_empty();
    wait_until(
        "the idle applier rewrote redis",
        Duration::from_secs(10),
        || speed.stats().resyncs > resyncs,
    )
    .await;
    redis_caught_up(&speed, &master).await;
    let mut c = conn(&redis).await;
    let applied: Option<u64> = get(&mut c, format!("tally:e:{}:applied", c1.next())).await;
    assert_eq!(applied.map(Seq), Some(master.acked_seq()));
    caught_up(&speed, &master).await;
    for after in [Seq(0), c1] {
        assert_exact(&speed, &model, after, &mut rng);
    }
    speed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_then_up_catches_up() {
    let mut redis = TestRedis::start();
    redis.kill();
    let (_dir, master) = open_master();
    let speed = SpeedLayer::start(speed_config(&redis), master.clone()).await;
    let mut rng = Rng(11);
    let mut model = Model::default();
    model.ingest(&master, random_events(&mut rng, 300)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!speed.available());
    assert!(!speed.redis_up());
    redis.restart_empty();
    caught_up(&speed, &master).await;
    assert_exact(&speed, &model, Seq(0), &mut rng);
    speed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_speed_layer_resumes_without_double_apply() {
    let redis = TestRedis::start();
    let (_dir, master) = open_master();
    let mut rng = Rng(5);
    let mut model = Model::default();
    let speed = SpeedLayer::start(speed_config(&redis), master.clone()).await;
    model.ingest(&master, random_events(&mut rng, 200)).await;
    let c1 = master.cut_epoch().await.unwrap();
    model.ingest(&master, random_events(&mut rng, 50)).await;
    redis_caught_up(&speed, &master).await;
    let mut c = conn(&redis).await;
    let instance: String = get(&mut c, "tally:instance").await;
    speed.shutdown().await;
    drop(speed);

    // Events acknowledged while no applier runs.
    model.ingest(&master, random_events(&mut rng, 70)).await;
    let speed = SpeedLayer::start(speed_config(&redis), master.clone()).await;
    caught_up(&speed, &master).await;
    for after in [Seq(0), c1] {
        assert_exact(&speed, &model, after, &mut rng);
    }
    // It resumed from Redis (same instance), it did not rebuild.
    let stats = speed.stats();
    assert_eq!((stats.loads, stats.rebuilds), (1, 0), "{stats:?}");
    assert_eq!(stats.events_applied, 70);
    let again: String = get(&mut c, "tally:instance").await;
    assert_eq!(again, instance);

    // Dropping the last handle stops the applier too; a third start is still exact.
    drop(speed);
    model.ingest(&master, random_events(&mut rng, 30)).await;
    let speed = SpeedLayer::start(speed_config(&redis), master.clone()).await;
    caught_up(&speed, &master).await;
    assert_exact(&speed, &model, c1, &mut rng);
    speed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_state_behind_the_mirror_is_reloaded_not_double_counted() {
    let redis = TestRedis::start();
    let (_dir, master) = open_master();
    let speed = SpeedLayer::start(speed_config(&redis), master.clone()).await;
    let mut rng = Rng(99);
    let mut model = Model::default();
    model.ingest(&master, random_events(&mut rng, 50)).await;
    redis_caught_up(&speed, &master).await;
    // Simulate a Redis restored from an older snapshot: the state of epoch 1 is gone but the
    // instance marker is still there.
    let mut c = conn(&redis).await;
    let keys = redis_keys(&mut c, "tally:e:1:*").await;
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut c)
        .await
        .unwrap();
    model.ingest(&master, random_events(&mut rng, 50)).await;
    // The next write is refused (applied seq mismatch); Redis is rewritten from the mirror:
    // afterwards Redis and the mirror agree and are exact, nothing counted twice.
    redis_caught_up(&speed, &master).await;
    assert_redis_epoch_1_exact(&mut c, &master, &model).await;
    assert_exact(&speed, &model, Seq(0), &mut rng);
    let stats = speed.stats();
    // The initial rebuild (fresh Redis), then a rewrite, never a second rebuild.
    assert!(stats.resyncs >= 1 && stats.rebuilds == 1, "{stats:?}");
    speed.shutdown().await;
}

/// Total speed views over every URL and cell, for batch cutoff 0.
fn total_views(speed: &SpeedLayer) -> Option<u64> {
    speed
        .range_totals(Seq(0), i64::MIN, i64::MAX, None)
        .expect("every epoch is held")
        .map(|m| m.values().sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_at_random_moments_mid_apply_never_double_counts() {
    let redis = TestRedis::start();
    let (_dir, master) = open_master();
    let mut rng = Rng(1234);
    let mut model = Model::default();
    let mut c1 = Seq(0);
    for i in 0..12u64 {
        let speed = SpeedLayer::start(speed_config(&redis), master.clone()).await;
        for _ in 0..1 + rng.below(4) {
            model
                .ingest(&master, {
                    let n = 1 + rng.below(150) as usize;
                    random_events(&mut rng, n)
                })
                .await;
        }
        if i == 5 {
            c1 = master.cut_epoch().await.unwrap();
        }
        // Stop at an arbitrary point: possibly in the middle of an apply, or before the new
        // applier even loaded. Dropping the last handle cancels the applier without waiting, so
        // the next one may briefly overlap with it: the compare-and-set keeps that exact too.
        tokio::time::sleep(Duration::from_micros(rng.below(20_000))).await;
        drop(speed);
    }
    let speed = SpeedLayer::start(speed_config(&redis), master.clone()).await;
    caught_up(&speed, &master).await;
    for after in [Seq(0), c1] {
        assert_exact(&speed, &model, after, &mut rng);
    }
    assert_eq!(total_views(&speed), Some(master.acked_seq().0));
    speed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_never_go_down_nor_exceed_what_was_acknowledged() {
    let redis = TestRedis::start();
    let (_dir, master) = open_master();
    let speed = SpeedLayer::start(speed_config(&redis), master.clone()).await;
    caught_up(&speed, &master).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (speed, master, stop) = (speed.clone(), master.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut last = 0u64;
            let mut probes = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let before = speed.applied_seq().0;
                let Some(total) = total_views(&speed) else {
                    continue;
                };
                let acked = master.acked_seq().0;
                // Seqs are 1, 2, 3, ...: the events applied are exactly seq 1..=applied.
                assert!(total >= before, "total {total} < applied {before}");
                assert!(total <= acked, "total {total} > acknowledged {acked}");
                assert!(total >= last, "total went down from {last} to {total}");
                last = total;
                probes += 1;
            }
            probes
        })
    };
    let mut rng = Rng(77);
    for i in 0..40 {
        let n = 1 + rng.below(100) as usize;
        let batch = random_events(&mut rng, n);
        master.append(batch).await.unwrap();
        if i % 10 == 9 {
            master.cut_epoch().await.unwrap();
        }
    }
    caught_up(&speed, &master).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let probes = prober.join().unwrap();
    assert!(probes > 0);
    assert_eq!(total_views(&speed), Some(master.acked_seq().0));
    assert_eq!(speed.epochs().len(), 5);
    speed.shutdown().await;
}

/// The all-time rankings answer "until the next full hour": events ahead of the clock (up to
/// `ingest.max_future`) are left out — also after a restart loaded the state from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_time_rankings_leave_out_events_ahead_of_the_clock_also_after_a_reload() {
    let redis = TestRedis::start();
    let (_dir, master) = open_master();
    let now = tally_core::now_ms();
    let next_hour = (hour_of(now) + 1) * CELLS_PER_HOUR;
    let at = |url: &str, ts: i64, n: usize| -> Vec<Event> {
        (0..n)
            .map(|_| Event {
                ts,
                url: url.to_string(),
                visitor: None,
                referrer: None,
                id: None,
                received_at: now,
            })
            .collect()
    };
    let mut events = at("http://a.test/x", now, 3);
    events.extend(at("http://a.test/y", now, 2));
    events.extend(at("http://a.test/y", next_hour * CELL_MS + 1, 4));
    master.append(events).await.unwrap();
    let want = vec![
        ("http://a.test/x".to_string(), 3),
        ("http://a.test/y".to_string(), 2),
    ];
    for restart in [false, true] {
        let speed = SpeedLayer::start(speed_config(&redis), master.clone()).await;
        caught_up(&speed, &master).await;
        let top = speed.top_all_time("", Seq(0), 10, None, next_hour);
        assert_eq!(
            top,
            Ok(Some(Some(want.clone()))),
            "after a restart: {restart}"
        );
        let host = speed.top_all_time("", Seq(0), 10, Some("a.test"), next_hour);
        assert_eq!(
            host,
            Ok(Some(Some(want.clone()))),
            "after a restart: {restart}"
        );
        // Once that hour is past, they count.
        let later = speed.top_all_time("", Seq(0), 1, None, next_hour + 1);
        assert_eq!(
            later,
            Ok(Some(Some(vec![("http://a.test/y".to_string(), 6)])))
        );
        speed.shutdown().await;
    }
}
