//! Events: the page views clients send, how their bodies are parsed and validated.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use thiserror::Error;

use crate::time::parse_ts_str;
use crate::url::normalize_url;

pub const MAX_VISITOR_BYTES: usize = 256;
pub const MAX_REFERRER_BYTES: usize = 2048;
pub const MAX_ID_BYTES: usize = 128;

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary: how the
/// Plausible endpoint keeps a referrer within [`MAX_REFERRER_BYTES`] (the trackers cannot act on
/// a `400`, so it shortens where `/v1/events` refuses).
pub fn truncate_to_bytes(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One validated, normalised page view, as it is stored in the WAL and the master dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When the view happened, epoch ms UTC.
    pub ts: i64,
    /// Normalised URL.
    pub url: String,
    pub visitor: Option<String>,
    pub referrer: Option<String>,
    pub id: Option<String>,
    /// When the server received it, epoch ms UTC.
    pub received_at: i64,
}

/// Bounds on `ts` relative to the server clock.
#[derive(Debug, Clone, Copy)]
pub struct IngestLimits {
    pub max_future_ms: i64,
    pub max_age_ms: i64,
    pub max_batch_events: usize,
}

impl Default for IngestLimits {
    fn default() -> Self {
        IngestLimits {
            max_future_ms: 5 * 60 * 1000,
            max_age_ms: 3650 * crate::time::DAY_MS,
            max_batch_events: 100_000,
        }
    }
}

/// Why one event is invalid. Each message is one readable sentence fragment.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum EventError {
    #[error("event is not valid JSON: {0}")]
    Json(String),
    #[error("event must be a JSON object")]
    NotObject,
    #[error("url is required")]
    MissingUrl,
    #[error("url must be a string")]
    UrlType,
    #[error(transparent)]
    Url(#[from] crate::url::UrlError),
    #[error("ts must be an RFC 3339 string or an integer of epoch milliseconds")]
    TsType,
    #[error("ts is more than {0} seconds in the future")]
    TsFuture(i64),
    #[error("ts is older than {0} days")]
    TsTooOld(i64),
    #[error("ts must lie between the years 0001 and 9999")]
    TsRange,
    #[error("{0} must be a string")]
    FieldType(&'static str),
    #[error("{field} is longer than {max} bytes")]
    FieldTooLong { field: &'static str, max: usize },
}

/// How a request body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// One event object or an array of them.
    Json,
    /// One event per line; blank lines skipped.
    Ndjson,
}

impl BodyFormat {
    /// The format for a `Content-Type` header value, or `None` for an unsupported type.
    pub fn from_content_type(ct: &str) -> Option<BodyFormat> {
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/json" => Some(BodyFormat::Json),
            "application/x-ndjson" | "application/ndjson" | "application/jsonl" => {
                Some(BodyFormat::Ndjson)
            }
            _ => None,
        }
    }
}

/// Why a request body was refused. Nothing from such a body is stored.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BodyError {
    #[error("request body is not valid JSON: {0}")]
    Malformed(String),
    #[error("request body must be a JSON object or an array of objects")]
    NotEvents,
    #[error("{} of the events are invalid; nothing was stored", .0.len())]
    Invalid(Vec<(usize, EventError)>),
    #[error("request has more than {0} events")]
    TooManyEvents(usize),
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(borrow)]
    url: Option<&'a RawValue>,
    #[serde(borrow)]
    ts: Option<&'a RawValue>,
    #[serde(borrow)]
    visitor: Option<&'a RawValue>,
    #[serde(borrow)]
    referrer: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
}

/// Decodes an optional string field; JSON `null` counts as absent.
fn opt_string(
    raw: Option<&RawValue>,
    field: &'static str,
    max: usize,
) -> Result<Option<String>, EventError> {
    let Some(raw) = raw else { return Ok(None) };
    let s: Option<Cow<'_, str>> =
        serde_json::from_str(raw.get()).map_err(|_| EventError::FieldType(field))?;
    match s {
        None => Ok(None),
        Some(s) if s.len() > max => Err(EventError::FieldTooLong { field, max }),
        Some(s) => Ok(Some(s.into_owned())),
    }
}

fn parse_ts(raw: Option<&RawValue>, now_ms: i64, limits: &IngestLimits) -> Result<i64, EventError> {
    let text = match raw {
        None => return Ok(now_ms),
        Some(r) => r.get().trim(),
    };
    let ts = if text == "null" {
        now_ms
    } else if text.starts_with('"') {
        let s: Cow<'_, str> = serde_json::from_str(text).map_err(|_| EventError::TsType)?;
        match parse_ts_str(&s) {
            Some(ms) => ms,
            // Valid RFC 3339, but outside the years tally represents.
            None if chrono::DateTime::parse_from_rfc3339(s.trim()).is_ok() => {
                return Err(EventError::TsRange)
            }
            None => return Err(EventError::TsType),
        }
    } else {
        let ms = text.parse::<i64>().map_err(|_| EventError::TsType)?;
        crate::time::checked_ts(ms).ok_or(EventError::TsRange)?
    };
    if ts > now_ms.saturating_add(limits.max_future_ms) {
        return Err(EventError::TsFuture(limits.max_future_ms / 1000));
    }
    if ts < now_ms.saturating_sub(limits.max_age_ms) {
        return Err(EventError::TsTooOld(
            limits.max_age_ms / crate::time::DAY_MS,
        ));
    }
    Ok(ts)
}

