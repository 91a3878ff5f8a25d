//! Any bytes, as JSON or NDJSON: the body parser never panics, and whatever it accepts is
//! normalised and within the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_core::event::{parse_body, BodyFormat, IngestLimits};
use tally_core::normalize_url;

const NOW: i64 = 1_795_000_000_000;

fuzz_target!(|data: &[u8]| {
    let limits = IngestLimits {
        max_batch_events: 1000,
        ..IngestLimits::default()
    };
    for format in [BodyFormat::Json, BodyFormat::Ndjson] {
        if let Ok(events) = parse_body(data, format, NOW, &limits) {
            assert!(events.len() <= limits.max_batch_events);
            for e in events {
                assert_eq!(normalize_url(&e.url).as_deref(), Ok(e.url.as_str()));
                assert!(e.ts <= NOW + limits.max_future_ms);
                assert!(e.ts >= NOW - limits.max_age_ms);
            }
        }
    }
});
