//! Operations: `/v1/admin/*`, `/healthz`, `/readyz`.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::prelude::{Engine as _, BASE64_STANDARD};
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::views::ViewManager;

/// Compares in time independent of where the first difference is.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token a request presents: `Authorization: Bearer <token>`, or `Basic` credentials whose
/// password is the token (any user name) — what a browser sends after its login prompt, so the
/// dashboard can be opened where `auth.read_token` is set.
fn presented(req: &Request) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Some(token.trim().to_string());
    }
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = BASE64_STANDARD.decode(encoded.trim()).ok()?;
    let credentials = String::from_utf8(decoded).ok()?;
    Some(credentials.split_once(':')?.1.to_string())
}

/// Whether `given` is `token` (in constant time).
fn matches(given: Option<&str>, token: Option<&String>) -> bool {
    match (given, token) {
        (Some(g), Some(t)) => constant_time_eq(g.as_bytes(), t.as_bytes()),
        _ => false,
    }
}

/// Admin endpoints need `Authorization: Bearer <auth.admin_token>` when a token is set.
pub(crate) async fn require_admin(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let given = presented(&req);
    if state.admin_token.is_some() && !matches(given.as_deref(), state.admin_token.as_ref()) {
        return ApiError::Unauthorized.into_response();
    }
    next.run(req).await
}

/// Whether a request may read: no read token is set, or it presents the read or admin token.
fn may_read(state: &AppState, req: &Request) -> bool {
    if state.read_token.is_none() {
        return true;
    }
    let given = presented(req);
    matches(given.as_deref(), state.read_token.as_ref())
        || matches(given.as_deref(), state.admin_token.as_ref())
}

/// Query endpoints need `Authorization: Bearer <auth.read_token>` (or the admin token) when a
/// read token is set (API.md, "Read access"); ingestion stays open.
pub(crate) async fn require_read(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if !may_read(&state, &req) {
        return ApiError::ReadUnauthorized.into_response();
    }
    next.run(req).await
}

/// The dashboard's files need the read token too; without it a browser is asked for it with
/// its own login prompt (`WWW-Authenticate: Basic`; the token is the password).
pub(crate) async fn require_read_page(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if !may_read(&state, &req) {
        return (
            StatusCode::UNAUTHORIZED,
            [
                (header::WWW_AUTHENTICATE, r#"Basic realm="tally", charset="UTF-8""#),
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            ],
            "This tally needs its read token: sign in with any user name and the token as the password.\n",
        )
            .into_response();
    }
    next.run(req).await
}

pub(crate) async fn flush(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let sealed = state.master.seal().await?;
    Ok(Json(json!({ "sealed_through_seq": sealed.get() })))
}

pub(crate) async fn status(State(state): State<AppState>) -> Json<Value> {
    let m = state.master.status();
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
