//! Integration tests of the batch layer on real files in a temporary directory.

// Test helpers fail by panicking, as the tests do.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use tally_batch::store::{ViewStatus, COUNTS_FILE, MANIFEST_FILE};
use tally_batch::{
    compute, compute_cached, compute_sources, compute_sources_cached, BatchView, Error,
    PartialCache, Progress, ViewStore,
};
use tally_core::{Seq, CELL_MS, DAY_MS, HOUR_MS};
use tally_master::MasterFile;
use tally_testing::{write_master_file, MasterRow, Rng};

const BASE_MS: i64 = 1_763_700_000_000; // 2025-11-21

struct Dataset {
    files: Vec<MasterFile>,
    rows: Vec<MasterRow>,
}

fn urls() -> Vec<String> {
    let hosts = [
        "a.example.com",
        "b.example.com",
        "c.example.org",
        "[::1]:8080",
    ];
    let mut out = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        for j in 0..(5 + 3 * i) {
            out.push(match j % 4 {
                // Campaign links, for the UTM dimensions.
                0 => format!(
                    "http://{h}/p/{j}?utm_source=s{}&utm_medium=email&utm_campaign=c{}",
                    j % 3,
                    j % 2
                ),
                _ => format!("http://{h}/p/{j}?q={}", j % 3),
            });
        }
    }
    out
}

/// Random events, seq 1..=n, several files, small row groups.
fn dataset(dir: &Path, seed: u64, n: u64, nfiles: u64) -> Dataset {
    let mut rng = Rng::new(seed);
    let urls = urls();
    let mut rows = Vec::new();
    for seq in 1..=n {
        // Skewed URL choice, hours spread over ~10 days, some exactly on hour boundaries.
        let u = (rng.below(urls.len() as u64) * rng.below(urls.len() as u64) / urls.len() as u64)
            as usize;
        let hour = rng.below(240) as i64;
        let ts = BASE_MS - BASE_MS % HOUR_MS
            + hour * HOUR_MS
            + if rng.below(5) == 0 {
                0
            } else {
                rng.below(HOUR_MS as u64) as i64
            };
        let visitor = (rng.below(4) != 0).then(|| format!("v{}", rng.below(40)));
        // Direct, two search pages of one engine, another site, the page's own site, garbage.
        let referrer = [
            None,
            None,
            Some("https://www.google.com/search?q=a"),
            Some("https://google.com/search?q=b"),
            Some("http://news.test/item?id=1"),
            Some("http://a.example.com/p/1"),
            Some("not a url"),
        ][rng.below(7) as usize]
            .map(str::to_string);
        rows.push(MasterRow {
            seq,
            ts,
            url: urls[u].clone(),
            visitor,
            referrer,
        });
    }
    let per = n.div_ceil(nfiles);
    let mut files = Vec::new();
    for chunk in rows.chunks(per as usize) {
        let rg = 1 + rng.below(chunk.len() as u64 / 2 + 1) as usize;
        files.push(write_master_file(&dir.join("master"), chunk.to_vec(), rg).unwrap());
    }
    Dataset { files, rows }
}

struct Model {
    cells: BTreeMap<String, BTreeMap<i64, u64>>,
    /// (referrer host, url) → cell → views.
    sources: BTreeMap<(String, String), BTreeMap<i64, u64>>,
    /// (referrer host, url, cell) → visitors.
    source_visitors: HashMap<(String, String, i64), BTreeSet<String>>,
    /// (url, cell) → visitors.
    visitors: HashMap<(String, i64), BTreeSet<String>>,
    events: u64,
}

fn model(rows: &[MasterRow], cutoff: u64) -> Model {
    let mut m = Model {
        cells: BTreeMap::new(),
        sources: BTreeMap::new(),
        source_visitors: HashMap::new(),
        visitors: HashMap::new(),
        events: 0,
    };
    for r in rows.iter().filter(|r| r.seq <= cutoff) {
        m.events += 1;
        let key = (
            tally_core::dims::referrer_host(&r.url, r.referrer.as_deref()),
            r.url.clone(),
        );
        *m.sources
            .entry(key.clone())
            .or_default()
            .entry(r.ts.div_euclid(CELL_MS))
            .or_default() += 1;
        if let Some(v) = &r.visitor {
            m.source_visitors
                .entry((key.0, key.1, r.ts.div_euclid(CELL_MS)))
                .or_default()
                .insert(v.clone());
        }
        *m.cells
            .entry(r.url.clone())
            .or_default()
            .entry(r.ts.div_euclid(CELL_MS))
            .or_default() += 1;
        if let Some(v) = &r.visitor {
            m.visitors
                .entry((r.url.clone(), r.ts.div_euclid(CELL_MS)))
                .or_default()
                .insert(v.clone());
        }
    }
    m
}

