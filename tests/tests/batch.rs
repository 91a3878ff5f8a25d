//! The batch layer end to end against the real binary — exact views after batch runs,
//! versioned views and `CURRENT`, corruption never served, discard, the schedule, failing runs,
//! and the `tally batch` CLI (API.md: Queries, Operations, Files, Command line; DESIGN.md
//! invariants 4–7).
//!
//! Every assertion compares the server against a reference model of the events it acknowledged.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::SeedableRng;
use serde_json::{json, Value};
use tally_e2e::{
    assert_exact, assert_top, assert_views, batch_run, flip_bytes, forget_prefix, get_views,
    ingest_exact, ingest_random, largest_file, make_urls, master_files, now_ms, poll_until,
    read_master, seed, tally_bin, views_query, Model, Range, ServerOpts, TestServer, DAY_MS,
    DEADLINE, HOUR_MS,
};

// ---------------------------------------------------------------------------------------------
// Sending events (the reference model and its helpers are in `tally_e2e::model`)
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Batch helpers
// ---------------------------------------------------------------------------------------------

fn batch_status(server: &TestServer) -> Value {
    let (code, body) = server.get("/v1/admin/batch");
    assert_eq!(code, 200, "GET /v1/admin/batch: {body}");
    body
}

fn current_version(server: &TestServer) -> Option<String> {
    batch_status(server)["current"]["version"]
        .as_str()
        .map(str::to_string)
}

