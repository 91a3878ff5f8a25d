//! Cluster mode's log (API.md "Cluster mode", DESIGN.md "Cluster mode"): several `tally serve`
//! nodes on one private `nats-server -js`, each following the log into its own data_dir and its
//! own Redis. Every node answers like the model of what any node acknowledged, through batch
//! runs started on different nodes, a node killed with `kill -9` mid-ingest, and NATS going away.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tally_e2e::{
    assert_exact, forget_prefix, ingest_random, make_urls, now_ms, poll_until, read_master, seed,
    tally_bin, Model, ServerOpts, TestNats, TestServer, DAY_MS, DEADLINE, JSON,
};

fn node(nats: &TestNats) -> TestServer {
    TestServer::start(
        ServerOpts::default()
            .env("TALLY_QUEUE_URL", nats.url())
            .env("TALLY_QUEUE_PUBLISH_TIMEOUT", "2s")
            .env("TALLY_BATCH_RETRY_BACKOFF", "100ms")
            .env("TALLY_CLUSTER_LEASE_TTL", "2s"),
    )
}

/// A batch run on `node`, waited for. A node answers `409` while it computes its own view to
/// another node's cut, or while another node's run holds the batch lease: it is asked again.
fn cluster_batch_run(node: &TestServer) -> Value {
    poll_until("a batch run to be admitted", DEADLINE, || {
        let (code, body) = node.post("/v1/admin/batch?wait=true");
        match code {
            200 => Some(body),
            409 => None,
            _ => panic!("POST /v1/admin/batch?wait=true: {code} {body}"),
        }
    })
}

fn cluster_of(node: &TestServer) -> Value {
    let s = node.status();
    assert!(s["cluster"].is_object(), "no cluster section: {s}");
    s["cluster"].clone()
}

/// The stream's last sequence, as a node reports it.
fn last_seq(node: &TestServer) -> u64 {
    poll_until("the log's last sequence", DEADLINE, || {
        cluster_of(node)["log"]["last_seq"].as_u64()
    })
}

/// Waits until every node has followed the log through `last` and applied all it holds.
fn catch_up(nodes: &[&TestServer], last: u64) {
    for n in nodes {
        poll_until("the node to follow the log", DEADLINE, || {
            let c = cluster_of(n);
            (c["log"]["followed_seq"].as_u64() >= Some(last)).then_some(())
        });
        n.wait_caught_up();
    }
}

