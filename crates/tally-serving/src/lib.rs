//! The serving layer: the merge of the batch view and the speed layer, and the HTTP API.

pub mod admin;
pub mod batch;
pub mod error;
pub mod ingest;
pub mod merge;
pub mod metrics;
pub mod plausible;
pub mod query;
pub mod state;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

pub use error::ApiError;
pub use state::{AppState, Inner, Limits, ViewManager};

/// The whole HTTP API.
pub fn router(state: AppState) -> Router {
    let admin = Router::new()
        .route("/v1/admin/flush", post(admin::flush))
        .route(
            "/v1/admin/batch",
            post(batch::post_batch).get(batch::get_batch),
        )
        .route("/v1/admin/batch/discard", post(batch::post_discard))
        .route("/v1/admin/status", get(admin::status))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admin::require_admin,
        ));
    Router::new()
        .route("/v1/events", post(ingest::post_events))
        .route("/v1/views", get(query::get_views))
        .route("/v1/top", get(query::get_top))
        .route(
            "/api/event",
            post(plausible::post_event).options(plausible::preflight),
        )
        .route("/metrics", get(metrics::render))
        .route("/healthz", get(admin::healthz))
        .route("/readyz", get(admin::readyz))
        .merge(admin)
        .fallback(|| async { ApiError::NotFound("There is no such endpoint; see API.md.".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn(metrics::track))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .with_state(state)
}