fn history(server: &TestServer) -> Vec<Value> {
    batch_status(server)["history"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn views_root(data_dir: &Path) -> PathBuf {
    data_dir.join("views").join("batch")
}

fn current_file(data_dir: &Path) -> String {
    fs::read_to_string(views_root(data_dir).join("CURRENT"))
        .expect("read views/batch/CURRENT")
        .trim()
        .to_string()
}

/// Version directories under `views/batch/` (temporary ones, starting with `.`, excluded).
fn version_dirs(data_dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(views_root(data_dir))
        .expect("read views/batch")
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !n.starts_with('.') && !n.contains("tmp"))
        .collect();
    out.sort();
    out
}

/// Output of one `tally batch …` invocation.
struct CliOut {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `tally batch <sub>` on `data_dir` (environment configuration only, no `--config`),
/// with a deadline.
fn tally_batch(sub: &str, data_dir: &Path, redis_url: &str) -> CliOut {
    tally_cli(&format!("batch {sub}"), data_dir, redis_url)
}

/// `tally <args>` (split on white space) on `data_dir`.
fn tally_cli(sub: &str, data_dir: &Path, redis_url: &str) -> CliOut {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Command::new(tally_bin())
        .args(sub.split_whitespace())
        .env("TALLY_STORAGE_DATA_DIR", data_dir)
        // Never the machine's Redis: the test's own (the CLI may not need it at all).
        .env("TALLY_REDIS_URL", redis_url)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn tally batch");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tally batch {sub} did not finish within {DEADLINE:?}: {}{}",
                fs::read_to_string(&out).unwrap_or_default(),
                fs::read_to_string(&err).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    CliOut {
        code: status.code().unwrap_or(-1),
        stdout: fs::read_to_string(&out).unwrap_or_default(),
        stderr: fs::read_to_string(&err).unwrap_or_default(),
    }
}

fn redis_url(server: &mut TestServer) -> String {
    server.redis().expect("the server owns its redis").url()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Random URLs on several hosts, events over 30 days: after a batch run every views total,
/// hour-aligned range, day series and top-N (with/without host, with a range) equals the model;
/// the batch/speed split follows the new events.
#[test]
fn exact_answers_after_a_batch_run() {
    let mut rng = StdRng::seed_from_u64(seed());
    let server = TestServer::start(ServerOpts::default());
    let urls = make_urls(60, 4);
    let mut model = Model::default();

    // Before any batch view: `batch` is null, everything comes from the speed layer.
    ingest_random(&server, &mut model, &mut rng, &urls, 1500);
    server.wait_caught_up();
    let body = assert_views(&server, &model, &urls[0], Range::all());
    assert!(body["batch"].is_null(), "no batch view yet: {body}");

    ingest_random(&server, &mut model, &mut rng, &urls, 1500);
    let run = batch_run(&server);
    let acked = server.acked_seq();
    assert_eq!(
        run["cutoff_seq"].as_u64(),
        Some(acked),
        "the run covers everything acked: {run}"
    );
    assert_eq!(
        run["events"].as_u64(),
        Some(model.events.len() as u64),
        "{run}"
    );
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);

    // Right after the run, nothing is in the speed layer: speed_views == 0 everywhere.
    for url in &urls {
        let body = get_views(&server, url, Range::all(), "total");
        assert_eq!(body["speed_views"].as_u64(), Some(0), "{url}: {body}");
        assert_eq!(
            body["batch_views"].as_u64(),
            Some(model.views(url, Range::all())),
            "{body}"
        );
        assert_eq!(body["batch"]["version"], run["version"], "{body}");
        assert_eq!(body["batch"]["cutoff_seq"], run["cutoff_seq"], "{body}");
        assert_eq!(body["speed_available"], json!(true), "{body}");
    }

    // New events (old and recent ts) on a few URLs: speed_views counts exactly the new ones.
    let before = model.clone();
    let now = now_ms();
    let touched: Vec<String> = urls[..10].to_vec();
    let mut new_events = Vec::new();
    for (i, url) in touched.iter().enumerate() {
        for k in 0..=i {
            new_events.push((url.clone(), now - (k as i64) * 37 * HOUR_MS % (25 * DAY_MS)));
        }
    }
    ingest_exact(&server, &mut model, &new_events);
    server.wait_caught_up();
    for url in &urls {
        let body = get_views(&server, url, Range::all(), "total");
        let old = before.views(url, Range::all());
        let total = model.views(url, Range::all());
        assert_eq!(body["batch_views"].as_u64(), Some(old), "{url}: {body}");
        assert_eq!(
            body["speed_views"].as_u64(),
            Some(total - old),
            "{url}: {body}"
        );
        assert_eq!(body["views"].as_u64(), Some(total), "{url}: {body}");
    }
    assert_exact(&server, &model, &mut rng, &urls);

    // And after another run the new events move into the batch view.
    batch_run(&server);
    server.wait_caught_up();
    for url in &touched {
        let body = get_views(&server, url, Range::all(), "total");
        assert_eq!(body["speed_views"].as_u64(), Some(0), "{body}");
        assert_eq!(
            body["views"].as_u64(),
            Some(model.views(url, Range::all())),
            "{body}"
        );
    }
    assert_exact(&server, &model, &mut rng, &urls);
}

/// Each run publishes a new version and moves `CURRENT`; with `keep_versions = 2` only the two
/// newest good versions stay on disk; `tally batch list` shows them.
#[test]
fn runs_publish_new_versions_and_old_ones_go() {
    let mut rng = StdRng::seed_from_u64(seed());
    let mut server = TestServer::start(ServerOpts::default().env("TALLY_BATCH_KEEP_VERSIONS", 2));
    let urls = make_urls(20, 2);
    let mut model = Model::default();
    let mut versions: Vec<String> = Vec::new();
    for i in 0..4 {
        ingest_random(&server, &mut model, &mut rng, &urls, 200);
        let run = batch_run(&server);
        let v = run["version"].as_str().unwrap().to_string();
        // Incremental (API.md, "Batch runs are incremental"): after the first run, the files an
        // earlier run read come from their cached partials; only new files are read.
        let (reused, computed) = (run["files_reused"].as_u64(), run["files_computed"].as_u64());
        assert_eq!(
            reused.unwrap() + computed.unwrap(),
            run["files"].as_u64().unwrap(),
            "{run}"
        );
        if i == 0 {
            assert_eq!(reused, Some(0), "{run}");
        } else {
            assert!(reused.unwrap() >= i, "run {i} reused earlier files: {run}");
            assert!(computed.unwrap() >= 1, "run {i} read its new file: {run}");
        }
        assert!(
            !versions.contains(&v),
            "run reused version {v}: {versions:?}"
        );
        assert_eq!(
            current_file(server.data_dir()),
            v,
            "CURRENT follows the run"
        );
        assert_eq!(current_version(&server).as_deref(), Some(v.as_str()));
        versions.push(v);
        server.wait_caught_up();
        let body = assert_views(&server, &model, &urls[0], Range::all());
        assert_eq!(
            body["batch"]["version"].as_str(),
            Some(versions.last().unwrap().as_str())
        );
    }
    let data_dir = server.data_dir().to_path_buf();
    let want = versions[2..].to_vec();
    poll_until(
        &format!("only the 2 newest versions on disk ({want:?})"),
        DEADLINE,
        || (version_dirs(&data_dir) == want).then_some(()),
    );
    let ok_runs = history(&server)
        .iter()
        .filter(|h| h["status"] == "ok")
        .count();
    assert_eq!(ok_runs, 4, "history: {:?}", history(&server));
    assert!(
        history(&server)[0]["files_reused"].as_u64() >= Some(3),
        "history: {:?}",
        history(&server)
    );
    assert!(server.metric("tally_batch_files_reused_total") >= 6.0);

    let url = redis_url(&mut server);
    let list = tally_batch("list", &data_dir, &url);
    assert_eq!(
        list.code, 0,
        "tally batch list: {}{}",
        list.stdout, list.stderr
    );
    for v in &want {
        assert!(list.stdout.contains(v), "list lacks {v}: {}", list.stdout);
    }
    assert!(
        !list.stdout.contains(&versions[0]),
        "deleted version listed: {}",
        list.stdout
    );
    assert_exact(&server, &model, &mut rng, &urls);

    // A full run reads every file and answers the same.
    let (code, full) = server.post("/v1/admin/batch?wait=true&full=true");
    assert_eq!(code, 200, "{full}");
    assert_eq!(full["files_reused"], 0, "{full}");
    assert_eq!(full["files_computed"], full["files"], "{full}");
    assert_eq!(full["full"], true, "{full}");
    let (code, body) = server.post("/v1/admin/batch?full=maybe");
    assert_eq!(code, 400, "{body}");
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);
}

/// Compaction (API.md, "Batch runs are incremental"): small master files are merged in the
/// background while events arrive and batch runs go on; every answer stays exact, the master
/// dataset holds each event once, and a `kill -9` restart keeps it so.
#[test]
fn compaction_merges_small_files_and_every_answer_stays_exact() {
    let mut rng = StdRng::seed_from_u64(seed());
    let mut server = TestServer::start(
        ServerOpts::default()
            .env("TALLY_STORAGE_COMPACT_INTERVAL", "200ms")
            .env("TALLY_STORAGE_COMPACT_SMALL_BYTES", 1 << 30)
            .env("TALLY_STORAGE_COMPACT_TARGET_BYTES", 1u64 << 31)
            .env("TALLY_STORAGE_COMPACT_MIN_FILES", 3),
    );
    let urls = make_urls(20, 2);
    let mut model = Model::default();
    for round in 0..8 {
        ingest_random(&server, &mut model, &mut rng, &urls, 150);
        server.flush();
        if round % 3 == 2 {
            batch_run(&server);
        }
    }
    // Compaction leaves fewer files than were sealed (one per flush or run).
    let data_dir = server.data_dir().to_path_buf();
    poll_until("small master files merged", DEADLINE, || {
        (server.metric("tally_master_compacted_files_total") >= 3.0
            && master_files(&data_dir).len() < 5)
            .then_some(())
    });
    server.wait_caught_up();
    let run = batch_run(&server);
    assert_eq!(
        run["events"].as_u64(),
        Some(model.events.len() as u64),
        "{run}"
    );
    assert_exact(&server, &model, &mut rng, &urls);

    // Each acknowledged event is in exactly one file of the glob once compaction is done.
    // (The glob as DuckDB reads it.)
    let mut seqs: Vec<u64> = read_master(&data_dir).iter().map(|r| r.seq).collect();
    seqs.sort_unstable();
    let n = seqs.len();
    seqs.dedup();
    assert_eq!(seqs.len(), n, "an event in two master files");
    assert_eq!(n, model.events.len());

    ingest_random(&server, &mut model, &mut rng, &urls, 100);
    server.kill9();
    server.restart();
    server.wait_caught_up();
    batch_run(&server);
    assert_exact(&server, &model, &mut rng, &urls);
}

/// `kill -9` while a batch run reads files and writes partials (API.md, "Batch runs are
/// incremental"): after a restart every answer is exact, the next incremental run publishes the
/// view a full run publishes, and no temporary partial is left behind.
#[test]
fn kill_9_during_a_run_that_writes_partials_loses_nothing() {
    let mut rng = StdRng::seed_from_u64(seed());
    let mut server = TestServer::start(ServerOpts::default());
    let data_dir = server.data_dir().to_path_buf();
    let urls = make_urls(40, 3);
    let mut model = Model::default();
    for _ in 0..4 {
        ingest_random(&server, &mut model, &mut rng, &urls, 400);
        server.flush();
    }
    let (code, body) = server.post("/v1/admin/batch");
    assert_eq!(code, 202, "{body}");
    // Killed while the run goes (or just after it ends: either way nothing may be lost).
    poll_until("the run to start", DEADLINE, || {
        let s = batch_status(&server);
        (s["running"].is_object() || !s["history"].as_array()?.is_empty()).then_some(())
    });
    server.kill9();
    server.restart();
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);

    let inc = batch_run(&server);
    let (code, full) = server.post("/v1/admin/batch?wait=true&full=true");
    assert_eq!(code, 200, "{full}");
    assert_eq!(inc["cutoff_seq"], full["cutoff_seq"], "{inc} {full}");
    let files_of = |run: &Value| {
        let v = run["version"].as_str().unwrap();
        let m: Value = serde_json::from_str(
            &fs::read_to_string(views_root(&data_dir).join(v).join("manifest.json")).unwrap(),
        )
        .unwrap();
        m["files"].clone()
    };
    assert_eq!(
        files_of(&inc),
        files_of(&full),
        "incremental {inc} vs full {full}"
    );
    let stray: Vec<String> = fs::read_dir(data_dir.join("views/partials"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp"))
        .collect();
    assert!(stray.is_empty(), "temporary partials left: {stray:?}");
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);
}

/// Deletion requests (`POST /v1/admin/forget`, `tally master forget`): the events of a URL
/// prefix leave the master dataset and every answer, with the server running and stopped.
#[test]
fn forget_removes_a_url_prefix_from_the_master_dataset_and_every_answer() {
    let mut rng = StdRng::seed_from_u64(seed());
    let mut server = TestServer::start(ServerOpts::default());
    let data_dir = server.data_dir().to_path_buf();
    let redis = redis_url(&mut server);
    let urls = make_urls(20, 2);
    let mut model = Model::default();
    ingest_random(&server, &mut model, &mut rng, &urls, 400);
    batch_run(&server);
    ingest_random(&server, &mut model, &mut rng, &urls, 100);

    for bad in [
        "/v1/admin/forget",
        "/v1/admin/forget?url_prefix=https://",
        "/v1/admin/forget?url_prefix=site0.test",
        "/v1/admin/forget?visitor=",
        "/v1/admin/forget?url_prefix=https://site0.test/&visitor=v",
    ] {
        let (code, body) = server.post(bad);
        assert_eq!(code, 400, "{bad}: {body}");
        assert!(body["error"].as_str().is_some(), "{bad}: {body}");
    }
    server.flush();
    assert_eq!(
        read_master(&data_dir).len(),
        model.events.len(),
        "nothing stored"
    );

    // Running server: every event of site0.test/p/1… goes (the batch view's and the speed
    // layer's), the rest stays exact.
    let prefix = "https://site0.test/p/1";
    let body = forget_prefix(&server, &mut model, prefix);
    assert!(body["version"].is_string(), "{body}");
    assert!(read_master(&data_dir)
        .iter()
        .all(|r| !r.url.starts_with(prefix)));
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);

    // Stopped server: the CLI does it on the files and publishes a view without them.
    ingest_random(&server, &mut model, &mut rng, &urls, 100);
    assert!(server.stop(), "graceful stop:\n{}", server.log());
    let out = tally_cli(
        "master forget --url-prefix https://site1.test/",
        &data_dir,
        &redis,
    );
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    model
        .events
        .retain(|(u, _)| !u.starts_with("https://site1.test/"));
    assert!(read_master(&data_dir)
        .iter()
        .all(|r| !r.url.starts_with("https://site1.test/")));
    assert_eq!(read_master(&data_dir).len(), model.events.len());
    server.restart();
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);
}