#[test]
fn three_nodes_fed_round_robin_answer_every_query_like_the_model() {
    let Some(nats) = TestNats::start("three_nodes_fed_round_robin") else {
        return;
    };
    let nodes: Vec<TestServer> = (0..3).map(|_| node(&nats)).collect();
    let mut rng = StdRng::seed_from_u64(seed());
    let urls = make_urls(30, 3);
    let mut model = Model::default();
    for round in 0..6 {
        for n in &nodes {
            let k = rng.random_range(50..400);
            ingest_random(n, &mut model, &mut rng, &urls, k);
        }
        // Batch runs started on different nodes: each cuts at its own marker in the log, which
        // every node sees at the same place.
        if round % 2 == 1 {
            let run = cluster_batch_run(&nodes[round % 3]);
            assert!(run["cutoff_seq"].as_u64().is_some(), "{run}");
        }
    }
    let last = last_seq(&nodes[0]);
    let all: Vec<&TestServer> = nodes.iter().collect();
    catch_up(&all, last);
    for (i, n) in nodes.iter().enumerate() {
        eprintln!("node {i}");
        assert_exact(n, &model, &mut rng, &urls);
        // The log lag an operator watches: none once caught up.
        assert_eq!(n.metric("tally_log_followed_seq"), last as f64);
        assert_eq!(n.metric("tally_log_last_seq"), last as f64);
    }
    // Node ids differ, and the log section says where each node is.
    let ids: HashSet<String> = nodes
        .iter()
        .map(|n| cluster_of(n)["node_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3);
}

type Sent = Vec<(String, i64, String)>;

/// Posts batches of events with ids to `node` until told to stop or the node dies; returns the
/// `(url, ts, id)` of every event that was acknowledged (`202`), and of those whose request got
/// no answer (the node died under it: stored or not, nobody was told).
fn post_until_stopped(
    node_url: String,
    stop: Arc<Mutex<bool>>,
    tag: &'static str,
) -> thread::JoinHandle<(Sent, Sent)> {
    thread::spawn(move || {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let mut acked = Vec::new();
        let mut unanswered = Vec::new();
        let now = now_ms();
        for batch in 0u64.. {
            if *stop.lock().unwrap() {
                break;
            }
            let events: Vec<(String, i64, String)> = (0..50u64)
                .map(|i| {
                    let url = format!("https://k.test/p{}", (batch * 7 + i) % 13);
                    let ts = now - ((batch * 50 + i) as i64 * 60_000) % (20 * DAY_MS);
                    (url, ts, format!("{tag}-{batch}-{i}"))
                })
                .collect();
            let body: Vec<Value> = events
                .iter()
                .map(|(u, ts, id)| json!({"url": u, "ts": ts, "id": id}))
                .collect();
            let resp = client
                .post(format!("{node_url}/v1/events"))
                .header("content-type", JSON)
                .body(Value::Array(body).to_string())
                .send();
            match resp {
                Ok(r) if r.status().as_u16() == 202 => acked.extend(events),
                Ok(_) => {}
                Err(_) => {
                    // The node is gone.
                    unanswered.extend(events);
                    break;
                }
            }
        }
        (acked, unanswered)
    })
}

#[test]
fn a_node_killed_mid_ingest_loses_no_acknowledged_event_and_catches_up_exactly() {
    let Some(nats) = TestNats::start("a_node_killed_mid_ingest") else {
        return;
    };
    let a = node(&nats);
    let mut b = node(&nats);
    let stop = Arc::new(Mutex::new(false));
    let to_a = post_until_stopped(a.base_url(), stop.clone(), "a");
    let to_b = post_until_stopped(b.base_url(), stop.clone(), "b");
    // Let both take some traffic, run a batch on b, start another and kill b while it runs
    // (its cut marker may be in the log already) and while it is being written to.
    poll_until("events acknowledged on b", DEADLINE, || {
        (b.acked_seq() > 0).then_some(())
    });
    cluster_batch_run(&b);
    let (code, started) = b.post("/v1/admin/batch");
    assert!(code == 202 || code == 200, "{code} {started}");
    b.kill9();
    let (on_b, unanswered) = to_b.join().unwrap();
    *stop.lock().unwrap() = true;
    let (on_a, _) = to_a.join().unwrap();
    assert!(!on_b.is_empty() && !on_a.is_empty());
    let acked: HashSet<&str> = on_a.iter().chain(&on_b).map(|e| e.2.as_str()).collect();

    // The survivor's master dataset holds every event either node acknowledged, once; beyond
    // them at most the request b died under (in the log, but never answered).
    let last = last_seq(&a);
    catch_up(&[&a], last);
    a.flush();
    let rows = read_master(a.data_dir());
    let stored: Vec<String> = rows.iter().filter_map(|r| r.id.clone()).collect();
    let unique: HashSet<&str> = stored.iter().map(String::as_str).collect();
    assert_eq!(
        stored.len(),
        unique.len(),
        "an event is in the master twice"
    );
    let missing = acked.difference(&unique).count();
    assert_eq!(
        missing, 0,
        "{missing} acknowledged events are missing from the master dataset"
    );
    let maybe: HashSet<&str> = unanswered.iter().map(|e| e.2.as_str()).collect();
    assert!(
        unique
            .iter()
            .all(|id| acked.contains(id) || maybe.contains(id)),
        "events stored that nobody sent"
    );

    // Every count equals what is stored: the acknowledged events and whichever of the
    // unanswered request's made it into the log (all or none of them: one message).
    let mut model = Model::default();
    for (url, ts, id) in on_a.iter().chain(&on_b).chain(&unanswered) {
        if unique.contains(id.as_str()) {
            model.events.push((url.clone(), *ts));
        }
    }
    let stored_unanswered = unanswered
        .iter()
        .filter(|e| unique.contains(e.2.as_str()))
        .count();
    assert!(stored_unanswered == 0 || stored_unanswered == unanswered.len());
    let urls: Vec<String> = (0..13).map(|i| format!("https://k.test/p{i}")).collect();
    let mut rng = StdRng::seed_from_u64(seed());
    assert_exact(&a, &model, &mut rng, &urls);

    // The killed node comes back on its own data_dir, reads the rest of the log, and agrees,
    // before and after its next batch run.
    b.restart();
    catch_up(&[&b], last);
    assert_exact(&b, &model, &mut rng, &urls);
    cluster_batch_run(&b);
    assert_exact(&b, &model, &mut rng, &urls);
    cluster_batch_run(&a);
    assert_exact(&a, &model, &mut rng, &urls);
}

#[test]
fn with_nats_gone_ingest_answers_503_with_retry_after_and_resumes_without_loss() {
    let Some(mut nats) = TestNats::start("with_nats_gone") else {
        return;
    };
    let n = node(&nats);
    let urls = make_urls(10, 2);
    let mut rng = StdRng::seed_from_u64(seed());
    let mut model = Model::default();
    ingest_random(&n, &mut model, &mut rng, &urls, 500);
    // A request larger than one NATS message (max_payload, 1 MiB by default) is the client's
    // to split: 413 with a sentence, nothing stored (the counts below say so).
    let now = now_ms();
    let big: Vec<Value> = (0..20_000)
        .map(|i| json!({"url": format!("{}?padding-to-make-it-large-{i}", urls[1]), "ts": now}))
        .collect();
    let (code, body) = n.post_events(Value::Array(big).to_string(), JSON);
    assert_eq!(code, 413, "{body}");
    assert!(body["error"].as_str().unwrap().contains("split"), "{body}");

    nats.kill();
    poll_until("/readyz to name NATS", DEADLINE, || {
        let (code, body) = n.get("/readyz");
        (code == 503 && body.to_string().contains("NATS")).then_some(())
    });
    let body = json!([{"url": urls[0], "ts": now_ms()}]).to_string();
    let resp = n
        .client()
        .post(format!("{}/v1/events", n.base_url()))
        .header("content-type", JSON)
        .body(body.clone())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert!(
        resp.headers().get("retry-after").is_some(),
        "503 without Retry-After"
    );
    let text: Value = resp.json().unwrap();
    assert!(text["error"].as_str().unwrap().contains("log"), "{text}");

    nats.restart();
    poll_until("ingest to be accepted again", DEADLINE, || {
        let (code, _) = n.post_events(body.clone(), JSON);
        (code == 202).then_some(())
    });
    let ts = serde_json::from_str::<Value>(&body).unwrap()[0]["ts"]
        .as_i64()
        .unwrap();
    model.events.push((urls[0].clone(), ts));
    ingest_random(&n, &mut model, &mut rng, &urls, 500);
    let last = last_seq(&n);
    catch_up(&[&n], last);
    cluster_batch_run(&n);
    assert_exact(&n, &model, &mut rng, &urls);
}

/// `tally master upload` with this server's data_dir and the log: its exit code and output.
fn upload(data_dir: &std::path::Path, nats: &TestNats) -> (bool, String) {
    let out = std::process::Command::new(tally_bin())
        .args(["master", "upload", "--to", &nats.url()])
        .env("TALLY_STORAGE_DATA_DIR", data_dir)
        .output()
        .expect("run tally master upload");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn a_single_node_data_dir_uploaded_to_the_log_is_counted_once_by_every_cluster_node() {
    let Some(nats) = TestNats::start("a_single_node_data_dir_uploaded") else {
        return;
    };
    let mut single = TestServer::start(ServerOpts::default());
    let urls = make_urls(20, 3);
    let mut rng = StdRng::seed_from_u64(seed());
    let mut model = Model::default();
    ingest_random(&single, &mut model, &mut rng, &urls, 3000);
    cluster_batch_run(&single);
    ingest_random(&single, &mut model, &mut rng, &urls, 1500);
    // Not while the server holds the data_dir.
    let (ok, text) = upload(single.data_dir(), &nats);
    assert!(!ok, "{text}");
    assert!(single.stop(), "{}", single.log());

    let (ok, text) = upload(single.data_dir(), &nats);
    assert!(ok, "{text}");
    assert!(text.contains("uploaded 4500 events"), "{text}");
    // Again: nothing twice.
    let (ok, text) = upload(single.data_dir(), &nats);
    assert!(ok, "{text}");
    assert!(text.contains("nothing left to upload"), "{text}");

    // A cluster node refuses the single node's data_dir rather than skip its events ...
    let on_old = TestServer::start(
        ServerOpts::default()
            .env("TALLY_QUEUE_URL", nats.url())
            .env("TALLY_STORAGE_DATA_DIR", single.data_dir().display()),
    );
    poll_until(
        "/readyz to say the node stopped following",
        DEADLINE,
        || {
            let (code, body) = on_old.get("/readyz");
            (code == 503 && body.to_string().contains("single-node")).then_some(())
        },
    );
    drop(on_old);
    // ... and fresh nodes count every uploaded event once, beside events posted to the cluster.
    let a = node(&nats);
    let b = node(&nats);
    ingest_random(&b, &mut model, &mut rng, &urls, 500);
    let last = last_seq(&a);
    catch_up(&[&a, &b], last);
    cluster_batch_run(&a);
    assert_exact(&a, &model, &mut rng, &urls);
    assert_exact(&b, &model, &mut rng, &urls);
}

#[test]
fn a_request_nats_stores_only_after_its_deadline_is_answered_503_and_never_counted() {
    let Some(nats) = TestNats::start("a_request_nats_stores_only_after_its_deadline") else {
        return;
    };
    let n = TestServer::start(
        ServerOpts::default()
            .env("TALLY_QUEUE_URL", nats.url())
            .env("TALLY_QUEUE_PUBLISH_TIMEOUT", "1s"),
    );
    let urls = make_urls(5, 1);
    let mut rng = StdRng::seed_from_u64(seed());
    let mut model = Model::default();
    ingest_random(&n, &mut model, &mut rng, &urls, 200);
    // NATS frozen: the connection stays up, the publish (and the copy sent to settle it after
    // the deadline) wait in the client's buffer; the request is answered 503 ...
    nats.pause();
    let (code, body) = n.post_events(json!([{"url": urls[0], "ts": now_ms()}]).to_string(), JSON);
    nats.resume();
    assert_eq!(code, 503, "{body}");
    // ... and when NATS takes the buffered copy, later than the deadline, no node counts it.
    poll_until(
        "the late copy to reach the log and be skipped",
        DEADLINE,
        || (n.metric("tally_log_void_messages_total") >= 1.0).then_some(()),
    );
    ingest_random(&n, &mut model, &mut rng, &urls, 200);
    let last = last_seq(&n);
    catch_up(&[&n], last);
    assert_exact(&n, &model, &mut rng, &urls);
}

/// Holds the cluster's batch lease from outside tally, as another node would: the key `batch`
/// in the JetStream key-value bucket `<stream>_leases`, renewed every 300 ms until `stop`.
fn hold_batch_lease(nats: &TestNats, holder: &str, run_id: &str, stop: Arc<Mutex<bool>>) {
    let (url, value) = (nats.url(), format!("{holder}\n{run_id}"));
    let (taken_tx, taken_rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let client = async_nats::connect(url).await.unwrap();
            let js = async_nats::jetstream::new(client);
            let kv = js.get_key_value("tally_events_leases").await.unwrap();
            let mut revision = kv.create("batch", value.clone().into()).await.unwrap();
            taken_tx.send(()).unwrap();
            while !*stop.lock().unwrap() {
                tokio::time::sleep(Duration::from_millis(300)).await;
                revision = kv
                    .update("batch", value.clone().into(), revision)
                    .await
                    .unwrap();
            }
            // Then it dies: no release, the key expires after the bucket's max_age.
        });
    });
    taken_rx.recv_timeout(DEADLINE).expect("the lease taken");
}

