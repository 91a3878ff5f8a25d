//! Generates a master dataset and times the batch kernel per stage (`--help` for the usage).
//!
//! ```text
//! cargo run --release -p tally-batch --example batch_bench -- \
//!     --events 5000000 --urls 100000 --days 90 --dir DIR [--generate-only] \
//!     [--url-dict-limit BYTES] [--files 5] [--reps 3] [--sketch-precision 14] [--no-write] [--no-sketches|--only-sketches|--sources]
//! ```
//! Writes `DIR/master/*.parquet` (seq ranges of `events/files` events each, rows sorted by
//! (url, ts), URLs Zipf(1.0)-skewed over 50 hosts, 90% of events with a visitor id). Without
//! `--generate-only` it then times `compute` without and with sketches, the view write and the
//! view load, and prints one JSON object per measurement.
//!
//! `--incremental` instead times, with sketches, the counts and the sources passes of a run:
//! scanning every file without a cache, a first cached run (which writes the partials), a run
//! with one new file (its partials deleted), and a run with nothing new — the same view each time.
//!
//! `--serving` computes both passes as the runner does, writes the view and loads it in a fresh
//! process (`--load-view`), printing the resident set before and after the load.

/// The allocator of the `tally` binary, so that the kernel is timed as it runs there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Instant;

use tally_batch::{
    compute, compute_cached, compute_sources, compute_sources_cached, PartialCache, Progress,
    ViewStore,
};
use tally_core::{Seq, DAY_MS};
use tally_master::MasterFile;
use tally_testing::{write_master_file_with, MasterRow, Rng};

struct Args {
    events: u64,
    urls: u64,
    days: u64,
    files: u64,
    dir: PathBuf,
    generate_only: bool,
    reps: usize,
    precision: u8,
    write: bool,
    modes: Vec<&'static str>,
    url_dict_limit: usize,
    incremental: bool,
    serving: bool,
    load_view: bool,
}

const USAGE: &str = "usage: batch_bench --dir DIR [--events N] [--urls N] [--days N] [--files N] \
[--generate-only] [--url-dict-limit BYTES] [--reps N] [--sketch-precision P] [--no-write] \
[--no-sketches|--only-sketches|--sources] [--incremental] [--serving]";

/// Stops with `why` and the usage (exit 2): a mistyped argument is the user's, not a crash.
fn usage_error(why: &str) -> ! {
    eprintln!("{why}\n{USAGE}");
    std::process::exit(2)
}

fn parse() -> Args {
    let mut dir = None;
    let mut a = Args {
        events: 5_000_000,
        urls: 100_000,
        days: 90,
        files: 5,
        dir: PathBuf::new(),
        generate_only: false,
        reps: 3,
        precision: 14,
        write: true,
        modes: vec!["counts", "counts+sketches"],
        url_dict_limit: 256 << 20,
        incremental: false,
        serving: false,
        load_view: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--events" => a.events = val().parse().expect("--events"),
            "--urls" => a.urls = val().parse().expect("--urls"),
            "--days" => a.days = val().parse().expect("--days"),
            "--files" => a.files = val().parse().expect("--files"),
            "--dir" => dir = Some(PathBuf::from(val())),
            "--reps" => a.reps = val().parse().expect("--reps"),
            "--sketch-precision" => a.precision = val().parse().expect("--sketch-precision"),
            "--generate-only" => a.generate_only = true,
            "--no-write" => a.write = false,
            "--url-dict-limit" => a.url_dict_limit = val().parse().expect("--url-dict-limit"),
            "--no-sketches" => a.modes = vec!["counts"],
            "--only-sketches" => a.modes = vec!["counts+sketches"],
            // The breakdown data (per (referrer host, URL)) beside the per-URL counts.
            "--incremental" => a.incremental = true,
            "--serving" => a.serving = true,
            "--load-view" => a.load_view = true,
            "--sources" => {
                a.modes = vec!["counts", "sources", "counts+sketches", "sources+sketches"]
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0)
            }
            other => usage_error(&format!("unknown argument {other}")),
        }
    }
    // No default: the run deletes and rewrites `DIR/master`.
    a.dir = dir.unwrap_or_else(|| usage_error("--dir is required"));
    a
}