/// Corrupt the serving view: `verify` fails naming the file; a restarted server never answers
/// from it (every answer exact or 503), falls back, reruns, is exact again, and records
/// `discarded`. Then discarding a good view rebuilds a new version.
#[test]
fn a_corrupted_view_is_never_served_and_discard_rebuilds() {
    let mut rng = StdRng::seed_from_u64(seed());
    let mut server = TestServer::start(
        ServerOpts::default()
            .env("TALLY_SPEED_GC_GRACE", "10m")
            .env("TALLY_BATCH_RETRY_BACKOFF", "200ms"),
    );
    let urls = make_urls(40, 3);
    let mut model = Model::default();
    let data_dir = server.data_dir().to_path_buf();
    let redis = redis_url(&mut server);

    ingest_random(&server, &mut model, &mut rng, &urls, 1000);
    let first = batch_run(&server)["version"].as_str().unwrap().to_string();
    ingest_random(&server, &mut model, &mut rng, &urls, 1000);
    let bad = batch_run(&server)["version"].as_str().unwrap().to_string();
    ingest_random(&server, &mut model, &mut rng, &urls, 300);
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);

    let verify = tally_batch("verify", &data_dir, &redis);
    assert_eq!(
        verify.code, 0,
        "a good view verifies: {}{}",
        verify.stdout, verify.stderr
    );

    assert!(server.stop(), "graceful stop:\n{}", server.log());
    assert_eq!(current_file(&data_dir), bad);
    let victim = largest_file(&views_root(&data_dir).join(&bad));
    let victim_name = victim.file_name().unwrap().to_string_lossy().to_string();
    flip_bytes(&victim);

    let verify = tally_batch("verify", &data_dir, &redis);
    assert_eq!(
        verify.code, 1,
        "verify of a corrupted view: {}{}",
        verify.stdout, verify.stderr
    );
    assert!(
        format!("{}{}", verify.stdout, verify.stderr).contains(&victim_name),
        "verify names {victim_name}: {}{}",
        verify.stdout,
        verify.stderr
    );

    // Restart: from the first answer on, never a number from the corrupted view.
    server.restart();
    let probe: Vec<String> = urls.choose_multiple(&mut rng, 10).cloned().collect();
    let mut answers_503 = 0;
    let mut versions_seen = Vec::new();
    let recovered = poll_until("a rerun after the discarded view", DEADLINE, || {
        server.wait_caught_up();
        for url in &probe {
            let q = views_query(url, Range::all(), "total");
            let (code, body) = server.get(&q);
            match code {
                503 => answers_503 += 1,
                200 => {
                    assert_eq!(
                        body["views"].as_u64(),
                        Some(model.views(url, Range::all())),
                        "a wrong number after restart with a corrupted view: {q}: {body}"
                    );
                    let v = body["batch"]["version"].as_str().map(str::to_string);
                    assert_ne!(
                        v.as_deref(),
                        Some(bad.as_str()),
                        "served the corrupted view: {body}"
                    );
                    if !versions_seen.contains(&v) {
                        versions_seen.push(v);
                    }
                }
                _ => panic!("GET {q}: {code} {body}"),
            }
        }
        let cur = current_version(&server)?;
        (cur != bad && cur != first).then_some(cur)
    });
    eprintln!("503 answers: {answers_503}; versions served: {versions_seen:?}");
    let hist = history(&server);
    assert!(
        hist.iter()
            .any(|h| h["status"] == "discarded" && h["version"].as_str() == Some(bad.as_str())),
        "history records the corrupted view as discarded: {hist:?}"
    );
    assert_eq!(current_file(&data_dir), recovered);
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);
    let list = tally_batch("list", &data_dir, &redis);
    assert_eq!(list.code, 0, "{}{}", list.stdout, list.stderr);
    assert!(
        list.stdout.contains(&bad),
        "the discarded view stays on disk: {}",
        list.stdout
    );

    // Discard a good view: a new version is built; history records `discarded`.
    ingest_random(&server, &mut model, &mut rng, &urls, 100);
    let (code, body) = server.post("/v1/admin/batch/discard?wait=true");
    assert_eq!(code, 200, "POST /v1/admin/batch/discard?wait=true: {body}");
    let rebuilt = current_version(&server).expect("a view serves after discard");
    assert_ne!(rebuilt, recovered, "discard builds a new version");
    let hist = history(&server);
    assert!(
        hist.iter().any(
            |h| h["status"] == "discarded" && h["version"].as_str() == Some(recovered.as_str())
        ),
        "history records the discarded good view: {hist:?}"
    );
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);
}

