//! Property tests of what comes from outside: bodies, timestamps and URLs never panic, and
//! what they accept is normalised and round-trips.

use proptest::prelude::*;
use tally_core::event::{parse_body, BodyFormat, IngestLimits};
use tally_core::{format_rfc3339, normalize_url, parse_ts_param, parse_ts_str};

const NOW: i64 = 1_795_000_000_000;

fn url_strategy() -> impl Strategy<Value = String> {
    (
        prop_oneof!["http", "https", "HTTP", "HtTpS", "ftp", ""],
        "[a-zA-Z0-9.-]{0,20}",
        prop_oneof![
            Just(String::new()),
            Just(":80".to_string()),
            Just(":443".to_string()),
            Just(":8080".to_string())
        ],
        "(/[a-zA-Z0-9%._~ -]{0,10}){0,3}",
        prop_oneof![Just(String::new()), "\\?[a-z=&%]{0,12}"],
        prop_oneof![Just(String::new()), "#[a-z]{0,5}"],
    )
        .prop_map(|(s, h, p, path, q, f)| format!("{s}://{h}{p}{path}{q}{f}"))
}

proptest! {
    #[test]
    fn normalisation_is_idempotent_and_never_panics(u in url_strategy()) {
        if let Ok(n) = normalize_url(&u) {
            prop_assert_eq!(normalize_url(&n), Ok(n.clone()));
            prop_assert!(n.starts_with("http://") || n.starts_with("https://"));
            prop_assert!(!n.contains('#'));
            prop_assert!(n.len() <= tally_core::url::MAX_URL_BYTES);
        }
    }

    #[test]
    fn arbitrary_strings_never_panic_the_normaliser(s in "\\PC{0,64}") {
        let _ = normalize_url(&s);
    }

    #[test]
    fn arbitrary_bodies_never_panic_and_accepted_events_are_normalised(
        body in proptest::collection::vec(any::<u8>(), 0..256),
        ndjson in any::<bool>(),
    ) {
        let format = if ndjson { BodyFormat::Ndjson } else { BodyFormat::Json };
        if let Ok(events) = parse_body(&body, format, NOW, &IngestLimits::default()) {
            for e in events {
                prop_assert_eq!(normalize_url(&e.url), Ok(e.url.clone()));
            }
        }
    }

    #[test]
    fn generated_events_are_accepted_exactly(
        urls in proptest::collection::vec(url_strategy(), 1..20),
        offsets in proptest::collection::vec(0..tally_core::DAY_MS, 1..20),
    ) {
        let items: Vec<String> = urls
            .iter()
            .zip(offsets.iter().cycle())
            .map(|(u, o)| serde_json::json!({ "url": u, "ts": NOW - o }).to_string())
            .collect();
        let body = format!("[{}]", items.join(","));
        let valid = urls.iter().filter(|u| normalize_url(u).is_ok()).count();
        match parse_body(body.as_bytes(), BodyFormat::Json, NOW, &IngestLimits::default()) {
            Ok(events) => {
                prop_assert_eq!(events.len(), urls.len());
                prop_assert_eq!(valid, urls.len());
            }
            Err(tally_core::BodyError::Invalid(errs)) => prop_assert_eq!(errs.len(), urls.len() - valid),
            Err(other) => prop_assert!(false, "unexpected {:?}", other),
        }
    }

    #[test]
    fn timestamps_round_trip(ms in -2_000_000_000_000i64..4_000_000_000_000i64) {
        let s = format_rfc3339(ms);
        prop_assert!(s.ends_with('Z'));
        prop_assert_eq!(parse_ts_str(&s), Some(ms));
        prop_assert_eq!(parse_ts_param(&s), Some(ms));
        prop_assert_eq!(parse_ts_param(&ms.to_string()), Some(ms));
    }

    #[test]
    fn arbitrary_timestamp_text_never_panics(s in "\\PC{0,40}") {
        let _ = parse_ts_param(&s);
    }
}
