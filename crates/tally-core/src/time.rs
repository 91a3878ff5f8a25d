//! Timestamps and UTC buckets. All times are epoch milliseconds (`i64`), UTC.

use chrono::{DateTime, Datelike, NaiveDate, SecondsFormat, TimeZone, Utc};

pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 86_400_000;

/// Hour bucket number (hours since the epoch) of a timestamp.
pub fn hour_of(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(HOUR_MS)
}

/// Day bucket number (days since the epoch) of a timestamp.
pub fn day_of(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(DAY_MS)
}

/// Start (epoch ms) of the UTC calendar month containing `ts_ms`.
pub fn month_start(ts_ms: i64) -> i64 {
    match Utc.timestamp_millis_opt(ts_ms).single() {
        Some(dt) => NaiveDate::from_ymd_opt(dt.year(), dt.month(), 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|d| d.and_utc().timestamp_millis())
            .unwrap_or(ts_ms),
        None => ts_ms,
    }
}

/// Parses an RFC 3339 timestamp into epoch milliseconds.
pub fn parse_ts_str(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|dt| dt.timestamp_millis())
}

/// Parses a query-string timestamp: RFC 3339 or integer epoch milliseconds.
pub fn parse_ts_param(s: &str) -> Option<i64> {
    let s = s.trim();
    if !s.is_empty()
        && s.bytes()
            .enumerate()
            .all(|(i, b)| b.is_ascii_digit() || (i == 0 && b == b'-'))
    {
        return s.parse().ok();
    }
    parse_ts_str(s)
}

/// Formats epoch milliseconds as RFC 3339 with a `Z` (milliseconds only when non-zero).
pub fn format_rfc3339(ts_ms: i64) -> String {
    match Utc.timestamp_millis_opt(ts_ms).single() {
        Some(dt) => dt.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        None => ts_ms.to_string(),
    }
}

/// The current time in epoch milliseconds.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_floor_negative_times() {
        assert_eq!(hour_of(-1), -1);
        assert_eq!(hour_of(HOUR_MS), 1);
        assert_eq!(day_of(DAY_MS - 1), 0);
    }

    #[test]
    fn parses_and_formats() {
        let ms = parse_ts_str("2026-11-21T10:00:00Z").unwrap();
        assert_eq!(format_rfc3339(ms), "2026-11-21T10:00:00Z");
        assert_eq!(parse_ts_param(&ms.to_string()), Some(ms));
        assert_eq!(parse_ts_param("2026-11-21T11:00:00+01:00"), Some(ms));
        assert_eq!(parse_ts_param("yesterday"), None);
        assert_eq!(format_rfc3339(ms + 5), "2026-11-21T10:00:00.005Z");
    }

    #[test]
    fn month_start_is_first_of_month() {
        let ms = parse_ts_str("2026-02-17T13:14:15Z").unwrap();
        assert_eq!(format_rfc3339(month_start(ms)), "2026-02-01T00:00:00Z");
    }
}