/// A 2-second schedule produces views by itself; a run over an unreadable master file fails,
/// is retried and recorded `failed`, and the old view keeps serving exactly.
#[test]
fn the_schedule_runs_and_a_failing_run_keeps_the_old_view() {
    let mut rng = StdRng::seed_from_u64(seed());
    let server = TestServer::start(
        ServerOpts::default()
            .env("TALLY_BATCH_SCHEDULE", "*/2 * * * * *")
            .env("TALLY_BATCH_MAX_RETRIES", 2)
            .env("TALLY_BATCH_RETRY_BACKOFF", "200ms")
            .env("TALLY_SPEED_GC_GRACE", "10m"),
    );
    let urls = make_urls(30, 3);
    let mut model = Model::default();
    ingest_random(&server, &mut model, &mut rng, &urls, 500);
    assert_eq!(
        batch_status(&server)["schedule"].as_str(),
        Some("*/2 * * * * *"),
        "{}",
        batch_status(&server)
    );

    // Two scheduled runs, the second after more events.
    let v1 = poll_until("a scheduled run", DEADLINE, || {
        let h = history(&server);
        h.iter()
            .find(|e| e["status"] == "ok")
            .map(|e| e["version"].as_str().unwrap().to_string())
    });
    ingest_random(&server, &mut model, &mut rng, &urls, 300);
    let acked = server.acked_seq();
    poll_until("a scheduled run covering the new events", DEADLINE, || {
        let s = batch_status(&server);
        let c = &s["current"];
        (c["version"].as_str() != Some(v1.as_str())
            && c["cutoff_seq"].as_u64().is_some_and(|c| c >= acked))
        .then_some(())
    });
    assert!(history(&server).iter().all(|h| h["status"] == "ok"));
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);

    // A sealed master file becomes unreadable (only in this test's temp dir).
    ingest_random(&server, &mut model, &mut rng, &urls, 300);
    server.flush();
    let files = master_files(server.data_dir());
    let victim = files.last().expect("a sealed master file").clone();
    let tmp = victim.with_extension("garbage-tmp");
    fs::write(&tmp, b"this is not a parquet file, not even close to one").unwrap();
    fs::rename(&tmp, &victim).unwrap();
    let good = poll_until("a failed run, then a retry", DEADLINE, || {
        let h = history(&server);
        let failed: Vec<&Value> = h.iter().filter(|e| e["status"] == "failed").collect();
        (failed.len() >= 2).then(|| {
            for f in &failed {
                assert!(
                    f["error"].as_str().is_some_and(|e| !e.is_empty()),
                    "a failed run has an error: {f}"
                );
            }
        })?;
        current_version(&server)
    });
    // The old view keeps serving, exactly, while runs keep failing.
    server.wait_caught_up();
    for _ in 0..3 {
        for url in urls.choose_multiple(&mut rng, 10) {
            let body = assert_views(&server, &model, url, Range::all());
            assert_eq!(
                body["batch"]["version"].as_str(),
                Some(good.as_str()),
                "{body}"
            );
        }
        assert_top(&server, &model, 10, None, Range::all());
    }
    assert_eq!(current_version(&server).as_deref(), Some(good.as_str()));
}