fn check_view(view: &BatchView, m: &Model, seed: u64) {
    let mut rng = Rng::new(seed ^ 0xabc);
    assert_eq!(view.events, m.events);
    assert_eq!(view.urls as usize, m.cells.len());
    let all_cells: Vec<i64> = m.cells.values().flat_map(|h| h.keys().copied()).collect();
    let (lo, hi) = (
        *all_cells.iter().min().unwrap() - 3,
        *all_cells.iter().max().unwrap() + 3,
    );
    for _ in 0..300 {
        let a = lo + rng.below((hi - lo) as u64) as i64;
        let b = a + rng.below((hi - a) as u64 + 1) as i64;
        let host =
            ["a.example.com", "c.example.org", "[::1]", "nope.example"][rng.below(4) as usize];
        // range_views and cell_counts for every URL, plus an unknown one.
        for (url, cells) in &m.cells {
            let expect: Vec<(i64, u64)> = cells.range(a..b.max(a)).map(|(&h, &c)| (h, c)).collect();
            assert_eq!(
                view.range_views(url, a, b),
                expect.iter().map(|x| x.1).sum::<u64>(),
                "{url} [{a},{b})"
            );
            assert_eq!(view.cell_counts(url, a, b), expect);
        }
        assert_eq!(view.range_views("http://unknown.example/", a, b), 0);
        check_sources(view, m, host, (a, b));
        check_urls(view, m, host, (a, b));
        // range_totals with and without host.
        for h in [None, Some(host)] {
            let mut got = BTreeMap::new();
            view.range_totals(a, b, h, |u, v| {
                assert!(got.insert(u.to_string(), v).is_none());
            });
            let expect: BTreeMap<String, u64> = m
                .cells
                .iter()
                .filter(|(u, _)| h.is_none() || tally_core::url::host_of(u) == h)
                .map(|(u, hs)| (u.clone(), hs.range(a..b.max(a)).map(|x| *x.1).sum::<u64>()))
                .filter(|x| x.1 > 0)
                .collect();
            assert_eq!(got, expect, "range_totals {h:?} [{a},{b})");
        }
    }
    // totals_desc: views desc, then url asc.
    let mut expect: Vec<(String, u64)> = m
        .cells
        .iter()
        .map(|(u, h)| (u.clone(), h.values().sum()))
        .collect();
    expect.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    let got: Vec<(String, u64)> = view
        .totals_desc()
        .map(|(u, v)| (u.to_string(), v))
        .collect();
    assert_eq!(got, expect);
    // Sketches (sparse, so exact here) per day, and visitors over any range of cells — whole
    // UTC days or not (the local days of Asia/Kolkata start at 18:30Z).
    if let Some(p) = view.sketch_precision() {
        let cells_per_day = DAY_MS / CELL_MS;
        let union_of = |url: &str, a: i64, b: i64| -> usize {
            let mut union = BTreeSet::new();
            for ((u, c), s) in &m.visitors {
                if u == url && (a..b).contains(c) {
                    union.extend(s.iter().cloned());
                }
            }
            union.len()
        };
        let (c0, c1) = (lo - cells_per_day, hi + cells_per_day);
        let (d0, d1) = (
            c0.div_euclid(cells_per_day),
            c1.div_euclid(cells_per_day) + 1,
        );
        for url in m.cells.keys() {
            for d in d0..d1 {
                let want = union_of(url, d * cells_per_day, (d + 1) * cells_per_day);
                assert_eq!(
                    view.day_sketch(url, d).map_or(0, |s| s.estimate() as usize),
                    want,
                    "{url} day {d}"
                );
            }
            for _ in 0..20 {
                let a = c0 + rng.below((c1 - c0) as u64) as i64;
                let b = a + rng.below((c1 - a) as u64 + 1) as i64;
                let got = view
                    .uniques_sketch(url, (a, b), p, None, &[])
                    .unwrap()
                    .estimate() as usize;
                assert_eq!(got, union_of(url, a, b), "{url} cells [{a},{b})");
            }
        }
        // A site's visitors are its pages' united, over any range of cells.
        let hosts: BTreeSet<&str> = m
            .cells
            .keys()
            .filter_map(|u| tally_core::url::host_of(u))
            .collect();
        for host in hosts {
            for _ in 0..20 {
                let a = c0 + rng.below((c1 - c0) as u64) as i64;
                let b = a + rng.below((c1 - a) as u64 + 1) as i64;
                let mut pieces = tally_batch::Pieces::default();
                view.site_visitors(host).collect(a, b, &mut pieces);
                let got = pieces.union(p, None, &[]).unwrap().estimate() as usize;
                let mut union = BTreeSet::new();
                for ((u, c), s) in &m.visitors {
                    if tally_core::url::host_of(u) == Some(host) && (a..b).contains(c) {
                        union.extend(s.iter().cloned());
                    }
                }
                assert_eq!(got, union.len(), "site {host} cells [{a},{b})");
            }
        }
    }
}

