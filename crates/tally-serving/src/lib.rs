//! The serving layer: the merge of the batch view and the speed layer, and the HTTP API.

pub mod admin;
mod answer;
mod auth;
pub mod batch;
mod breakdown;
pub mod cache;
pub mod client_ip;
mod dashboard;
pub mod error;
mod extract;
mod grouping;
pub mod ingest;
pub mod merge;
pub mod metrics;
mod observe;
mod params;
pub mod plausible;
pub mod query;
pub mod salt;
mod site;
pub mod state;
mod stats_api;
pub mod views;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::routing::{get, post};
use axum::{BoxError, Router};
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::ServiceBuilder;
use tower_http::trace::{DefaultOnFailure, TraceLayer};

pub use error::ApiError;
pub use state::{AppState, Inner, Limits, ServingConfig};
pub use views::ViewManager;

/// The whole HTTP API.
pub fn router(state: AppState) -> Router {
    let admin = Router::new()
        .route("/v1/admin/flush", post(admin::flush))
        .route(
            "/v1/admin/batch",
            post(batch::post_batch).get(batch::get_batch),
        )
        .route("/v1/admin/batch/discard", post(batch::post_discard))
        .route("/v1/admin/forget", post(batch::post_forget))
        .route("/v1/admin/status", get(admin::status))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin,
        ));
    // Query endpoints: closed by `auth.read_token` when it is set.
    let queries = Router::new()
        .route("/v1/views", get(query::get_views))
        .route("/v1/top", get(query::get_top))
        .route("/v1/uniques", get(query::get_uniques))
        .route("/v1/site", get(site::get_site))
        .route("/v1/sites", get(site::get_sites))
        .route("/v1/breakdown", get(breakdown::get_breakdown))
        .route("/v1/realtime", get(site::get_realtime))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_read,
        ));
    // Public routes answer within `http.request_timeout`; admin routes may wait for a batch run.
    let public = Router::new()
        .merge(queries)
        .route("/v1/events", post(ingest::post_events))
        .route(
            "/api/event",
            post(plausible::post_event).options(plausible::preflight),
        )
        // Its own keys (`auth.api_keys`), as Plausible's Stats API has.
        .route("/api/v2/query", post(stats_api::post_query))
        .route("/metrics", get(observe::render))
        .route("/healthz", get(admin::healthz))
        .route("/readyz", get(admin::readyz))
        .route("/openapi.json", get(openapi))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(overload_error))
                .timeout(state.limits.request_timeout),
        );
    // The concurrency limit is one semaphore for the whole server (a plain
    // `ConcurrencyLimitLayer` would be cloned per route).
    let limit = GlobalConcurrencyLimitLayer::new(state.limits.max_concurrency);
    Router::new()
        .merge(public)
        .merge(admin)
        .merge(dashboard::routes(&state))
        .fallback(|| async { ApiError::NotFound("There is no such endpoint; see API.md.".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn(observe::track))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(overload_error))
                .load_shed()
                .layer(limit),
        )
        // The request span is at DEBUG: at the default `info` level it is disabled and costs
        // nothing, where an INFO span cost ~4% of the CPU of single-event ingest (the fmt layer
        // formats and stores its fields for every request; BENCHMARKS.md, ingest profile).
        // `RUST_LOG=tally_serving=debug` brings it back.
        // Failed responses are logged where they are decided (`ApiError`: 503 at WARN with the
        // reason, 500 at ERROR with the cause); tower-http's own line would repeat them at ERROR
        // without either, and call every `/readyz` 503 of a normal start-up a failure.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let route = req
                        .extensions()
                        .get::<MatchedPath>()
                        .map_or("unmatched", MatchedPath::as_str);
                    tracing::debug_span!("request", method = %req.method(), route)
                })
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .with_state(state)
}

/// The OpenAPI 3.0 description of this router (`docs/openapi.json`; `tests/openapi.rs` checks
/// that it and the routes agree).
pub const OPENAPI_JSON: &str = include_str!("../../../docs/openapi.json");

/// `GET /openapi.json`.
async fn openapi() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI_JSON,
    )
}

/// Load shedding and timeouts answer 503 with `Retry-After`, like every other 503.
async fn overload_error(err: BoxError) -> ApiError {
    if err.is::<tower::timeout::error::Elapsed>() {
        ApiError::Unavailable(
            "The request took longer than the server's time limit; retry later.".into(),
        )
    } else if err.is::<tower::load_shed::error::Overloaded>() {
        ApiError::Unavailable("The server is at its concurrency limit; retry shortly.".into())
    } else {
        ApiError::Internal(format!("middleware error: {err}"))
    }
}
