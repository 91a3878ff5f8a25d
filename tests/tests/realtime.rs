//! `GET /v1/realtime` (API.md, "Sites, breakdowns, realtime"): a site's last five minutes from
//! the speed layer — views exact, visitors distinct, pages most viewed first — also after the
//! speed layer is rebuilt from the master dataset (Redis lost), and nothing older than the window.

use serde_json::json;
use tally_e2e::{now_ms, post_visits, ServerOpts, TestServer};

fn send(server: &TestServer, events: &[(&str, i64, &str)]) {
    post_visits(server, events);
    server.wait_caught_up();
}

fn check(server: &TestServer) {
    let (code, body) = server.get("/v1/realtime?host=live.test");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["views"], 4, "{body}");
    assert_eq!(body["visitors"], 3, "{body}");
    assert_eq!(
        body["pages"],
        json!([
            {"url": "https://live.test/a", "views": 3},
            {"url": "https://live.test/b", "views": 1},
        ]),
        "{body}"
    );
    let (code, body) = server.get("/v1/realtime?host=live.test&limit=1");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["pages"].as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(body["views"], 4, "the limit cuts pages, not views: {body}");
    let (_, other) = server.get("/v1/realtime?host=other.test");
    assert_eq!(
        (other["views"].clone(), other["visitors"].clone()),
        (json!(1), json!(1))
    );
}

#[test]
fn realtime_counts_the_last_five_minutes_exactly_and_survives_a_rebuild() {
    let mut server = TestServer::start(ServerOpts::default());
    let now = now_ms();
    send(
        &server,
        &[
            ("https://live.test/a", now - 1_000, "v1"),
            ("https://live.test/a", now - 60_000, "v1"),
            ("https://live.test/a", now - 120_000, "v2"),
            ("https://live.test/b", now - 30_000, "v3"),
            // Outside the window: counted by /v1/views, not here.
            ("https://live.test/old", now - 20 * 60_000, "v4"),
            ("https://other.test/", now - 5_000, "v5"),
        ],
    );
    check(&server);
    // Redis lost while stopped: the speed layer is rebuilt from the master dataset, and the
    // replay fills the window again without counting anything twice.
    assert!(server.stop());
    server.redis().expect("private redis").restart_empty();
    server.restart();
    server.wait_caught_up();
    check(&server);
    for q in [
        "/v1/realtime",
        "/v1/realtime?host=a%2Fb",
        "/v1/realtime?host=x.test&limit=0",
    ] {
        let (code, body) = server.get(q);
        assert_eq!(code, 400, "{q}: {body}");
    }
}