/// The view's source keys of `host` in the cells `[a, b)` (and their visitors in those cells)
/// equal the model's, with and without a URL filter.
fn check_sources(view: &BatchView, m: &Model, host: &str, (a, b): (i64, i64)) {
    let some_url = m
        .cells
        .keys()
        .find(|u| tally_core::url::host_of(u) == Some(host));
    for url in [None, some_url.map(String::as_str)] {
        let mut got = BTreeMap::new();
        for c in view.sources_of(host, url, (a, b)) {
            let visitors = view.sketch_precision().map(|p| {
                let mut pieces = tally_batch::Pieces::default();
                view.source_visitors(c.key).collect(a, b, &mut pieces);
                pieces.union(p, None, &[]).unwrap().estimate() as usize
            });
            let key = (c.referrer.to_string(), c.url.to_string());
            assert!(got.insert(key, (c.views, visitors)).is_none());
        }
        let want: BTreeMap<(String, String), (u64, Option<usize>)> = m
            .sources
            .iter()
            .filter(|((_, u), _)| tally_core::url::host_of(u) == Some(host))
            .filter(|((_, u), _)| url.is_none_or(|f| f == u))
            .map(|(k, cells)| {
                let views = cells.range(a..b.max(a)).map(|x| *x.1).sum::<u64>();
                let mut union = BTreeSet::new();
                for c in a..b {
                    if let Some(s) = m.source_visitors.get(&(k.0.clone(), k.1.clone(), c)) {
                        union.extend(s.iter().cloned());
                    }
                }
                let visitors = view.sketch_precision().map(|_| union.len());
                (k.clone(), (views, visitors))
            })
            .filter(|x| x.1 .0 > 0)
            .collect();
        assert_eq!(got, want, "sources of {host} {url:?} [{a},{b})");
    }
}

/// A site's URLs give what the model gives for their source keys together (views, per-cell
/// views, distinct visitors): what a grouping by a function of the URL alone reads.
fn check_urls(view: &BatchView, m: &Model, host: &str, (a, b): (i64, i64)) {
    let estimate = |k: tally_batch::KeyVisitors<'_>| {
        view.sketch_precision().map(|p| {
            let mut pieces = tally_batch::Pieces::default();
            k.collect(a, b, &mut pieces);
            pieces.union(p, None, &[]).unwrap().estimate() as usize
        })
    };
    type Want = BTreeMap<String, (u64, Vec<(i64, u64)>, Option<usize>)>;
    let want_of = |value_of: &dyn Fn(&str, &str) -> String| -> Want {
        let mut cells: BTreeMap<String, BTreeMap<i64, u64>> = BTreeMap::new();
        let mut visitors: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for ((referrer, url), c) in &m.sources {
            if tally_core::url::host_of(url) != Some(host) {
                continue;
            }
            let v = value_of(url, referrer);
            for (&cell, &n) in c.range(a..b.max(a)) {
                *cells.entry(v.clone()).or_default().entry(cell).or_default() += n;
                let who = m
                    .source_visitors
                    .get(&(referrer.clone(), url.clone(), cell));
                let set = visitors.entry(v.clone()).or_default();
                set.extend(who.into_iter().flatten().cloned());
            }
        }
        cells
            .into_iter()
            .map(|(v, c)| {
                let uniques = view.sketch_precision().map(|_| visitors[&v].len());
                let list: Vec<(i64, u64)> = c.into_iter().collect();
                (v, (list.iter().map(|x| x.1).sum(), list, uniques))
            })
            .collect()
    };
    let mut got = Want::new();
    for u in view.urls_of(host, None, (a, b)) {
        let entry = (
            u.views,
            u.cell_views().collect(),
            estimate(view.url_visitors(u.key)),
        );
        assert!(got.insert(u.url.to_string(), entry).is_none());
    }
    assert_eq!(
        got,
        want_of(&|url, _| url.to_string()),
        "urls of {host} [{a},{b})"
    );
    if let Some((url, _)) = got.iter().next() {
        let one: Vec<&str> = view
            .urls_of(host, Some(url), (a, b))
            .map(|u| u.url)
            .collect();
        assert_eq!(one, [url.as_str()]);
        assert_eq!(view.urls_of("elsewhere.test", Some(url), (a, b)).count(), 0);
    }
}

#[test]
fn kernel_and_view_match_reference_model() {
    for seed in 1..=4u64 {
        let dir = tempfile::tempdir().unwrap();
        let n = 3000 + seed * 500;
        let ds = dataset(dir.path(), seed, n, 4);
        // A cutoff in the middle of the second file.
        let f = &ds.files[1];
        let cutoff = (f.first.get() + f.last.get()) / 2;
        let m = model(&ds.rows, cutoff);
        let progress = Progress::new();
        let sketches = (seed % 2 == 1).then_some(10);
        let mut data = compute(&ds.files, Seq(cutoff), sketches, &progress).unwrap();
        assert_eq!(data.events, m.events);
        let sources = compute_sources(&ds.files, Seq(cutoff), sketches, &Progress::new()).unwrap();
        assert_eq!(sources.events, m.events);
        assert!(sources.urls.len() > data.urls.len());
        data.sources = Some(Box::new(sources));
        let p = progress.snapshot();
        assert_eq!(
            (p.files_done, p.files_total, p.events_done),
            (2, 2, m.events)
        );
        let mem = BatchView::from_data("mem".into(), Seq(cutoff), 0, data.clone());
        check_view(&mem, &m, seed);

        // Round trip through the store gives the same answers.
        let store = ViewStore::open(dir.path().join("views/batch")).unwrap();
        let info = store.write(&data, Seq(cutoff), 1_000).unwrap();
        let loaded = store.load(&info.version).unwrap();
        assert_eq!(loaded.cutoff_seq, Seq(cutoff));
        check_view(&loaded, &m, seed);

        // Every event (cutoff beyond the last file) and a cutoff before everything.
        let all = compute(&ds.files, Seq(n + 10), None, &Progress::new()).unwrap();
        assert_eq!(all.events, n);
        let none = compute(&ds.files, Seq::ZERO, None, &Progress::new()).unwrap();
        assert_eq!((none.events, none.urls.len()), (0, 0));
    }
}

