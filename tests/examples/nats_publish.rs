//! The reference of `scripts/bench.sh cluster`: raw JetStream publish throughput, with the
//! message size and concurrency tally's cluster ingest has, and nothing else (no HTTP, no
//! parsing, no WAL). Publishes `--size`-byte messages, each with its own `Nats-Msg-Id`, from
//! `--concurrency` tasks that each wait for JetStream's acknowledgement before the next
//! publish (as a tally request waits), for `--seconds`, to a fresh stream `bench_raw`; prints
//! one JSON line: `{"messages", "seconds", "msgs_per_s", "bytes_per_s", "size", "concurrency"}`.
//!
//!   nats_publish --url nats://127.0.0.1:PORT [--size 85000] [--concurrency 24] [--seconds 10]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage, stream};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> Result<(), async_nats::Error> {
    let args: Vec<String> = std::env::args().collect();
    let Some(url) = arg(&args, "--url") else {
        eprintln!("usage: nats_publish --url nats://HOST:PORT [--size BYTES] [--concurrency N] [--seconds S]");
        std::process::exit(2);
    };
    let number = |name: &str, default: u64| -> u64 {
        arg(&args, name).map_or(default, |v| {
            v.parse().unwrap_or_else(|_| {
                eprintln!("{name} must be a number, not {v:?}");
                std::process::exit(2)
            })
        })
    };
    let size = number("--size", 85_000) as usize;
    let concurrency = number("--concurrency", 24);
    let seconds = number("--seconds", 10);

    let client = async_nats::connect(url.as_str()).await?;
    let js = jetstream::new(client);
    let _ = js.delete_stream("bench_raw").await;
    js.create_stream(stream::Config {
        name: "bench_raw".into(),
        subjects: vec!["bench_raw.events".into()],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    let payload = bytes_of(size);
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (js, payload, sent) = (js.clone(), payload.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < until {
                let ack = js
                    .send_publish(
                        "bench_raw.events",
                        PublishMessage::build()
                            .payload(payload.clone())
                            .message_id(format!("{t}-{i}")),
                    )
                    .await?;
                ack.await?;
                sent.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            Ok::<(), async_nats::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let n = sent.load(Ordering::Relaxed);
    println!(
        "{{\"messages\":{n},\"seconds\":{secs:.3},\"msgs_per_s\":{:.1},\"bytes_per_s\":{:.0},\"size\":{size},\"concurrency\":{concurrency}}}",
        n as f64 / secs,
        (n as f64 * size as f64) / secs
    );
    let _ = js.delete_stream("bench_raw").await;
    Ok(())
}

/// `size` bytes of varied content (as encoded events are).
fn bytes_of(size: usize) -> bytes::Bytes {
    (0..size)
        .map(|i| (i as u64).wrapping_mul(2_654_435_761) as u8)
        .collect::<Vec<u8>>()
        .into()
}