/// `tally batch list|run` with the server running (delegated) and stopped (on the files).
#[test]
fn the_cli_runs_with_the_server_running_and_stopped() {
    let mut rng = StdRng::seed_from_u64(seed());
    let mut server = TestServer::start(ServerOpts::default());
    let data_dir = server.data_dir().to_path_buf();
    let redis = redis_url(&mut server);
    let urls = make_urls(20, 2);
    let mut model = Model::default();

    ingest_random(&server, &mut model, &mut rng, &urls, 400);
    let v1 = batch_run(&server)["version"].as_str().unwrap().to_string();
    let list = tally_batch("list", &data_dir, &redis);
    assert_eq!(list.code, 0, "{}{}", list.stdout, list.stderr);
    assert!(
        list.stdout.contains(&v1),
        "list shows {v1}: {}",
        list.stdout
    );

    // Running server: the CLI delegates; the server's view changes.
    ingest_random(&server, &mut model, &mut rng, &urls, 200);
    let run = tally_batch("run", &data_dir, &redis);
    assert_eq!(
        run.code, 0,
        "tally batch run (server up): {}{}",
        run.stdout, run.stderr
    );
    let v2 = poll_until("the server serving the CLI's view", DEADLINE, || {
        current_version(&server).filter(|v| *v != v1)
    });
    assert_eq!(current_file(&data_dir), v2);
    server.wait_caught_up();
    let body = assert_views(&server, &model, &urls[0], Range::all());
    assert_eq!(
        body["batch"]["version"].as_str(),
        Some(v2.as_str()),
        "{body}"
    );
    assert_exact(&server, &model, &mut rng, &urls);

    // Stopped server: the CLI works on the files and publishes a view; `--full` reads every
    // file.
    ingest_random(&server, &mut model, &mut rng, &urls, 200);
    assert!(server.stop(), "graceful stop:\n{}", server.log());
    let run = tally_batch("run --full", &data_dir, &redis);
    assert_eq!(
        run.code, 0,
        "tally batch run (server down): {}{}",
        run.stdout, run.stderr
    );
    assert!(run.stdout.contains("; 0 files reused"), "{}", run.stdout);
    let v3 = current_file(&data_dir);
    assert!(v3 != v1 && v3 != v2, "a new view was published: {v3}");
    let list = tally_batch("list", &data_dir, &redis);
    assert_eq!(list.code, 0, "{}{}", list.stdout, list.stderr);
    assert!(
        list.stdout.contains(&v3),
        "list shows {v3}: {}",
        list.stdout
    );

    server.restart();
    assert_eq!(current_version(&server).as_deref(), Some(v3.as_str()));
    server.wait_caught_up();
    let body = assert_views(&server, &model, &urls[0], Range::all());
    assert_eq!(
        body["batch"]["version"].as_str(),
        Some(v3.as_str()),
        "{body}"
    );
    assert_exact(&server, &model, &mut rng, &urls);
    // `tally batch discard` with the server running: the server discards and reruns.
    ingest_random(&server, &mut model, &mut rng, &urls, 100);
    let discard = tally_batch("discard", &data_dir, &redis);
    assert_eq!(
        discard.code, 0,
        "tally batch discard (server up): {}{}",
        discard.stdout, discard.stderr
    );
    let v4 = poll_until("a rerun after the CLI discard", DEADLINE, || {
        current_version(&server).filter(|v| *v != v3)
    });
    assert!(
        history(&server)
            .iter()
            .any(|h| h["status"] == "discarded" && h["version"].as_str() == Some(v3.as_str())),
        "{:?}",
        history(&server)
    );
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);

    // `tally batch discard` with the server stopped: on the files; the server serves the rerun.
    assert!(server.stop(), "graceful stop:\n{}", server.log());
    let discard = tally_batch("discard", &data_dir, &redis);
    assert_eq!(
        discard.code, 0,
        "tally batch discard (server down): {}{}",
        discard.stdout, discard.stderr
    );
    let v5 = current_file(&data_dir);
    assert!(
        ![&v1, &v2, &v3, &v4].contains(&&v5),
        "a new view after discard: {v5}"
    );
    let list = tally_batch("list", &data_dir, &redis);
    assert!(list.stdout.contains(&v4), "{}", list.stdout);
    server.restart();
    assert_eq!(current_version(&server).as_deref(), Some(v5.as_str()));
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);
}