/// The data of two computations, without their timings.
fn assert_same(a: &tally_batch::ViewData, b: &tally_batch::ViewData) {
    assert_eq!(a.events, b.events);
    assert_eq!(a.urls, b.urls);
    assert_eq!(a.offsets, b.offsets);
    assert_eq!(a.cell, b.cell);
    assert_eq!(a.views, b.views);
    assert_eq!(a.sketches, b.sketches);
}

#[test]
fn cached_partials_give_what_a_scan_of_every_file_gives() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), 21, 6000, 6);
    let parts = dir.path().join("views/partials");
    // A cutoff inside the fifth file: four files are whole below it, the fifth straddles it.
    let f = &ds.files[4];
    let cutoff = Seq((f.first.get() + f.last.get()) / 2);
    let m = model(&ds.rows, cutoff.get());
    let scan = |full: bool, cutoff: Seq| {
        let cache = PartialCache::open(&parts, full).unwrap();
        let progress = Progress::new();
        let urls = compute_cached(&ds.files, cutoff, Some(10), &progress, Some(&cache)).unwrap();
        let src =
            compute_sources_cached(&ds.files, cutoff, Some(10), &Progress::new(), Some(&cache))
                .unwrap();
        (urls, src, cache, progress.snapshot())
    };
    let expected = compute(&ds.files, cutoff, Some(10), &Progress::new()).unwrap();
    let expected_src = compute_sources(&ds.files, cutoff, Some(10), &Progress::new()).unwrap();
    assert_eq!(expected.events, m.events);

    // First run: every file read, the four whole ones cached.
    let (a, a_src, _, _) = scan(false, cutoff);
    assert_same(&a, &expected);
    assert_same(&a_src, &expected_src);
    assert_eq!((a.stats.files_reused, a.stats.files_computed), (0, 5));
    let cached = |kind: &str| {
        std::fs::read_dir(&parts)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                let name = name.to_string_lossy();
                name.starts_with(kind) && name.ends_with(".part")
            })
            .count()
    };
    assert_eq!((cached("url-"), cached("src-")), (4, 4));

    // Second run: the four whole files come from the cache, only the straddling one is read.
    let (b, b_src, _, p) = scan(false, cutoff);
    assert_same(&b, &expected);
    assert_same(&b_src, &expected_src);
    assert_eq!((b.stats.files_reused, b.stats.files_computed), (4, 1));
    assert_eq!(
        (b_src.stats.files_reused, b_src.stats.files_computed),
        (4, 1)
    );
    assert_eq!((p.files_done, p.files_reused, p.files_computed), (5, 4, 1));
    assert_eq!(p.events_done, m.events);
    let mut mem = b.clone();
    mem.sources = Some(Box::new(b_src));
    check_view(&BatchView::from_data("mem".into(), cutoff, 0, mem), &m, 21);

    // A damaged partial is recomputed, never merged.
    let victim = std::fs::read_dir(&parts)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("url-"))
        .unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&victim, bytes).unwrap();
    let (c, _, _, _) = scan(false, cutoff);
    assert_same(&c, &expected);
    assert_eq!((c.stats.files_reused, c.stats.files_computed), (3, 2));

    // A full run reads every file and gives the same view.
    let (d, d_src, _, _) = scan(true, cutoff);
    assert_same(&d, &expected);
    assert_same(&d_src, &expected_src);
    assert_eq!((d.stats.files_reused, d.stats.files_computed), (0, 5));

    // A file rewritten under the same name (as compaction or a deletion request would) is not
    // answered from its old partial.
    let first = &ds.files[0];
    let kept: Vec<MasterRow> = ds
        .rows
        .iter()
        .filter(|r| r.seq >= first.first.get() && r.seq <= first.last.get() && r.seq % 3 != 0)
        .cloned()
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let rewritten = write_master_file(tmp.path(), kept, 2).unwrap();
    std::fs::rename(&rewritten.path, &first.path).unwrap();
    let mut files = ds.files.clone();
    files[0].size = std::fs::metadata(&first.path).unwrap().len();
    let rows: Vec<MasterRow> = ds
        .rows
        .iter()
        .filter(|r| r.seq > first.last.get() || r.seq % 3 != 0)
        .cloned()
        .collect();
    let all = Seq(u64::MAX / 2);
    let cache = PartialCache::open(&parts, false).unwrap();
    let e = compute_cached(&files, all, Some(10), &Progress::new(), Some(&cache)).unwrap();
    assert_eq!(e.events, model(&rows, all.get()).events);
    assert_same(
        &e,
        &compute(&files, all, Some(10), &Progress::new()).unwrap(),
    );
    assert_eq!((e.stats.files_reused, e.stats.files_computed), (3, 3));
    // Partials nothing uses any more (the old first file's, the sources ones this run did not
    // look at) are deleted; the ones it used stay.
    assert!(cache.retain_used().unwrap() > 0);
    assert_eq!((cached("url-"), cached("src-")), (6, 0));
}

