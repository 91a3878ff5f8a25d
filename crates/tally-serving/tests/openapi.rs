//! `docs/openapi.json` (served at `GET /openapi.json`) and the router describe the same API:
//! every documented path + method is routed (neither the 404 fallback nor 405), every other
//! method on a documented path is 405, and every path the router declares is documented.

// Test helpers fail by panicking, as the tests do.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::Value;
use tally_batch::{BatchRunner, RunnerConfig, ViewStore};
use tally_core::event::IngestLimits;
use tally_master::{Master, MasterConfig};
use tally_serving::{router, AppState, Limits, ServingConfig, OPENAPI_JSON};
use tally_speed::{SpeedConfig, SpeedLayer};
use tower::ServiceExt;

const METHODS: &[&str] = &["get", "post", "put", "delete", "patch", "options"];
const FALLBACK_404: &str = "There is no such endpoint";

/// A real state over a temporary data dir; Redis is unreachable (the applier just retries).
async fn state(dir: &std::path::Path) -> AppState {
    let master = Master::open(MasterConfig {
        data_dir: dir.to_path_buf(),
        seal_interval: Duration::from_secs(3600),
        seal_max_events: 1_000_000,
        fsync: false,
        tail_capacity: 1000,
    })
    .expect("open master");
    let speed = SpeedLayer::start(
        SpeedConfig {
            redis_url: format!("unix://{}/no-redis.sock", dir.display()),
            key_prefix: "tally-test:".into(),
            gc_grace: Duration::from_secs(60),
            apply_batch_max: 1000,
            sketch_precision: 14,
            applier_nice: 0,
        },
        master.clone(),
    )
    .await;
    let store = ViewStore::open(dir.join("views").join("batch")).expect("view store");
    let runner = BatchRunner::new(store, master.clone(), RunnerConfig::default());
    AppState::new(
        master,
        speed,
        runner,
        ServingConfig {
            limits: Limits {
                ingest: IngestLimits::default(),
                max_body_bytes: 1 << 20,
                request_timeout: Duration::from_secs(30),
                max_concurrency: 64,
            },
            admin_token: None,
            read_token: None,
            api_keys: Vec::new(),
            loopback: true,
            schedule: "0 0 */8 * * *".into(),
            sketch_precision: 14,
            fallback_views: 1,
            trusted_proxies: Default::default(),
            salt_path: dir.join("salt.json"),
            result_cache: true,
            log: None,
        },
        Box::new(String::new),
    )
}

fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let doc: Value = serde_json::from_str(OPENAPI_JSON).expect("docs/openapi.json is JSON");
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.0")),
        "an OpenAPI 3.0 document"
    );
    doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .map(|(path, item)| {
            let methods = item
                .as_object()
                .expect("path item")
                .keys()
                .filter(|k| METHODS.contains(&k.as_str()))
                .cloned()
                .collect();
            (path.clone(), methods)
        })
        .collect()
}

/// The paths declared with `.route("…", …)` in the router's source.
fn routed_paths() -> BTreeSet<String> {
    let src = include_str!("../src/lib.rs");
    src.split(".route(")
        .skip(1)
        .filter_map(|rest| {
            let rest = rest.trim_start();
            let rest = rest.strip_prefix('"')?;
            Some(rest[..rest.find('"')?].to_string())
        })
        .collect()
}

async fn answer(app: &axum::Router, method: &str, path: &str) -> (StatusCode, String) {
    let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 24)
        .await
        .unwrap_or_default();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_and_router_agree() {
    let dir = tempfile::tempdir().unwrap();
    let app = router(state(dir.path()).await);
    let doc = documented();

    for (path, methods) in &doc {
        for &m in METHODS {
            // Admin POSTs would do real work; an empty body or no query suffices to be routed.
            let (status, body) = answer(&app, m, path).await;
            if methods.contains(m) {
                assert_ne!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{m} {path} is documented but not routed: {body}"
                );
                assert!(
                    !(status == StatusCode::NOT_FOUND && body.contains(FALLBACK_404)),
                    "{m} {path} is documented but not routed: {body}"
                );
            } else {
                assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{m} {path} is routed but not documented: {body}"
                );
            }
        }
    }

    let routed = routed_paths();
    assert!(
        routed.len() >= 13,
        "parsed the routes of lib.rs: {routed:?}"
    );
    let documented: BTreeSet<String> = doc.keys().cloned().collect();
    assert_eq!(routed, documented, "paths routed vs documented");

    // The document itself is served.
    let (status, body) = answer(&app, "get", "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, OPENAPI_JSON);
}