fn generate(a: &Args) -> Vec<MasterFile> {
    let master = a.dir.join("master");
    let _ = std::fs::remove_dir_all(&master);
    let t = Instant::now();
    // Zipf(1.0) CDF over URL ranks.
    let mut cdf = Vec::with_capacity(a.urls as usize);
    let mut acc = 0.0;
    for r in 0..a.urls {
        acc += 1.0 / (r as f64 + 1.0);
        cdf.push(acc);
    }
    let names: Vec<String> = (0..a.urls)
        .map(|r| {
            format!(
                "https://site{}.example.com/articles/{:x}/page-{r}",
                r % 50,
                r.wrapping_mul(2654435761) % 1_000_003
            )
        })
        .collect();
    let start = 1_760_000_000_000i64 - (1_760_000_000_000i64 % DAY_MS);
    let span = (a.days as i64) * DAY_MS;
    let mut rng = Rng::new(42);
    let per_file = a.events.div_ceil(a.files.max(1));
    let mut out = Vec::new();
    let mut seq = 1u64;
    while seq <= a.events {
        let last = (seq + per_file - 1).min(a.events);
        let mut rows = Vec::with_capacity((last - seq + 1) as usize);
        for s in seq..=last {
            let x = rng.unit() * acc;
            let r = cdf.partition_point(|&c| c < x).min(a.urls as usize - 1);
            // Time grows with seq (with an hour of jitter), like real ingestion.
            let ts = start + ((s as f64 / a.events as f64) * span as f64) as i64
                - rng.below(3_600_000) as i64;
            let visitor =
                (rng.below(10) != 0).then(|| format!("visitor-{:08x}", rng.below(2_000_000)));
            // Most views direct, the rest from a few hundred referrer pages.
            let referrer = (rng.below(10) < 4)
                .then(|| format!("https://ref{}.example/p/{}", rng.below(200), rng.below(50)));
            rows.push(MasterRow {
                seq: s,
                ts,
                url: names[r].clone(),
                visitor,
                referrer,
            });
        }
        out.push(
            write_master_file_with(&master, rows, 1 << 20, a.url_dict_limit)
                .expect("write master file"),
        );
        seq = last + 1;
    }
    let bytes: u64 = out.iter().map(|f| f.size).sum();
    println!(
        "{{\"stage\":\"generate\",\"events\":{},\"urls\":{},\"days\":{},\"files\":{},\"bytes\":{},\"ms\":{:.1}}}",
        a.events,
        a.urls,
        a.days,
        out.len(),
        bytes,
        t.elapsed().as_secs_f64() * 1000.0
    );
    out
}

fn existing(a: &Args) -> Vec<MasterFile> {
    let master = a.dir.join("master");
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&master) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(stem) = name.strip_suffix(".parquet") else {
                continue;
            };
            let Some((f, l)) = stem.split_once('-') else {
                continue;
            };
            let (Some(first), Some(last)) = (Seq::parse_padded(f), Seq::parse_padded(l)) else {
                continue;
            };
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            out.push(MasterFile {
                path: e.path(),
                first,
                last,
                size,
            });
        }
    }
    out.sort_by_key(|f| f.first);
    out
}