#[test]
fn one_batch_run_at_a_time_in_the_cluster_and_every_node_computes_its_view_to_every_cut() {
    let Some(nats) = TestNats::start("one_batch_run_at_a_time") else {
        return;
    };
    let nodes: Vec<TestServer> = (0..3).map(|_| node(&nats)).collect();
    let mut rng = StdRng::seed_from_u64(seed());
    let urls = make_urls(20, 2);
    let mut model = Model::default();
    for n in &nodes {
        ingest_random(n, &mut model, &mut rng, &urls, 300);
    }
    // Asking for the leases opens the bucket (each node creates it when missing).
    poll_until("the leases bucket", DEADLINE, || {
        let c = cluster_of(&nodes[0]);
        (c["leases"].as_array().is_some_and(Vec::is_empty) && c["leases_error"].is_null())
            .then_some(())
    });

    // While another node's run holds the lease, every node refuses to start one and names it.
    let stop = Arc::new(Mutex::new(false));
    hold_batch_lease(&nats, "elsewhere", "run-elsewhere-1", stop.clone());
    for n in &nodes {
        let (code, body) = n.post("/v1/admin/batch?wait=true");
        assert_eq!(code, 409, "{body}");
        assert_eq!(body["run_id"], "run-elsewhere-1", "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("elsewhere"),
            "{body}"
        );
        let leases = cluster_of(n)["leases"].clone();
        assert_eq!(leases[0]["name"], "batch", "{leases}");
        assert_eq!(leases[0]["holder"], "elsewhere", "{leases}");
        assert_eq!(leases[0]["purpose"], "run-elsewhere-1", "{leases}");
        assert_eq!(n.metric("tally_batch_runs_total{status=\"failed\"}"), 0.0);
    }
    assert!(nodes[0].status()["batch_version"].is_null());

    // The holder dies (stops renewing): its lease expires and a node's run goes ahead.
    *stop.lock().unwrap() = true;
    let run = cluster_batch_run(&nodes[1]);
    let cutoff = run["cutoff_seq"].as_u64().unwrap();
    assert!(cutoff > 0, "{run}");
    // It let the lease go when it finished.
    poll_until("the lease let go", DEADLINE, || {
        cluster_of(&nodes[0])["leases"]
            .as_array()
            .is_some_and(Vec::is_empty)
            .then_some(())
    });
    // Every other node computed its own view to the same cut, from the log, unasked.
    for (i, n) in nodes.iter().enumerate() {
        poll_until("the node to serve a view to the cut", DEADLINE, || {
            (n.status()["batch_cutoff_seq"].as_u64() == Some(cutoff)).then_some(())
        });
        let (_, batch) = n.get("/v1/admin/batch");
        let trigger = &batch["history"][0]["trigger"];
        assert_eq!(trigger, if i == 1 { "admin" } else { "log" }, "{batch}");
    }
    // More events, and a run on another node: all exact, all on the same cut again.
    for n in &nodes {
        ingest_random(n, &mut model, &mut rng, &urls, 200);
    }
    let second = cluster_batch_run(&nodes[2])["cutoff_seq"].as_u64().unwrap();
    assert!(second > cutoff);
    let last = last_seq(&nodes[0]);
    let all: Vec<&TestServer> = nodes.iter().collect();
    catch_up(&all, last);
    for n in &nodes {
        poll_until(
            "the node to serve a view to the second cut",
            DEADLINE,
            || (n.status()["batch_cutoff_seq"].as_u64() == Some(second)).then_some(()),
        );
        assert_exact(n, &model, &mut rng, &urls);
    }

    // A discard while another node's run holds the lease takes effect (202, not 409), and the
    // view that replaces it, once the lease is free, is a full run.
    let stop = Arc::new(Mutex::new(false));
    hold_batch_lease(&nats, "elsewhere", "run-elsewhere-2", stop.clone());
    let discarded = nodes[0].status()["batch_version"].clone();
    let (code, body) = nodes[0].post("/v1/admin/batch/discard");
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["discarded"], discarded, "{body}");
    assert!(body["note"].as_str().is_some(), "{body}");
    *stop.lock().unwrap() = true;
    poll_until("a view to replace the discarded one", DEADLINE, || {
        let s = nodes[0].status();
        let newer = s["batch_version"].as_str() > discarded.as_str();
        (newer && s["recovering"] == false).then_some(())
    });
    let (_, batch) = nodes[0].get("/v1/admin/batch");
    assert_eq!(batch["history"][0]["full"], true, "{batch}");
    assert_exact(&nodes[0], &model, &mut rng, &urls);
}