#[test]
fn overlapping_or_unreadable_master_files_fail() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), 9, 400, 2);
    let mut files = ds.files.clone();
    files.push(MasterFile {
        first: Seq(10),
        last: Seq(20),
        ..files[0].clone()
    });
    assert!(matches!(
        compute(&files, Seq(1000), None, &Progress::new()),
        Err(Error::Snapshot(_))
    ));
    std::fs::write(&ds.files[1].path, b"not parquet").unwrap();
    match compute(&ds.files, Seq(1000), None, &Progress::new()) {
        Err(Error::Parquet { path, .. }) => assert_eq!(path, ds.files[1].path),
        other => panic!("unexpected {other:?}"),
    }
}

fn small_data(dir: &Path, seed: u64) -> (tally_batch::ViewData, u64) {
    let ds = dataset(dir, seed, 2000, 2);
    (
        compute(&ds.files, Seq(2000), Some(8), &Progress::new()).unwrap(),
        2000,
    )
}

#[test]
fn store_manifest_verify_and_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (data, cutoff) = small_data(dir.path(), 3);
    let store = ViewStore::open(dir.path().join("views/batch")).unwrap();
    assert_eq!(store.current().unwrap(), None);
    let info = store.write(&data, Seq(cutoff), 1_700_000_000_000).unwrap();
    assert_eq!(info.version, format!("{:020}-1700000000000", cutoff));
    assert_eq!(info.status, ViewStatus::Good);
    store.set_current(&info.version).unwrap();
    assert_eq!(
        store.current().unwrap().as_deref(),
        Some(info.version.as_str())
    );

    let vdir = store.version_dir(&info.version);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vdir.join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(m["format_version"], 4);
    assert_eq!(m["version"], info.version.as_str());
    assert_eq!(m["cutoff_seq"], cutoff);
    assert_eq!(m["events"], data.events);
    assert_eq!(m["urls"], data.urls.len() as u64);
    assert_eq!(m["created_at"], "2023-11-14T22:13:20Z");
    let files = m["files"].as_array().unwrap();
    assert_eq!(files.len(), 3);
    for f in files {
        let bytes = std::fs::read(vdir.join(f["name"].as_str().unwrap())).unwrap();
        assert_eq!(f["size"], bytes.len() as u64);
        assert_eq!(f["blake3"], blake3::hash(&bytes).to_hex().as_str());
    }
    store.verify(&info.version).unwrap();
    assert!(store.load(&info.version).is_ok());

    // Flip bytes in the largest file: verify names it, load refuses.
    let largest = files
        .iter()
        .max_by_key(|f| f["size"].as_u64().unwrap())
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    let p = vdir.join(&largest);
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    bytes[mid + 1] ^= 0x55;
    std::fs::write(&p, &bytes).unwrap();
    match store.verify(&info.version) {
        Err(Error::Corrupt { file, .. }) => assert_eq!(file, p),
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        store.load(&info.version),
        Err(Error::Corrupt { .. })
    ));

    // A missing or invalid manifest is corruption too.
    std::fs::write(vdir.join(MANIFEST_FILE), b"{").unwrap();
    assert!(
        matches!(store.verify(&info.version), Err(Error::Corrupt { file, .. }) if file.ends_with(MANIFEST_FILE))
    );
    std::fs::remove_file(vdir.join(MANIFEST_FILE)).unwrap();
    assert!(matches!(
        store.verify(&info.version),
        Err(Error::Corrupt { .. })
    ));
    assert_eq!(store.list().unwrap()[0].status, ViewStatus::Invalid);
}

