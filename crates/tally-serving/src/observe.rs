//! The per-request middleware (requests and latency by route template, method and status) and
//! `GET /metrics` (gauges refreshed from the state, then the Prometheus text).

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::metrics::*;
use crate::state::AppState;
use crate::views::ViewManager;

/// Counts and times every request by its route template, method and status. The metric
/// handles are kept per thread (the registry lookup and the label strings cost a few percent of a
/// cheap query otherwise). Labels stay bounded: route templates, standard methods, statuses.
pub(crate) async fn track(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().cloned();
    let method = match *req.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "OTHER",
    };
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let secs = start.elapsed().as_secs_f64();
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    HANDLES.with(|h| {
        let mut h = h.borrow_mut();
        let r = match h.get_mut(route) {
            Some(r) => r,
            None => h.entry(route.into()).or_insert_with(|| RouteHandles {
                duration: metrics::histogram!(HTTP_DURATION, "route" => route.to_string()),
                requests: HashMap::new(),
            }),
        };
        r.duration.record(secs);
        r.requests
            .entry((method, status))
            .or_insert_with(|| {
                metrics::counter!(HTTP_REQUESTS, "route" => route.to_string(), "method" => method, "status" => status.to_string())
            })
            .increment(1);
    });
    resp
}

struct RouteHandles {
    duration: metrics::Histogram,
    requests: HashMap<(&'static str, u16), metrics::Counter>,
}

thread_local! {
    static HANDLES: RefCell<HashMap<Box<str>, RouteHandles>> = RefCell::new(HashMap::new());
}

/// `GET /metrics`: refreshes the gauges, then renders the Prometheus text.
pub(crate) async fn render(State(state): State<AppState>) -> Response {
    let m = state.master.status();
    metrics::gauge!(ACKED_SEQ).set(m.acked_seq.get() as f64);
    metrics::gauge!(SEALED_SEQ).set(m.sealed_seq.get() as f64);
    let unsealed_since = state.master.oldest_unsealed_received_at();
    let seal_lag_ms = unsealed_since.map_or(0, |t| (tally_core::now_ms() - t).max(0));
    metrics::gauge!(SEAL_LAG_SECONDS).set(seal_lag_ms as f64 / 1000.0);
    metrics::gauge!(WAL_BYTES).set(m.wal_bytes as f64);
    let applied = state.speed.applied_seq();
    metrics::gauge!(SPEED_APPLIED_SEQ).set(applied.get() as f64);
    // Counted, not subtracted: in cluster mode `seq`s have gaps.
    metrics::gauge!(SPEED_LAG_EVENTS).set(state.master.events_between(applied, m.acked_seq) as f64);
    metrics::gauge!(REDIS_UP).set(if state.speed.redis_up() { 1.0 } else { 0.0 });
    metrics::gauge!(MASTER_FILES).set(m.master_files as f64);
    metrics::gauge!(STOPPED_THREADS).set(state.master.stopped_threads().len() as f64);
    let speed = state.speed.stats();
    metrics::counter!(REDIS_ERRORS).absolute(speed.errors);
    metrics::counter!(SPEED_APPLIES).absolute(speed.applies);
    metrics::counter!(SPEED_EVENTS_APPLIED).absolute(speed.events_applied);
    metrics::counter!(SPEED_REBUILDS).absolute(speed.rebuilds);
    metrics::counter!(SPEED_COLLECTIONS).absolute(speed.collections);
    metrics::counter!(SPEED_RESYNCS).absolute(speed.resyncs);
    metrics::gauge!(REDIS_LAG_EVENTS).set(
        state
            .master
            .events_between(state.speed.redis_applied_seq(), applied) as f64,
    );
    let view = state.views.current();
    let exact = state.speed.covers(ViewManager::cutoff(view.as_ref()));
    metrics::gauge!(VIEW_EXACT).set(if exact { 1.0 } else { 0.0 });
    metrics::gauge!(VIEW_CUTOFF_SEQ).set(ViewManager::cutoff(view.as_ref()).get() as f64);
    if let Some(v) = &view {
        let age = (tally_core::now_ms() - v.computed_at_ms).max(0) as f64 / 1000.0;
        metrics::gauge!(VIEW_AGE_SECONDS).set(age);
    }
    let text = (state.render_metrics)();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