/// Parses and validates one event from its JSON text.
pub fn parse_event(text: &str, now_ms: i64, limits: &IngestLimits) -> Result<Event, EventError> {
    let trimmed = text.trim_start();
    if !trimmed.starts_with('{') {
        // Distinguish "valid JSON but not an object" from "not JSON".
        return match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => Err(EventError::NotObject),
            Err(e) => Err(EventError::Json(e.to_string())),
        };
    }
    let raw: RawEvent<'_> =
        serde_json::from_str(text).map_err(|e| EventError::Json(e.to_string()))?;
    let url_raw = raw.url.ok_or(EventError::MissingUrl)?;
    let url_str: Option<Cow<'_, str>> =
        serde_json::from_str(url_raw.get()).map_err(|_| EventError::UrlType)?;
    let url = normalize_url(&url_str.ok_or(EventError::MissingUrl)?)?;
    let ts = parse_ts(raw.ts, now_ms, limits)?;
    Ok(Event {
        ts,
        url,
        visitor: opt_string(raw.visitor, "visitor", MAX_VISITOR_BYTES)?,
        referrer: opt_string(raw.referrer, "referrer", MAX_REFERRER_BYTES)?,
        id: opt_string(raw.id, "id", MAX_ID_BYTES)?,
        received_at: now_ms,
    })
}

