//! The baseline for `scripts/bench.sh`: a bare axum handler on the same tokio runtime flavour as
//! `tally serve` (multi-threaded), reading the request body and answering `202 {"accepted":1}`.
//!
//! `cargo run --release -p tally-e2e --example bare_axum [ADDR]` (default `127.0.0.1:0`); prints
//! `listening on http://ADDR` as its first line, like `tally serve`.

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;

async fn accept(body: Bytes) -> (StatusCode, &'static str) {
    std::hint::black_box(body.len());
    (StatusCode::ACCEPTED, "{\"accepted\":1}")
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_string());
    let app = Router::new()
        .route("/", post(accept))
        .route("/v1/events", post(accept));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await
}