fn main() {
    let a = parse();
    if a.load_view {
        load_view(&a);
        return;
    }
    let mut files = existing(&a);
    if a.generate_only || files.is_empty() {
        files = generate(&a);
    }
    if a.generate_only {
        return;
    }
    let cutoff = files.iter().map(|f| f.last).max().unwrap_or(Seq::ZERO);
    if a.incremental {
        incremental(&a, &files, cutoff);
        return;
    }
    if a.serving {
        serving(&a, &files, cutoff);
        return;
    }
    for label in a.modes.clone() {
        let precision = label.ends_with("+sketches").then_some(a.precision);
        let kernel = if label.starts_with("sources") {
            compute_sources
        } else {
            compute
        };
        for rep in 0..a.reps {
            let t = Instant::now();
            let data = kernel(&files, cutoff, precision, &Progress::new()).expect("compute");
            let compute_ms = t.elapsed().as_secs_f64() * 1000.0;
            let s = &data.stats;
            let mut line = format!(
                "{{\"stage\":\"compute\",\"mode\":\"{label}\",\"rep\":{rep},\"events\":{},\"urls\":{},\"cells\":{},\"compute_ms\":{compute_ms:.1},\"open_ms\":{:.1},\"scan_ms\":{:.1},\"read_decode_cpu_ms\":{:.1},\"aggregate_cpu_ms\":{:.1},\"merge_ms\":{:.1},\"url_dictionaries\":{}",
                data.events,
                data.urls.len(),
                data.cells(),
                s.open_wall_ms,
                s.scan_wall_ms,
                s.read_decode_cpu_ms,
                s.aggregate_cpu_ms,
                s.merge_wall_ms,
                s.url_dictionaries
            );
            if let Some(sk) = &data.sketches {
                // What the visitors hold: day sketches, and per (key, cell) its visitor list
                // (4 bytes per visitor and 4 per cell).
                line += &format!(
                    ",\"day_sketches\":{},\"cell_visitor_hashes\":{}",
                    sk.sketches.len(),
                    sk.cell_hashes.len()
                );
            }
            if a.write && rep == a.reps - 1 {
                let root = a
                    .dir
                    .join(format!("views-bench-{}", label.replace('+', "-")));
                let _ = std::fs::remove_dir_all(&root);
                let store = ViewStore::open(&root).expect("store");
                let t = Instant::now();
                let info = store
                    .write(&data, cutoff, tally_core::now_ms())
                    .expect("write");
                let write_ms = t.elapsed().as_secs_f64() * 1000.0;
                let t = Instant::now();
                let view = store.load(&info.version).expect("load");
                let load_ms = t.elapsed().as_secs_f64() * 1000.0;
                assert_eq!(view.events, data.events);
                line += &format!(
                    ",\"write_ms\":{write_ms:.1},\"view_bytes\":{},\"load_ms\":{load_ms:.1},\"recompute_total_ms\":{:.1}",
                    info.size_bytes,
                    compute_ms + write_ms
                );
            }
            println!("{line}}}");
        }
    }
}

/// The runs of an incremental batch layer over `files`, timed per keying.
fn incremental(a: &Args, files: &[MasterFile], cutoff: Seq) {
    let parts = a.dir.join("partials-bench");
    let _ = std::fs::remove_dir_all(&parts);
    let p = Some(a.precision);
    let newest = files.iter().map(|f| f.first).max().unwrap_or(Seq::ZERO);
    for (label, uncached, cached) in [
        ("counts", compute as Kernel, compute_cached as Cached),
        ("sources", compute_sources, compute_sources_cached),
    ] {
        let t = Instant::now();
        let reference = uncached(files, cutoff, p, &Progress::new()).expect("compute");
        let scan_ms = t.elapsed().as_secs_f64() * 1000.0;
        // A digest, not the view: a run holds one view at a time, as the runner does.
        let (events, reference) = (reference.events, digest(&reference));
        let run = |full: bool| {
            let cache = PartialCache::open(&parts, full).expect("partials");
            let t = Instant::now();
            let data = cached(files, cutoff, p, &Progress::new(), Some(&cache)).expect("compute");
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            assert_eq!(
                digest(&data),
                reference,
                "a cached run gives the scan's view"
            );
            (ms, data.stats)
        };
        let (first_ms, _) = run(true);
        let partial_bytes: u64 = std::fs::read_dir(&parts)
            .expect("partials dir")
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(if label == "counts" { "url-" } else { "src-" })
            })
            .map(|e| e.metadata().map_or(0, |m| m.len()))
            .sum();
        // One new file: the newest file's partial is gone.
        for e in std::fs::read_dir(&parts).expect("partials dir").flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(&format!("-{:020}-", newest.get())) {
                std::fs::remove_file(e.path()).expect("remove partial");
            }
        }
        let (one_new_ms, s1) = run(false);
        let (none_new_ms, s0) = run(false);
        println!(
            "{{\"stage\":\"incremental\",\"mode\":\"{label}+sketches\",\"files\":{},\"events\":{},\"scan_all_ms\":{scan_ms:.1},\"first_cached_run_ms\":{first_ms:.1},\"partial_bytes\":{partial_bytes},\"one_new_file_ms\":{one_new_ms:.1},\"one_new_file_reused\":{},\"one_new_file_merge_ms\":{:.1},\"nothing_new_ms\":{none_new_ms:.1},\"nothing_new_merge_ms\":{:.1}}}",
            files.len(),
            events,
            s1.files_reused,
            s1.merge_wall_ms,
            s0.merge_wall_ms,
        );
    }
}

