//! Plausible's own trackers (npm `@plausible-analytics/tracker` and `plausible-tracker`, as
//! published) in headless Chromium against a real tally: page views, a UTM link from another
//! site, SPA navigation, hash routing and a bot, checked through `/v1/breakdown`, `/v1/views` and
//! `/api/v2/query` (`dashboard/test/trackers.test.mjs`; API.md, "POST /api/event").

use tally_e2e::browser::{browser_ready, run_browser_script};
use tally_e2e::{ServerOpts, TestServer};

#[test]
fn plausibles_trackers_in_chromium_count_as_plausible_counts() {
    let Some(chromium) = browser_ready("plausibles_trackers_in_chromium_count_as_plausible_counts")
    else {
        return;
    };
    let server = TestServer::start(ServerOpts::default());
    run_browser_script("test/trackers.test.mjs", &server, &chromium, &[]);
}