/// Parses a whole request body. All or nothing: any invalid event fails the whole body, and the
/// error lists every invalid event with its 0-based index.
pub fn parse_body(
    body: &[u8],
    format: BodyFormat,
    now_ms: i64,
    limits: &IngestLimits,
) -> Result<Vec<Event>, BodyError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| BodyError::Malformed(format!("body is not UTF-8 ({e})")))?;
    // Each item with its index: its position in an array, or its line (blank ones count).
    let items: Vec<(usize, &str)> = match format {
        BodyFormat::Json => {
            let trimmed = text.trim_start();
            if trimmed.starts_with('[') {
                let raws: Vec<&RawValue> =
                    serde_json::from_str(text).map_err(|e| BodyError::Malformed(e.to_string()))?;
                raws.into_iter().map(RawValue::get).enumerate().collect()
            } else if trimmed.starts_with('{') {
                let raw: &RawValue =
                    serde_json::from_str(text).map_err(|e| BodyError::Malformed(e.to_string()))?;
                vec![(0, raw.get())]
            } else {
                return match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                    Ok(_) => Err(BodyError::NotEvents),
                    Err(e) => Err(BodyError::Malformed(e.to_string())),
                };
            }
        }
        BodyFormat::Ndjson => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .collect(),
    };
    if items.len() > limits.max_batch_events {
        return Err(BodyError::TooManyEvents(limits.max_batch_events));
    }
    let mut events = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (i, item) in items {
        match parse_event(item, now_ms, limits) {
            Ok(e) => events.push(e),
            Err(e) => errors.push((i, e)),
        }
    }
    if errors.is_empty() {
        Ok(events)
    } else {
        Err(BodyError::Invalid(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters_within_the_byte_limit() {
        assert_eq!(truncate_to_bytes("abc", 5), "abc");
        assert_eq!(truncate_to_bytes("abcdef", 3), "abc");
        // "é" is two bytes: a cut inside it keeps the characters before it.
        assert_eq!(truncate_to_bytes("aé", 2), "a");
        let long = "ü".repeat(MAX_REFERRER_BYTES);
        let t = truncate_to_bytes(&long, MAX_REFERRER_BYTES);
        assert_eq!(t.len(), MAX_REFERRER_BYTES);
        assert!(t.chars().all(|c| c == 'ü'));
    }

    const NOW: i64 = 1_795_000_000_000;

    fn lim() -> IngestLimits {
        IngestLimits::default()
    }

    #[test]
    fn parses_object_array_and_ndjson() {
        let one = parse_body(
            br#"{"url":"HTTP://A.com:80/x#f","visitor":"v"}"#,
            BodyFormat::Json,
            NOW,
            &lim(),
        )
        .unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].url, "http://a.com/x");
        assert_eq!(one[0].ts, NOW);
        assert_eq!(one[0].visitor.as_deref(), Some("v"));
        let arr = parse_body(
            br#"[{"url":"http://a.com/"},{"url":"http://b.com/","ts":1794999999000}]"#,
            BodyFormat::Json,
            NOW,
            &lim(),
        )
        .unwrap();
        assert_eq!(arr[1].ts, 1_794_999_999_000);
        let nd = parse_body(b"{\"url\":\"http://a.com/\"}\n\n{\"url\":\"http://b.com/\",\"ts\":\"2026-11-18T00:00:00Z\"}\n", BodyFormat::Ndjson, NOW, &lim()).unwrap();
        assert_eq!(nd.len(), 2);
    }

    #[test]
    fn one_bad_event_fails_the_body_with_its_index() {
        let err = parse_body(
            br#"[{"url":"http://a.com/"},{"url":"nope"},{"url":"http://b.com/","ts":true}]"#,
            BodyFormat::Json,
            NOW,
            &lim(),
        )
        .unwrap_err();
        match err {
            BodyError::Invalid(errs) => {
                assert_eq!(errs.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2]);
                assert_eq!(errs[1].1, EventError::TsType);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn bounds_and_types() {
        let e = |s: &str| parse_event(s, NOW, &lim()).unwrap_err();
        assert_eq!(
            e(r#"{"url":"http://a.com/","ts":9999999999999}"#),
            EventError::TsFuture(300)
        );
        assert_eq!(
            e(r#"{"url":"http://a.com/","ts":0}"#),
            EventError::TsTooOld(3650)
        );
        assert_eq!(e(r#"{"url":"http://a.com/","ts":1.5}"#), EventError::TsType);
        // A max_age reaching before the year 1 still refuses what tally cannot represent.
        let ancient = IngestLimits {
            max_age_ms: i64::MAX,
            ..lim()
        };
        let e_any = |s: &str| parse_event(s, NOW, &ancient).unwrap_err();
        assert_eq!(
            e_any(r#"{"url":"http://a.com/","ts":-9223372036854775808}"#),
            EventError::TsRange
        );
        assert_eq!(
            e_any(r#"{"url":"http://a.com/","ts":"0000-12-31T23:59:59Z"}"#),
            EventError::TsRange
        );
        let before_1970 = parse_event(
            r#"{"url":"http://a.com/","ts":"1969-07-20T20:17:00Z"}"#,
            NOW,
            &ancient,
        )
        .unwrap();
        assert_eq!(before_1970.ts, -14_182_980_000);
        assert_eq!(e(r#"{"ts":1}"#), EventError::MissingUrl);
        assert_eq!(e(r#"{"url":5}"#), EventError::UrlType);
        assert_eq!(e("[1]"), EventError::NotObject);
        let long = format!(r#"{{"url":"http://a.com/","id":"{}"}}"#, "x".repeat(129));
        assert_eq!(
            e(&long),
            EventError::FieldTooLong {
                field: "id",
                max: 128
            }
        );
        assert!(parse_event(
            r#"{"url":"http://a.com/","visitor":null,"extra":[1]}"#,
            NOW,
            &lim()
        )
        .is_ok());
    }

    /// The index of an invalid NDJSON event is its line, blank lines included.
    #[test]
    fn an_invalid_ndjson_event_is_named_by_its_line() {
        let body = b"{\"url\":\"http://a.test/\"}\n\n{\"url\":\"nope\"}\n";
        match parse_body(body, BodyFormat::Ndjson, NOW, &lim()) {
            Err(BodyError::Invalid(errors)) => {
                let lines: Vec<usize> = errors.iter().map(|(i, _)| *i).collect();
                assert_eq!(lines, [2]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_and_wrong_shapes() {
        assert!(matches!(
            parse_body(b"{", BodyFormat::Json, NOW, &lim()),
            Err(BodyError::Malformed(_))
        ));
        assert_eq!(
            parse_body(b"42", BodyFormat::Json, NOW, &lim()),
            Err(BodyError::NotEvents)
        );
        assert!(matches!(
            parse_body(b"{oops\n", BodyFormat::Ndjson, NOW, &lim()),
            Err(BodyError::Invalid(_))
        ));
        let many = IngestLimits {
            max_batch_events: 1,
            ..lim()
        };
        assert_eq!(
            parse_body(b"[{},{}]", BodyFormat::Json, NOW, &many),
            Err(BodyError::TooManyEvents(1))
        );
    }

    #[test]
    fn content_types() {
        assert_eq!(
            BodyFormat::from_content_type("application/json; charset=utf-8"),
            Some(BodyFormat::Json)
        );
        assert_eq!(
            BodyFormat::from_content_type("application/x-ndjson"),
            Some(BodyFormat::Ndjson)
        );
        assert_eq!(BodyFormat::from_content_type("text/plain"), None);
    }
}
