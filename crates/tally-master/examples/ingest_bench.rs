//! Durable ingest throughput: `CLIENTS` concurrent appenders of `BATCH` events each, fsync on.
//!
//! `cargo run --release -p tally-master --example ingest_bench -- [clients] [batch] [secs] [fsync]`

// Benchmarks fail by panicking on what cannot happen on a healthy machine.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_core::Event;
use tally_master::{Master, MasterConfig};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: u64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (clients, batch, secs) = (arg(0, 50), arg(1, 100), arg(2, 5));
    let fsync = args.get(3).is_none_or(|s| s != "nofsync");
    let dir = tempfile::tempdir_in(".").unwrap();
    let m = Master::open(MasterConfig {
        data_dir: dir.path().to_path_buf(),
        seal_interval: Duration::from_secs(60),
        seal_max_events: 1_000_000,
        fsync,
        tail_capacity: 100_000,
    })
    .unwrap();
    let events = Arc::new(AtomicU64::new(0));
    let appends = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (m, events, appends) = (m.clone(), events.clone(), appends.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                let b: Vec<Event> = (0..batch)
                    .map(|k| Event {
                        ts: 1_790_000_000_000 + k as i64,
                        url: format!("http://example.com/page/{}", (c * 31 + i + k) % 500),
                        visitor: Some(format!("visitor-{}", (i * 7 + k) % 10_000)),
                        referrer: None,
                        id: None,
                        received_at: 1_790_000_000_000,
                    })
                    .collect();
                m.append(b).await.unwrap();
                events.fetch_add(batch, Ordering::Relaxed);
                appends.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let el = start.elapsed().as_secs_f64();
    let (e, a) = (
        events.load(Ordering::Relaxed),
        appends.load(Ordering::Relaxed),
    );
    println!(
        "clients={clients} batch={batch} fsync={fsync}: {:.0} events/s, {:.0} appends/s, {} events",
        e as f64 / el,
        a as f64 / el,
        e
    );
    let st = m.status();
    let left = st.acked_seq.0 - st.sealed_seq.0;
    let t = Instant::now();
    m.shutdown().await.unwrap();
    let el = t.elapsed().as_secs_f64();
    println!(
        "sealed in the background meanwhile: {}; final seal of {left} events: {el:.2} s ({:.0} events/s)",
        st.sealed_seq.0,
        left as f64 / el
    );
}