/// Epochs are collected once neither the serving view nor its fallback needs them (here a 1 s
/// grace). Discarding by API then falls back exactly; corrupting both the serving view and its
/// fallback leaves only a view whose following epoch is gone: every answer is still exact or
/// `503` — never a number missing the collected epoch — until a rerun serves exactly.
#[test]
fn discard_after_epoch_gc_never_answers_a_wrong_number() {
    let mut rng = StdRng::seed_from_u64(seed());
    let mut server = TestServer::start(ServerOpts::default().env("TALLY_SPEED_GC_GRACE", "1s"));
    let urls = make_urls(30, 3);
    let mut model = Model::default();
    let data_dir = server.data_dir().to_path_buf();

    let mut runs = Vec::new();
    for _ in 0..3 {
        ingest_random(&server, &mut model, &mut rng, &urls, 500);
        let run = batch_run(&server);
        runs.push((
            run["version"].as_str().unwrap().to_string(),
            run["cutoff_seq"].as_u64().unwrap(),
        ));
    }
    ingest_random(&server, &mut model, &mut rng, &urls, 200);
    let c2 = runs[1].1;
    poll_until(
        "the epoch between runs 1 and 2 to be collected",
        DEADLINE,
        || {
            let s = server.status();
            let epochs = s["speed_epochs"].as_array().cloned().unwrap_or_default();
            epochs
                .iter()
                .all(|e| e["start_seq"].as_u64().is_some_and(|st| st > c2))
                .then_some(())
        },
    );
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);

    let probe: Vec<String> = urls.choose_multiple(&mut rng, 6).cloned().collect();
    let check = |server: &TestServer, answers: &mut [u32; 2]| {
        for url in &probe {
            let q = views_query(url, Range::all(), "total");
            let (code, body) = server.get(&q);
            match code {
                503 => answers[1] += 1,
                200 => {
                    answers[0] += 1;
                    assert_eq!(
                        body["views"].as_u64(),
                        Some(model.views(url, Range::all())),
                        "a wrong number while the view is being replaced: {q}: {body}"
                    );
                }
                _ => panic!("GET {q}: {code} {body}"),
            }
        }
    };

    // Discard run 3 by API, probing from another thread meanwhile: run 2 + epochs serve.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut answers = [0u32; 2];
    thread::scope(|s| {
        let prober = s.spawn(|| {
            let mut answers = [0u32; 2];
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                check(&server, &mut answers);
                thread::sleep(Duration::from_millis(2));
            }
            answers
        });
        let (code, body) = server.post("/v1/admin/batch/discard?wait=true");
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(code, 200, "POST /v1/admin/batch/discard?wait=true: {body}");
        answers = prober.join().expect("prober");
    });
    eprintln!(
        "during discard: {} exact answers, {} 503",
        answers[0], answers[1]
    );
    let v4 = current_version(&server).unwrap();
    assert!(runs.iter().all(|(v, _)| *v != v4));
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);

    // Corrupt the serving view and its fallback (run 2); only run 1 is left, and the epoch
    // after its cutoff is gone.
    assert!(server.stop(), "graceful stop:\n{}", server.log());
    flip_bytes(&largest_file(&views_root(&data_dir).join(&v4)));
    flip_bytes(&largest_file(&views_root(&data_dir).join(&runs[1].0)));
    server.restart();
    let mut answers = [0u32; 2];
    let v5 = poll_until("a new view after the corrupted ones", DEADLINE, || {
        server.wait_caught_up();
        check(&server, &mut answers);
        current_version(&server).filter(|v| *v != v4 && runs.iter().all(|(r, _)| r != v))
    });
    eprintln!(
        "after restart: {} exact answers, {} 503; now {v5}",
        answers[0], answers[1]
    );
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);
}
