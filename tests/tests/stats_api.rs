//! `POST /api/v2/query` (API.md): request/response pairs in the shape of Plausible's Stats API v2
//! documentation examples (aggregate, breakdown by page and by source, filters, ordering,
//! pagination), checked against the events sent, across the batch view and the speed layer;
//! `400` naming every unsupported feature; API keys.

use serde_json::{json, Value};
use tally_e2e::{batch_run, now_ms, ServerOpts, TestServer, DAY_MS, JSON};

const SITE: &str = "docs.test";

/// `(page, referrer, utm, days ago, visitor)` of every event sent: two days ago, one day ago
/// (inside `"7d"`) and today (outside `"7d"`, inside `"day"`).
fn events() -> Vec<(
    &'static str,
    Option<&'static str>,
    &'static str,
    i64,
    &'static str,
)> {
    vec![
        ("/", None, "", 2, "a"),
        ("/", Some("https://www.google.com/"), "", 2, "b"),
        ("/", Some("https://google.com/search"), "", 1, "a"),
        ("/blog/one", Some("https://news.test/"), "", 1, "c"),
        (
            "/blog/one",
            None,
            "?utm_source=mail&utm_campaign=launch",
            1,
            "d",
        ),
        ("/blog/two", Some("https://google.com/"), "", 2, "b"),
        ("/pricing", None, "", 0, "e"),
        ("/pricing", None, "", 0, "a"),
    ]
}

fn send(server: &TestServer, which: impl Fn(i64) -> bool) {
    // Noon UTC of each day, so that "days ago" is the same day in UTC whatever the hour now.
    let today = now_ms().div_euclid(DAY_MS) * DAY_MS;
    let body: Vec<Value> = events()
        .into_iter()
        .filter(|e| which(e.3))
        .map(|(page, referrer, query, ago, visitor)| {
            let ts = (today - ago * DAY_MS + DAY_MS / 2).min(now_ms());
            json!({"url": format!("https://{SITE}{page}{query}"), "referrer": referrer, "ts": ts, "visitor": visitor})
        })
        .collect();
    let (code, resp) = server.post_events(Value::Array(body).to_string(), JSON);
    assert_eq!(code, 202, "{resp}");
    server.wait_caught_up();
}

fn query(server: &TestServer, key: Option<&str>, body: Value) -> (u16, Value) {
    let mut req = server
        .client()
        .post(format!("{}/api/v2/query", server.base_url()))
        .header("Content-Type", "application/json")
        .body(body.to_string());
    if let Some(k) = key {
        req = req.header("Authorization", format!("Bearer {k}"));
    }
    let resp = req.send().unwrap();
    let code = resp.status().as_u16();
    (code, resp.json().unwrap_or(Value::Null))
}

fn results(server: &TestServer, body: Value) -> Value {
    let (code, resp) = query(server, None, body.clone());
    assert_eq!(code, 200, "{body}: {resp}");
    assert!(
        resp["query"].is_object() && resp["meta"].is_object(),
        "{resp}"
    );
    resp["results"].clone()
}

