//! The dashboard (API.md, "Dashboard"): its embedded files as HTTP serves them, the committed
//! bundle against its sources, and the page itself in headless Chromium against a real tally with
//! data (`dashboard/test/dashboard.test.mjs`, driven by `playwright-core`).
//!
//! The browser and bundle tests need Node.js, `dashboard/node_modules` and Debian's `chromium`,
//! which `scripts/test.sh` installs; without them they report themselves skipped (and fail on CI).

use std::process::Command;

use reqwest::blocking::Client;
use serde_json::json;
use tally_e2e::browser::{browser_ready, dashboard_dir, node_ready, run_browser_script};
use tally_e2e::{batch_run, now_ms, workspace_root, ServerOpts, TestServer, DAY_MS, JSON};

/// The first view's files: the index names its hashed script and style, each is served in the
/// encoding asked for, the index is revalidated (`no-cache`, `ETag`, `304`) and locked to this
/// origin by its CSP, the hashed files are cached for a year; with `auth.read_token` set, the
/// page asks a browser for it (a Basic login prompt, the token as the password), and those
/// credentials open the query API too.
#[test]
fn the_dashboard_is_served_compressed_cached_and_behind_the_read_token() {
    let server = TestServer::start(
        ServerOpts::default()
            .env("TALLY_AUTH_ADMIN_TOKEN", "admin-secret")
            .env("TALLY_AUTH_READ_TOKEN", "read-secret"),
    );
    let client = Client::builder().no_gzip().no_brotli().build().unwrap();
    let base = server.base_url();
    let get = |path: &str, enc: &str| {
        client
            .get(format!("{base}{path}"))
            .header("Accept-Encoding", enc)
            .basic_auth("anyone", Some("read-secret"))
            .send()
            .unwrap()
    };
    let denied = client.get(format!("{base}/")).send().unwrap();
    assert_eq!(denied.status().as_u16(), 401);
    let challenge = denied.headers()["www-authenticate"].to_str().unwrap();
    assert!(challenge.starts_with("Basic "), "{challenge}");
    let wrong = client
        .get(format!("{base}/"))
        .basic_auth("anyone", Some("guess"))
        .send()
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let index = get("/", "identity");
    assert_eq!(index.status().as_u16(), 200);
    let h = index.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["cache-control"], "no-cache");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("connect-src 'self'") && csp.contains("script-src 'self'"));
    let etag = h["etag"].to_str().unwrap().to_string();
    let html = index.text().unwrap();
    let assets: Vec<String> = html
        .split('"')
        .filter(|s| s.starts_with("/assets/app-"))
        .map(String::from)
        .collect();
    assert_eq!(assets.len(), 2, "a script and a style: {html}");
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "nothing from elsewhere: {html}"
    );
    let again = client
        .get(format!("{base}/"))
        .bearer_auth("read-secret")
        .header("Accept-Encoding", "identity")
        .header("If-None-Match", &etag)
        .send()
        .unwrap();
    assert_eq!(again.status().as_u16(), 304);
    for a in &assets {
        for (enc, want) in [
            ("br", Some("br")),
            ("gzip", Some("gzip")),
            ("identity", None),
        ] {
            let r = get(a, enc);
            assert_eq!(r.status().as_u16(), 200, "GET {a} ({enc})");
            assert_eq!(
                r.headers()
                    .get("content-encoding")
                    .map(|v| v.to_str().unwrap()),
                want,
                "GET {a} ({enc})"
            );
            assert_eq!(
                r.headers()["cache-control"],
                "public, max-age=31536000, immutable"
            );
            let ct = r.headers()["content-type"].to_str().unwrap().to_string();
            assert!(
                ct.starts_with(if a.ends_with(".js") {
                    "text/javascript"
                } else {
                    "text/css"
                }),
                "{a}: {ct}"
            );
            assert!(!r.bytes().unwrap().is_empty());
        }
    }
    // The browser's credentials open the data behind the page; nothing else does.
    let plain = client.get(format!("{base}/v1/sites")).send().unwrap();
    assert_eq!(plain.status().as_u16(), 401);
    let sites = get("/v1/sites", "identity");
    assert_eq!(sites.status().as_u16(), 200);
}

#[test]
fn the_committed_dashboard_bundle_is_what_its_sources_build() {
    let test = "the_committed_dashboard_bundle_is_what_its_sources_build";
    if !node_ready(test) {
        return;
    }
    let out = Command::new("node")
        .arg("build.mjs")
        .arg("--check")
        .current_dir(dashboard_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two sites, several pages, sources and UTM tags over the last days, some in the batch view and
/// some only in the speed layer, a few in the last minutes (realtime).
fn seed(server: &TestServer) {
    let now = now_ms();
    let pages = [
        "/",
        "/pricing",
        "/blog/lambda",
        "/docs?lang=en",
        "/?utm_source=newsletter&utm_medium=email&utm_campaign=launch",
    ];
    let referrers = [
        None,
        Some("https://www.google.com/search?q=tally"),
        Some("https://news.ycombinator.com/item?id=1"),
        Some("https://a.test/"),
    ];
    let events = |n: usize, salt: usize, max_age: i64| -> Vec<serde_json::Value> {
        (0..n)
            .map(|i| {
                let k = i * 7919 + salt;
                let host = if (k / 7) % 3 == 0 { "b.test" } else { "a.test" };
                let mut e = json!({
                    "url": format!("https://{host}{}", pages[k % pages.len()]),
                    "ts": now - ((k * 104_729) as i64 % max_age),
                    "visitor": format!("v{}", k % 37),
                });
                if let Some(r) = referrers[(k / 3) % referrers.len()] {
                    e["referrer"] = json!(r);
                }
                e
            })
            .collect()
    };
    let post = |batch: Vec<serde_json::Value>| {
        let (code, body) = server.post_events(serde_json::to_vec(&batch).unwrap(), JSON);
        assert_eq!(code, 202, "{body}");
    };
    post(events(600, 1, 5 * DAY_MS));
    batch_run(server);
    post(events(200, 2, 5 * DAY_MS));
    post(events(30, 3, 120_000));
    server.wait_caught_up();
}

#[test]
fn the_dashboard_shows_the_apis_numbers_in_chromium() {
    let test = "the_dashboard_shows_the_apis_numbers_in_chromium";
    let Some(chromium) = browser_ready(test) else {
        return;
    };
    let server = TestServer::start(ServerOpts::default());
    seed(&server);
    // A second tally with both tokens, for the login prompt and the admin token form.
    let authed = TestServer::start(
        ServerOpts::default()
            .env("TALLY_AUTH_ADMIN_TOKEN", "admin-secret")
            .env("TALLY_AUTH_READ_TOKEN", "read-secret"),
    );
    seed(&authed);
    let shots = workspace_root()
        .join("target")
        .join("dashboard-screenshots");
    run_browser_script(
        "test/dashboard.test.mjs",
        &server,
        &chromium,
        &[
            ("SCREENSHOTS", shots.display().to_string()),
            ("TALLY_AUTH_URL", authed.base_url()),
            ("READ_TOKEN", "read-secret".into()),
            ("ADMIN_TOKEN", "admin-secret".into()),
        ],
    );
}
