//! Who may call what: the admin token on admin routes, the read (or admin) token on query
//! routes and the dashboard when `auth.read_token` is set; constant-time comparisons.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::prelude::{Engine as _, BASE64_STANDARD};

use crate::error::ApiError;
use crate::state::AppState;

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
