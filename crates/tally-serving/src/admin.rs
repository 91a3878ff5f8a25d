//! Operations: `/v1/admin/*`, `/healthz`, `/readyz`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::error::ApiResult;
use crate::state::AppState;
use crate::views::ViewManager;

pub(crate) async fn flush(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let sealed = state.master.seal().await?;
    Ok(Json(json!({ "sealed_through_seq": sealed.get() })))
}

pub(crate) async fn status(State(state): State<AppState>) -> Json<Value> {
    let m = state.master.status();
    let cluster = match &state.log {
        None => Value::Null,
        Some(log) => {
            // The follower owns the tally_log_last_seq gauge; this asks the stream now.
            let (last, leases) = tokio::join!(log.last_seq(), log.lease_holders());
            let (leases, leases_error) = match leases {
                Ok(l) => (l, None),
                Err(e) => (Vec::new(), Some(e.to_string())),
            };
            json!({
                "node_id": log.node_id(),
                "leases": leases,
                "leases_error": leases_error,
                "log": {
                    "connected": log.connected(),
                    "last_seq": last.ok(),
                    "followed_seq": log.followed(),
                    "archived_seq": tally_log::stream_seq_of(m.sealed_seq),
                    "failure": log.failure(),
                },
            })
        }
    };
    let view = state.views.current();
    let epochs: Vec<Value> = state
        .speed
        .epochs()
        .into_iter()
        .map(|e| json!({ "start_seq": e.start.get(), "applied_seq": e.applied.get(), "urls": e.urls }))
        .collect();
    Json(json!({
        "acked_seq": m.acked_seq.get(),
        "sealed_seq": m.sealed_seq.get(),
        "speed_applied_seq": state.speed.applied_seq().get(),
        "redis_applied_seq": state.speed.redis_applied_seq().get(),
        "batch_cutoff_seq": view.as_ref().map(|v| v.cutoff_seq.get()),
        "batch_version": view.as_ref().map(|v| v.version.clone()),
        "speed_epochs": epochs,
        "redis": if state.speed.redis_up() { "up" } else { "down" },
        "speed_available": state.speed.available(),
        "recovering": state.views.recovering(),
        "wal_bytes": m.wal_bytes,
        "master_files": m.master_files,
        "stopped_threads": state.master.stopped_threads(),
        "uptime_s": state.started.elapsed().as_secs(),
        "cluster": cluster,
    }))
}

pub(crate) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when queries are answered exactly: the speed layer still holds the epochs after the
/// serving view's cutoff, and it is available.
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let mut reasons: Vec<String> = Vec::new();
    let view = state.views.current();
    if !state.speed.covers(ViewManager::cutoff(view.as_ref())) {
        reasons.push(
            "the speed epochs after the serving batch view were collected; a rerun is publishing a newer view".into(),
        );
    }
    if !state.speed.redis_up() {
        reasons.push("redis is unreachable".into());
    } else if !state.speed.available() {
        reasons.push("the speed layer is rebuilding".into());
    }
    if let Some(log) = &state.log {
        if let Some(why) = log.failure() {
            reasons.push(format!("this node stopped following the log: {why}"));
        } else if !log.connected() {
            reasons.push("NATS (the log) is unreachable".into());
        }
    }
    for t in state.master.stopped_threads() {
        reasons.push(format!("the {t} thread stopped; restart tally"));
    }
    // As in /v1/admin/status: null before the first batch view.
    let cutoff = view.as_ref().map(|v| v.cutoff_seq.get());
    if reasons.is_empty() {
        (
            StatusCode::OK,
            Json(json!({ "status": "ready", "batch_cutoff_seq": cutoff })),
        )
            .into_response()
    } else {
        let error = format!("Not ready: {}.", reasons.join("; "));
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": error, "reasons": reasons })),
        )
            .into_response()
    }
}
