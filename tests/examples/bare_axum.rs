//! The baseline for `scripts/bench.sh`: a bare axum handler on the same tokio runtime flavour as
//! `tally serve` (multi-threaded), reading the request body and answering `202 {"accepted":1}`;
//! for query benchmarks, `GET /v1/views` answers a fixed JSON body of the size of tally's.
//!
//! `cargo run --release -p tally-e2e --example bare_axum [ADDR]` (default `127.0.0.1:0`); prints
//! `listening on http://ADDR` as its first line, like `tally serve`.

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;

async fn accept(body: Bytes) -> (StatusCode, &'static str) {
    std::hint::black_box(body.len());
    (StatusCode::ACCEPTED, "{\"accepted\":1}")
}

async fn views() -> ([(&'static str, &'static str); 1], &'static str) {
    (
        [("content-type", "application/json")],
        r#"{"batch":{"computed_at":"2026-11-22T00:50:45.272Z","cutoff_seq":900000,"version":"00000000000000900000-1795308645272"},"batch_views":111,"from":"0001-01-01T00:00:00Z","speed_available":true,"speed_views":10,"to":"2026-11-22T01:00:00Z","url":"https://h1.bench/p/1","views":121}"#,
    )
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_string());
    let app = Router::new()
        .route("/", post(accept))
        .route("/v1/events", post(accept))
        .route("/v1/views", get(views));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await
}