fn check_table(server: &TestServer) {
    let table: Vec<(Value, Value)> = vec![
        // Aggregate over the last 7 days (today excluded, as in Plausible).
        (
            json!({"site_id": SITE, "metrics": ["visitors", "pageviews"], "date_range": "7d"}),
            json!([{"metrics": [4, 6], "dimensions": []}]),
        ),
        // Today.
        (
            json!({"site_id": SITE, "metrics": ["pageviews", "visitors", "events"], "date_range": "day"}),
            json!([{"metrics": [2, 2, 2], "dimensions": []}]),
        ),
        // Top pages, most visitors first.
        (
            json!({"site_id": SITE, "metrics": ["visitors", "pageviews"], "date_range": "7d",
                   "dimensions": ["event:page"]}),
            json!([
                {"metrics": [2, 3], "dimensions": ["/"]},
                {"metrics": [2, 2], "dimensions": ["/blog/one"]},
                {"metrics": [1, 1], "dimensions": ["/blog/two"]},
            ]),
        ),
        // One page of pages by views: visitors are counted for the rows shown, and for the
        // right ones.
        (
            json!({"site_id": SITE, "metrics": ["pageviews", "visitors"], "date_range": "7d",
                   "dimensions": ["event:page"], "order_by": [["pageviews", "desc"]],
                   "pagination": {"limit": 1, "offset": 1}}),
            json!([{"metrics": [2, 2], "dimensions": ["/blog/one"]}]),
        ),
        // Sources, with a filter on the page.
        (
            json!({"site_id": SITE, "metrics": ["pageviews"], "date_range": "7d",
                   "dimensions": ["visit:source"],
                   "filters": [["contains", "event:page", ["/blog"]]]}),
            json!([
                {"metrics": [1], "dimensions": ["google.com"]},
                {"metrics": [1], "dimensions": ["mail"]},
                {"metrics": [1], "dimensions": ["news.test"]},
            ]),
        ),
        // Pages reached from Google, by page ascending.
        (
            json!({"site_id": SITE, "metrics": ["pageviews"], "date_range": "7d",
                   "dimensions": ["event:page"],
                   "filters": [["is", "visit:referrer", ["google.com"]]],
                   "order_by": [["event:page", "asc"]]}),
            json!([
                {"metrics": [2], "dimensions": ["/"]},
                {"metrics": [1], "dimensions": ["/blog/two"]},
            ]),
        ),
        // Two dimensions, "not" and "or", pagination.
        (
            json!({"site_id": SITE, "metrics": ["pageviews"], "date_range": "7d",
                   "dimensions": ["event:page", "visit:utm_campaign"],
                   "filters": [["not", ["or", [["is", "event:page", ["/"]], ["is", "event:page", ["/blog/two"]]]]]],
                   "pagination": {"limit": 1, "offset": 1},
                   "order_by": [["visit:utm_campaign", "desc"]]}),
            json!([{"metrics": [1], "dimensions": ["/blog/one", "(none)"]}]),
        ),
        // A pair of dates, inclusive, in a time zone whose midnights are UTC midnights.
        (
            json!({"site_id": SITE, "metrics": ["pageviews"], "date_range": [day(2), day(1)],
                   "timezone": "Europe/London", "dimensions": ["event:hostname"]}),
            json!([{"metrics": [6], "dimensions": [SITE]}]),
        ),
        // A time series by UTC day, oldest first; `time` picks days for seven days.
        (
            json!({"site_id": SITE, "metrics": ["pageviews", "visitors"], "date_range": "7d",
                   "dimensions": ["time:day"]}),
            json!([
                {"metrics": [3, 2], "dimensions": [day(2)]},
                {"metrics": [3, 3], "dimensions": [day(1)]},
            ]),
        ),
        (
            json!({"site_id": SITE, "metrics": ["pageviews"], "date_range": "7d",
                   "dimensions": ["visit:source", "time"],
                   "filters": [["is", "event:page", ["/"]]]}),
            json!([
                {"metrics": [1], "dimensions": ["(direct)", day(2)]},
                {"metrics": [1], "dimensions": ["google.com", day(2)]},
                {"metrics": [1], "dimensions": ["google.com", day(1)]},
            ]),
        ),
        // Today by hour (both of today's views fall in one hour).
        (
            json!({"site_id": SITE, "metrics": ["pageviews"], "date_range": "day",
                   "dimensions": ["time:hour"]}),
            json!([{"metrics": [2], "dimensions": [today_hour()]}]),
        ),
    ];
    for (q, want) in table {
        assert_eq!(results(server, q.clone()), want, "{q}");
    }
    // `total_rows` counts every row, not the page's.
    let (code, resp) = query(
        server,
        None,
        json!({"site_id": SITE, "metrics": ["pageviews"], "date_range": "7d",
               "dimensions": ["event:page"], "pagination": {"limit": 1},
               "include": {"total_rows": true}}),
    );
    assert_eq!(code, 200, "{resp}");
    assert_eq!(resp["results"].as_array().map(Vec::len), Some(1), "{resp}");
    assert_eq!(resp["meta"]["total_rows"], json!(3), "{resp}");
    // Every bucket of the range is labelled, also those without views.
    let (code, resp) = query(
        server,
        None,
        json!({"site_id": SITE, "metrics": ["pageviews"], "date_range": "7d",
               "dimensions": ["time:day"], "include": {"time_labels": true}}),
    );
    assert_eq!(code, 200, "{resp}");
    let labels: Vec<String> = (1..=7).rev().map(day).collect();
    assert_eq!(resp["meta"]["time_labels"], json!(labels), "{resp}");
    // "all" is labelled from the site's first day with data (the oldest events are 2 days old).
    let (code, resp) = query(
        server,
        None,
        json!({"site_id": SITE, "metrics": ["pageviews"], "date_range": "all",
               "dimensions": ["time:day"], "include": {"time_labels": true}}),
    );
    assert_eq!(code, 200, "{resp}");
    let labels: Vec<String> = (0..=2).rev().map(day).collect();
    assert_eq!(resp["meta"]["time_labels"], json!(labels), "{resp}");
    // Whatever the filters keep: the site's first day, not the first day of what matched.
    let (code, resp) = query(
        server,
        None,
        json!({"site_id": SITE, "metrics": ["pageviews"], "date_range": "all",
               "dimensions": ["time:day"], "include": {"time_labels": true},
               "filters": [["is", "event:page", ["/never-viewed"]]]}),
    );
    assert_eq!(code, 200, "{resp}");
    assert_eq!(resp["results"], json!([]), "{resp}");
    assert_eq!(resp["meta"]["time_labels"], json!(labels), "{resp}");
}