/// Master events of `node` whose URL starts with `prefix` (sealed first).
fn stored_with_prefix(node: &TestServer, prefix: &str) -> usize {
    node.flush();
    read_master(node.data_dir())
        .iter()
        .filter(|r| r.url.starts_with(prefix))
        .count()
}

#[test]
fn a_deletion_request_to_one_node_is_applied_by_every_node_at_its_place_in_the_log() {
    let Some(nats) = TestNats::start("a_deletion_request") else {
        return;
    };
    let a = node(&nats);
    let b = node(&nats);
    let mut rng = StdRng::seed_from_u64(seed());
    let urls = make_urls(20, 2);
    let mut model = Model::default();
    ingest_random(&a, &mut model, &mut rng, &urls, 300);
    ingest_random(&b, &mut model, &mut rng, &urls, 300);
    cluster_batch_run(&a);
    ingest_random(&b, &mut model, &mut rng, &urls, 100);

    let prefix = "https://site0.test/p/1";
    forget_prefix(&a, &mut model, prefix);
    // Events sent after the request count again: it applies to what came before it.
    ingest_random(&b, &mut model, &mut rng, &urls, 200);
    let after = model
        .events
        .iter()
        .filter(|(u, _)| u.starts_with(prefix))
        .count();
    assert!(after > 0);
    let cutoff = cluster_batch_run(&b)["cutoff_seq"].as_u64().unwrap();

    // A node that joins later reads the whole log, the request at its place included.
    let c = node(&nats);
    let last = last_seq(&a);
    let all = [&a, &b, &c];
    catch_up(&all, last);
    for n in all {
        poll_until("the node to serve a view to the last cut", DEADLINE, || {
            (n.status()["batch_cutoff_seq"].as_u64() == Some(cutoff)).then_some(())
        });
        assert_eq!(stored_with_prefix(n, prefix), after);
        assert_exact(n, &model, &mut rng, &urls);
    }
}