#[test]
fn store_discard_gc_and_temp_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let (data, cutoff) = small_data(dir.path(), 4);
    let store = ViewStore::open(dir.path().join("views/batch")).unwrap();
    let mut versions = Vec::new();
    for i in 0..6 {
        let v = store
            .write(&data, Seq(cutoff + i), 1_700_000_000_000 + i as i64)
            .unwrap()
            .version;
        store.set_current(&v).unwrap();
        versions.push(v);
    }
    // Leftovers of a crash: a temp dir and a version-named dir without a manifest.
    let tmp = store
        .root()
        .join(".tmp-00000000000000000001-0000000000001-77");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join(COUNTS_FILE), b"half").unwrap();
    let garbage = format!("{:020}-9999999999999", cutoff + 100);
    std::fs::create_dir_all(store.root().join(&garbage)).unwrap();
    let list = store.list().unwrap();
    assert_eq!(list.len(), 7);
    assert!(list.iter().all(|v| !v.version.starts_with('.')));
    assert_eq!(
        list.iter().find(|v| v.version == garbage).unwrap().status,
        ViewStatus::Invalid
    );
    assert_eq!(
        store.newest_good().unwrap().as_deref(),
        Some(versions[5].as_str())
    );

    // Discard CURRENT: it moves back to the newest good earlier version.
    assert_eq!(
        store.discard(&versions[5], "test").unwrap().as_deref(),
        Some(versions[4].as_str())
    );
    assert_eq!(
        store.current().unwrap().as_deref(),
        Some(versions[4].as_str())
    );
    assert!(store.load(&versions[5]).is_err());
    assert!(store.set_current(&versions[5]).is_err());
    let st: HashMap<String, ViewStatus> = store
        .list()
        .unwrap()
        .into_iter()
        .map(|v| (v.version, v.status))
        .collect();
    assert_eq!(st[&versions[5]], ViewStatus::Discarded);
    // Discarding a non-current version leaves CURRENT alone.
    assert_eq!(
        store.discard(&versions[3], "test").unwrap().as_deref(),
        Some(versions[4].as_str())
    );
    assert_eq!(
        store.newest_good_before(&versions[4]).unwrap().as_deref(),
        Some(versions[2].as_str())
    );

    // gc keeps the newest 2 good versions (and never CURRENT), discarded/invalid stay, temp goes.
    store.set_current(&versions[0]).unwrap();
    let deleted = store.gc(2).unwrap();
    assert_eq!(deleted, vec![versions[1].clone()]);
    assert!(!tmp.exists());
    let left: Vec<String> = store
        .list()
        .unwrap()
        .into_iter()
        .map(|v| v.version)
        .collect();
    let mut want = vec![
        versions[0].clone(),
        versions[2].clone(),
        versions[3].clone(),
        versions[4].clone(),
        versions[5].clone(),
        garbage.clone(),
    ];
    want.sort();
    assert_eq!(left, want);

    // Discarding the only good chain empties CURRENT.
    store.set_current(&versions[2]).unwrap();
    for v in [&versions[4], &versions[0]] {
        store.discard(v, "test").unwrap();
    }
    assert_eq!(store.discard(&versions[2], "test").unwrap(), None);
    assert_eq!(store.current().unwrap(), None);
    assert!(matches!(store.load("nope"), Err(Error::NoSuchVersion(_))));
}

// ---------------------------------------------------------------------------------------------
// Runner tests against a real `tally_master::Master`.

mod runner {
    use std::time::Duration;

    use tally_batch::{BatchRunner, RunError, RunStatus, RunnerConfig, Trigger, ViewStore};
    use tally_core::{Event, HOUR_MS};
    use tally_master::{Master, MasterConfig};

    fn open_master(dir: &std::path::Path) -> Master {
        Master::open(MasterConfig {
            data_dir: dir.to_path_buf(),
            seal_interval: Duration::from_secs(3600),
            seal_max_events: 1_000_000,
            fsync: false,
            tail_capacity: 10_000,
        })
        .unwrap()
    }

    fn events(n: usize, salt: usize) -> Vec<Event> {
        (0..n)
            .map(|i| Event {
                ts: super::BASE_MS + ((i * 7 + salt) % 48) as i64 * HOUR_MS,
                url: format!("http://example.com/{}", (i + salt) % 5),
                visitor: Some(format!("v{}", i % 11)),
                referrer: None,
                id: None,
                received_at: super::BASE_MS,
            })
            .collect()
    }

