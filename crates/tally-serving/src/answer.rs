//! What every query answer shares: the sketch precision and the batch view it comes from
//! (`batch`), the `X-Tally-Degraded` header when the speed layer could not be read, speed-layer
//! reads refused when the serving view's epochs are gone, and running a query off the async
//! workers.

use std::sync::Arc;

use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tally_batch::BatchView;
use tally_core::format_rfc3339;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// The sketch precision of an answer: the serving view's, else the configured one.
pub(crate) fn precision_of(state: &AppState, view: Option<&Arc<BatchView>>) -> u8 {
    view.and_then(|v| v.sketch_precision())
        .unwrap_or(state.sketch_precision)
}

/// Which batch view an answer comes from (`batch` in every query answer; null without one).
#[derive(Debug, serde::Serialize)]
pub(crate) struct Provenance<'a> {
    version: &'a str,
    cutoff_seq: u64,
    computed_at: String,
}

pub(crate) fn provenance(view: Option<&Arc<BatchView>>) -> Option<Provenance<'_>> {
    view.map(|v| Provenance {
        version: &v.version,
        cutoff_seq: v.cutoff_seq.get(),
        computed_at: format_rfc3339(v.computed_at_ms),
    })
}

/// Adds `X-Tally-Degraded: speed` when the speed layer could not be read.
pub(crate) fn respond<T: serde::Serialize>(body: T, speed_available: bool) -> Response {
    let mut resp = Json(body).into_response();
    if !speed_available {
        resp.headers_mut().insert(
            HeaderName::from_static("x-tally-degraded"),
            HeaderValue::from_static("speed"),
        );
    }
    resp
}

/// Runs a query's CPU-bound part on the blocking pool: a grouping over every source key of a
/// large site takes seconds, and on an async worker it would hold up every light request queued
/// behind it (the server's concurrency limit still bounds how many run).
pub(crate) async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("the query task failed: {e}")))?
}

/// A speed-layer read as the handlers need it: `None` when the speed layer is unavailable
/// (answer batch-only, degraded), 503 when the serving view's epochs were collected.
pub(crate) fn speed_read<T>(r: tally_speed::Read<T>) -> ApiResult<Option<T>> {
    r.map_err(|e| {
        ApiError::Unavailable(format!(
            "This answer cannot be exact right now: {e}. A rerun is publishing one; retry shortly."
        ))
    })
}