/// The resident set of this process, in bytes (Linux; 0 elsewhere).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A whole view as the runner makes it (both passes, with sketches), written, then loaded
/// the way `tally serve` loads it: the serving memory per (key, cell).
fn serving(a: &Args, files: &[MasterFile], cutoff: Seq) {
    let p = Some(a.precision);
    let t = Instant::now();
    let mut data = compute(files, cutoff, p, &Progress::new()).expect("compute");
    let sources = compute_sources(files, cutoff, p, &Progress::new()).expect("compute sources");
    data.sources = Some(Box::new(sources));
    let compute_ms = t.elapsed().as_secs_f64() * 1000.0;
    let root = a.dir.join("views-bench-serving");
    let _ = std::fs::remove_dir_all(&root);
    let store = ViewStore::open(&root).expect("store");
    let t = Instant::now();
    let info = store
        .write(&data, cutoff, tally_core::now_ms())
        .expect("write");
    let write_ms = t.elapsed().as_secs_f64() * 1000.0;
    let url_cells = data.cells();
    let source_cells = data.sources.as_ref().map_or(0, |s| s.cells());
    let cell_hashes = data.sketches.as_ref().map_or(0, |s| s.cell_hashes.len())
        + data
            .sources
            .as_ref()
            .and_then(|s| s.sketches.as_ref())
            .map_or(0, |s| s.cell_hashes.len());
    drop(data);
    println!(
        "{{\"stage\":\"serving-write\",\"events\":{},\"compute_ms\":{compute_ms:.1},\"write_ms\":{write_ms:.1},\"view_bytes\":{},\"url_cells\":{url_cells},\"source_cells\":{source_cells},\"cell_visitor_hashes\":{cell_hashes}}}",
        info.events, info.size_bytes,
    );
    // Loaded in a process of its own, as `tally serve` starts: this one's freed pages would
    // blur the measurement.
    let status = std::process::Command::new(std::env::current_exe().expect("own path"))
        .arg("--dir")
        .arg(&a.dir)
        .arg("--load-view")
        .status()
        .expect("run --load-view");
    assert!(status.success(), "--load-view failed");
}

/// Loads the newest view `--serving` wrote and prints the resident set before and after.
fn load_view(a: &Args) {
    let store = ViewStore::open(a.dir.join("views-bench-serving")).expect("store");
    let version = store.newest_good().expect("list").expect("a view to load");
    let before = rss_bytes();
    let t = Instant::now();
    let view = store.load(&version).expect("load");
    let load_ms = t.elapsed().as_secs_f64() * 1000.0;
    let after = rss_bytes();
    println!(
        "{{\"stage\":\"serving-load\",\"events\":{},\"load_ms\":{load_ms:.1},\"url_cells\":{},\"rss_before_load\":{before},\"rss_after_load\":{after}}}",
        view.events,
        view.cells(),
    );
}

/// BLAKE3 over everything a view holds.
fn digest(v: &tally_batch::ViewData) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    for u in &v.urls {
        h.update(&(u.len() as u64).to_le_bytes());
        h.update(u.as_bytes());
    }
    let mut ints = |xs: &mut dyn Iterator<Item = u64>| {
        for x in xs {
            h.update(&x.to_le_bytes());
        }
    };
    ints(&mut v.offsets.iter().map(|&x| x as u64));
    ints(&mut v.cell.iter().map(|&x| x as u64));
    ints(&mut v.views.iter().copied());
    if let Some(s) = &v.sketches {
        ints(&mut s.offsets.iter().map(|&x| x as u64));
        ints(&mut s.days.iter().map(|&x| x as u64));
        ints(&mut s.cell_offsets.iter().map(|&x| u64::from(x)));
        ints(&mut s.cell_hashes.iter().map(|&x| u64::from(x)));
        for sk in &s.sketches {
            h.update(&sk.to_bytes());
        }
    }
    h.finalize()
}

type Kernel =
    fn(&[MasterFile], Seq, Option<u8>, &Progress) -> tally_batch::Result<tally_batch::ViewData>;
type Cached = fn(
    &[MasterFile],
    Seq,
    Option<u8>,
    &Progress,
    Option<&PartialCache>,
) -> tally_batch::Result<tally_batch::ViewData>;
