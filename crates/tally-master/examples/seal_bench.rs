//! Parquet write/read speed of a master file: `cargo run --release -p tally-master --example seal_bench -- [events]`

// Benchmarks fail by panicking on what cannot happen on a healthy machine.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use tally_core::{Event, Seq};
use tally_master::{read_master_file, write_master_file, SeqEvent};

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let events: Vec<SeqEvent> = (1..=n)
        .map(|i| SeqEvent {
            seq: Seq(i),
            event: Event {
                ts: 1_790_000_000_000 + (i as i64 * 37) % 3_600_000,
                url: format!("http://example.com/page/{}", (i * 7919) % 5000),
                visitor: Some(format!("visitor-{}", (i * 31) % 100_000)),
                referrer: (i % 4 == 0).then(|| "https://google.com/".to_owned()),
                id: None,
                received_at: 1_790_000_000_000,
            },
        })
        .collect();
    let dir = tempfile::tempdir_in(".").unwrap();
    let t = Instant::now();
    let f = write_master_file(dir.path(), &events).unwrap();
    let w = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let back = read_master_file(&f.path).unwrap();
    let r = t.elapsed().as_secs_f64();
    assert_eq!(back.len() as u64, n);
    println!(
        "{n} events: write {w:.2} s ({:.0}/s), {} bytes ({:.1} B/event); read {r:.2} s ({:.0}/s)",
        n as f64 / w,
        f.size,
        f.size as f64 / n as f64,
        n as f64 / r
    );
}