    fn cfg() -> RunnerConfig {
        RunnerConfig {
            keep_versions: 2,
            sketch_precision: Some(10),
            retry_backoff: Duration::from_millis(10),
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_publish_versions_and_history() {
        let dir = tempfile::tempdir().unwrap();
        let master = open_master(dir.path());
        master.append(events(500, 0)).await.unwrap();
        let store = ViewStore::open(dir.path().join("views/batch")).unwrap();
        let runner = BatchRunner::new(store.clone(), master.clone(), cfg());

        let o1 = runner.run(Trigger::Admin).await.unwrap();
        assert_eq!((o1.events, o1.urls), (500, 5));
        assert_eq!(
            store.current().unwrap().as_deref(),
            Some(o1.version.as_str())
        );
        let v1 = store.load(&o1.version).unwrap();
        let total: u64 = v1.totals_desc().map(|x| x.1).sum();
        assert_eq!(total, 500);
        assert!(runner.running().is_none());

        // A second run sees the new events and moves CURRENT; gc keeps 2 versions.
        master.append(events(300, 3)).await.unwrap();
        let o2 = runner.run(Trigger::Cli).await.unwrap();
        assert!(o2.version > o1.version);
        assert_eq!(o2.events, 800);
        assert_eq!(o2.cutoff_seq.get(), 800);
        // Incremental: the first run's file comes from its cached partial, the new one is read;
        // a full run reads both, and a rerun after a discard is always full.
        assert_eq!((o1.files_reused, o1.files_computed, o1.full), (0, 1, false));
        assert_eq!((o2.files_reused, o2.files_computed, o2.files), (1, 1, 2));
        let full = runner.run_with(Trigger::Admin, true).await.unwrap();
        assert_eq!(
            (full.files_reused, full.files_computed, full.full),
            (0, 2, true)
        );
        assert_eq!(store.load(&full.version).unwrap().events, 800);
        let rerun = runner.run(Trigger::Discard).await.unwrap();
        assert_eq!((rerun.files_reused, rerun.full), (0, true));
        let h = runner.history();
        assert_eq!(
            (h[0].files_reused, h[0].files_computed, h[0].full),
            (Some(0), Some(2), true)
        );
        assert_eq!((h[2].files_reused, h[2].files_computed), (Some(1), Some(1)));
        assert!(
            dir.path()
                .join("views/partials")
                .read_dir()
                .unwrap()
                .count()
                >= 4
        );
        // A file is read when either keying lacks its partial: the first file's URL partial
        // and the second's source partial gone, both files are read.
        let partials = dir.path().join("views/partials");
        for prefix in ["url-00000000000000000001-", "src-00000000000000000501-"] {
            for e in partials.read_dir().unwrap() {
                let path = e.unwrap().path();
                if path
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(prefix)
                {
                    std::fs::remove_file(path).unwrap();
                }
            }
        }
        let o3 = runner.run(Trigger::Schedule).await.unwrap();
        assert_eq!((o3.files_reused, o3.files_computed), (0, 2));
        let o4 = runner.run(Trigger::Schedule).await.unwrap();
        assert_eq!(store.list().unwrap().len(), 2);
        assert_eq!(
            store.current().unwrap().as_deref(),
            Some(o4.version.as_str())
        );

        // One run at a time.
        let started = runner.start(Trigger::Admin).await.unwrap();
        match runner.start(Trigger::Admin).await {
            Err(RunError::AlreadyRunning { run_id }) => assert_eq!(run_id, started.run_id),
            Ok(_) => {
                // The first run may already be over on a fast machine; then this one got the slot.
            }
            Err(e) => panic!("{e}"),
        }
        let o5 = started.handle.await.unwrap().unwrap();

        // Discard the current version: CURRENT moves back, history says so.
        let (gone, now) = runner.discard_current("test").await.unwrap().unwrap();
        assert_eq!(gone, o5.version);
        assert_eq!(now.as_deref(), Some(o4.version.as_str()));
        let h = runner.history();
        assert_eq!(h[0].status, RunStatus::Discarded);
        assert_eq!(h[0].version.as_deref(), Some(o5.version.as_str()));
        assert!(h[1..].iter().all(|e| e.status == RunStatus::Ok));
        // Whatever run replaces a discarded view reads every file (in cluster mode it may be a
        // run to another node's cut, not the discard's own rerun); the one after reuses again.
        let replacement = runner.run_at(Trigger::Log, o5.cutoff_seq).await.unwrap();
        assert_eq!((replacement.full, replacement.files_reused), (true, 0));
        let next = runner.run(Trigger::Schedule).await.unwrap();
        assert!(!next.full && next.files_reused > 0, "{next:?}");

        // A corrupted view fails to load as corruption (the serving layer's ViewManager then
        // discards it); a missing one is not corruption.
        runner.run(Trigger::Admin).await.unwrap();
        let cur = store.current().unwrap().unwrap();
        let counts = store
            .version_dir(&cur)
            .join(tally_batch::store::COUNTS_FILE);
        let mut bytes = std::fs::read(&counts).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&counts, bytes).unwrap();
        let err = store.load(&cur).unwrap_err();
        assert_eq!(err.kind(), tally_batch::ErrorKind::Corrupt, "{err}");
        let missing = store
            .load("00000000000000000001-0000000000001")
            .unwrap_err();
        assert_eq!(missing.kind(), tally_batch::ErrorKind::Invalid, "{missing}");
        let h = runner.history();

        // History is persisted.
        let again = BatchRunner::new(store.clone(), master.clone(), cfg());
        assert_eq!(again.history(), h);
    }

    /// `batch.partials = false`: every run reads every file and no partial stays on disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_partials_every_run_is_full_and_leaves_none() {
        let dir = tempfile::tempdir().unwrap();
        let master = open_master(dir.path());
        let store = ViewStore::open(dir.path().join("views/batch")).unwrap();
        let with = BatchRunner::new(store.clone(), master.clone(), cfg());
        master.append(events(100, 0)).await.unwrap();
        with.run(Trigger::Admin).await.unwrap();
        let parts = dir.path().join("views/partials");
        assert!(parts.read_dir().unwrap().count() > 0);
        let without = BatchRunner::new(
            store.clone(),
            master.clone(),
            RunnerConfig {
                reuse_partials: false,
                ..cfg()
            },
        );
        master.append(events(50, 1)).await.unwrap();
        for _ in 0..2 {
            let o = without.run(Trigger::Schedule).await.unwrap();
            assert_eq!((o.files_reused, o.files_computed, o.full), (0, 2, true));
            assert_eq!(o.events, 150);
            assert_eq!(parts.read_dir().unwrap().count(), 0);
        }
    }