/// `YYYY-MM-DD HH:00:00` of the hour today's events were sent in (noon UTC, or now if earlier).
fn today_hour() -> String {
    let today = now_ms().div_euclid(DAY_MS) * DAY_MS;
    let ts = (today + DAY_MS / 2).min(now_ms());
    chrono::DateTime::from_timestamp_millis(ts)
        .unwrap()
        .format("%Y-%m-%d %H:00:00")
        .to_string()
}

/// `YYYY-MM-DD` of the UTC day `ago` days before today.
fn day(ago: i64) -> String {
    let ms = now_ms().div_euclid(DAY_MS) * DAY_MS - ago * DAY_MS;
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .format("%Y-%m-%d")
        .to_string()
}

#[test]
fn plausible_queries_answer_like_plausible_across_layers() {
    let server = TestServer::start(ServerOpts::default());
    // Half of the days in the batch view, the rest in the speed layer.
    send(&server, |ago| ago == 2);
    batch_run(&server);
    send(&server, |ago| ago != 2);
    check_table(&server);
    let (code, resp) = query(
        &server,
        None,
        json!({"site_id": "nobody.test", "metrics": ["pageviews"], "date_range": "all"}),
    );
    assert_eq!(code, 200, "{resp}");
    assert_eq!(resp["results"], json!([{"metrics": [0], "dimensions": []}]));
}

#[test]
fn unsupported_queries_are_a_400_that_names_what_is_unsupported() {
    let server = TestServer::start(ServerOpts::default());
    let base = json!({"site_id": SITE, "metrics": ["pageviews"], "date_range": "7d"});
    let with = |k: &str, v: Value| {
        let mut q = base.clone();
        q[k] = v;
        q
    };
    for (q, names) in [
        (with("metrics", json!(["bounce_rate"])), "bounce_rate"),
        (
            with("dimensions", json!(["visit:country"])),
            "visit:country",
        ),
        (with("dimensions", json!(["time:week"])), "time:week"),
        (
            with("filters", json!([["is", "time:day", ["2026-01-01"]]])),
            "time:day",
        ),
        (
            with("filters", json!([["matches", "event:page", ["^/a"]]])),
            "matches",
        ),
        (with("date_range", json!("realtime")), "realtime"),
        (with("date_range", json!("7x")), "7x"),
        (with("include", json!({"comparisons": {}})), "comparisons"),
        (with("site_id", Value::Null), "site_id"),
        (with("metrics", json!([])), "metrics"),
        (with("order_by", json!([["visitors", "desc"]])), "order_by"),
        (with("bogus", json!(1)), "bogus"),
    ] {
        let (code, resp) = query(&server, None, q.clone());
        assert_eq!(code, 400, "{q}: {resp}");
        let msg = resp["error"].as_str().unwrap_or_default();
        assert!(msg.contains(names), "{q}: {msg:?} should name {names}");
    }
    let resp = server
        .client()
        .post(format!("{}/api/v2/query", server.base_url()))
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
}

#[test]
fn api_keys_close_the_stats_api() {
    let server = TestServer::start(ServerOpts::default().env("TALLY_AUTH_API_KEYS", "k1,k2"));
    let q = json!({"site_id": SITE, "metrics": ["pageviews"], "date_range": "day"});
    for key in [None, Some("wrong"), Some("")] {
        let (code, resp) = query(&server, key, q.clone());
        assert_eq!(code, 401, "{key:?}: {resp}");
        assert!(resp["error"].is_string(), "{resp}");
    }
    for key in ["k1", "k2"] {
        let (code, resp) = query(&server, Some(key), q.clone());
        assert_eq!(code, 200, "{key}: {resp}");
    }
}