    /// Incremental == full: for random sequences of ingest, seals, compactions, deletion
    /// requests and runs, every incremental run publishes exactly the view a full recompute
    /// publishes at the same cutoff (same files, byte for byte).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn incremental_runs_equal_full_recomputes_across_seals_compactions_and_forgets() {
        for seed in 1..=3u64 {
            let dir = tempfile::tempdir().unwrap();
            let master = open_master(dir.path());
            let store = ViewStore::open(dir.path().join("views/batch")).unwrap();
            let runner = BatchRunner::new(store.clone(), master.clone(), cfg());
            let compact = tally_master::CompactConfig {
                small_bytes: u64::MAX / 4,
                target_bytes: u64::MAX / 2,
                min_files: 2,
                retention: None,
            };
            let mut rng = tally_testing::Rng::new(seed);
            let (mut runs, mut reused) = (0, 0);
            for step in 0..40usize {
                match rng.below(6) {
                    0 | 1 => {
                        let n = 1 + rng.below(150) as usize;
                        master.append(events(n, step * 7)).await.unwrap();
                    }
                    2 => {
                        master.seal().await.unwrap();
                    }
                    3 => {
                        master.compact(&compact).await.unwrap();
                    }
                    4 if rng.below(4) == 0 => {
                        let url = format!("http://example.com/{}", rng.below(5));
                        let f = tally_master::Forget::url_prefix(&url).unwrap();
                        master.forget(&f).await.unwrap();
                    }
                    _ => {
                        let inc = runner.run(Trigger::Schedule).await.unwrap();
                        let full = runner.run_with(Trigger::Admin, true).await.unwrap();
                        assert_eq!(inc.cutoff_seq, full.cutoff_seq, "no event in between");
                        let a = store.read_manifest(&inc.version).unwrap();
                        let b = store.read_manifest(&full.version).unwrap();
                        assert_eq!(a.files, b.files, "seed {seed} step {step}: {inc:?}");
                        assert_eq!((a.events, a.cells), (b.events, b.cells));
                        runs += 1;
                        reused += inc.files_reused;
                    }
                }
            }
            assert!(
                runs > 0 && reused > 0,
                "seed {seed}: {runs} runs, {reused} reused"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failing_run_is_retried_and_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let master = open_master(dir.path());
        master.append(events(100, 0)).await.unwrap();
        let store = ViewStore::open(dir.path().join("views/batch")).unwrap();
        let runner = BatchRunner::new(
            store.clone(),
            master.clone(),
            RunnerConfig {
                max_retries: 2,
                ..cfg()
            },
        );
        let good = runner.run(Trigger::Admin).await.unwrap();
        // Make a master file unreadable.
        master.append(events(10, 1)).await.unwrap();
        master.seal().await.unwrap();
        for f in master.snapshot().unwrap() {
            std::fs::write(&f.path, b"garbage").unwrap();
        }
        let err = runner
            .run_with_retries(Trigger::Schedule)
            .await
            .unwrap_err();
        assert!(matches!(err, RunError::Failed { .. }), "{err}");
        let h = runner.history();
        assert_eq!(
            h.iter().filter(|e| e.status == RunStatus::Failed).count(),
            3
        );
        assert!(h[0].error.as_deref().unwrap().contains("parquet"));
        // The old view is still current and loads.
        assert_eq!(
            store.current().unwrap().as_deref(),
            Some(good.version.as_str())
        );
        store.load(&good.version).unwrap();
    }
}

#[test]
fn plain_fallback_for_url_dictionary_is_exact() {
    // A tiny dictionary page limit makes the writer fall back to plain pages; the reader then
    // hands out several dictionaries per row group, and the kernel must still merge URLs exactly.
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(77);
    let rows: Vec<MasterRow> = (1..=150_000u64)
        .map(|seq| MasterRow {
            seq,
            ts: BASE_MS + rng.below(100) as i64 * HOUR_MS,
            url: format!("http://h{}.example/{}", rng.below(7), rng.below(300)),
            visitor: None,
            referrer: None,
        })
        .collect();
    let f = tally_testing::write_master_file_with(
        &dir.path().join("master"),
        rows.clone(),
        1 << 20,
        512,
    )
    .unwrap();
    let data = compute(&[f], Seq(120_000), None, &Progress::new()).unwrap();
    assert!(
        data.stats.url_dictionaries > 1,
        "fallback not exercised: {:?}",
        data.stats
    );
    let m = model(&rows, 120_000);
    let view = BatchView::from_data("v".into(), Seq(120_000), 0, data);
    check_view(&view, &m, 5);
}
