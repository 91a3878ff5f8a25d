//! Timestamps and UTC buckets. All times are epoch milliseconds (`i64`), UTC.

use chrono::{DateTime, Datelike, NaiveDate, SecondsFormat, TimeZone, Utc};

pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 86_400_000;
/// The time cell every layer counts in: 15 minutes. Every UTC offset in use (and every DST
/// shift) is a multiple of 15 minutes — Asia/Kolkata +5:30, Asia/Kathmandu +5:45,
/// Australia/Lord_Howe's 30-minute DST — so a local hour, day or month of any zone is a whole
/// number of cells, and counts stay exact in every time zone.
pub const CELL_MS: i64 = 900_000;
/// Cells per hour.
pub const CELLS_PER_HOUR: i64 = HOUR_MS / CELL_MS;

/// The earliest instant tally represents, `0001-01-01T00:00:00Z`: the beginning of time for a
/// range without `from`, and the lower bound of every timestamp it accepts (an event's `ts`, a
/// query's `from`/`to`). RFC 3339 has four-digit years, and the bound keeps every bucket
/// computation (`hour * HOUR_MS`, the next midnight) far from `i64` overflow.
pub const MIN_TS_MS: i64 = -62_135_596_800_000;
/// The latest instant tally represents, `9999-12-31T23:59:59.999Z`.
pub const MAX_TS_MS: i64 = 253_402_300_799_999;

/// `ts_ms` when it lies in `[MIN_TS_MS, MAX_TS_MS]`.
pub fn checked_ts(ts_ms: i64) -> Option<i64> {
    (MIN_TS_MS..=MAX_TS_MS).contains(&ts_ms).then_some(ts_ms)
}

/// Hour bucket number (hours since the epoch) of a timestamp.
pub fn hour_of(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(HOUR_MS)
}

/// Cell number ([`CELL_MS`] cells since the epoch) of a timestamp.
pub fn cell_of(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(CELL_MS)
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

/// Parses an RFC 3339 timestamp into epoch milliseconds; `None` outside
/// [`MIN_TS_MS`]..=[`MAX_TS_MS`].
pub fn parse_ts_str(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .and_then(|dt| checked_ts(dt.timestamp_millis()))
}

/// Parses a query-string timestamp: RFC 3339 or integer epoch milliseconds; `None` outside
/// [`MIN_TS_MS`]..=[`MAX_TS_MS`].
pub fn parse_ts_param(s: &str) -> Option<i64> {
    let s = s.trim();
    if !s.is_empty()
        && s.bytes()
            .enumerate()
            .all(|(i, b)| b.is_ascii_digit() || (i == 0 && b == b'-'))
    {
        return s.parse().ok().and_then(checked_ts);
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
    fn timestamps_outside_years_1_to_9999_are_refused() {
        assert_eq!(format_rfc3339(MIN_TS_MS), "0001-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(MAX_TS_MS), "9999-12-31T23:59:59.999Z");
        assert_eq!(parse_ts_param(&MIN_TS_MS.to_string()), Some(MIN_TS_MS));
        assert_eq!(parse_ts_param(&MAX_TS_MS.to_string()), Some(MAX_TS_MS));
        assert_eq!(parse_ts_param(&(MIN_TS_MS - 1).to_string()), None);
        assert_eq!(parse_ts_param(&(MAX_TS_MS + 1).to_string()), None);
        assert_eq!(parse_ts_param("9223372036854775807"), None);
        assert_eq!(parse_ts_param("-9223372036854775808"), None);
        assert_eq!(parse_ts_param("99999999999999999999999"), None);
        assert_eq!(
            parse_ts_param("1969-07-20T20:17:00Z"),
            Some(-14_182_980_000)
        );
        // Bucket arithmetic at the bounds stays in range.
        assert!(hour_of(MAX_TS_MS)
            .checked_add(1)
            .and_then(|h| h.checked_mul(HOUR_MS))
            .is_some());
        assert!((day_of(MAX_TS_MS) + 2).checked_mul(DAY_MS).is_some());
    }

    #[test]
    fn month_start_is_first_of_month() {
        let ms = parse_ts_str("2026-02-17T13:14:15Z").unwrap();
        assert_eq!(format_rfc3339(month_start(ms)), "2026-02-01T00:00:00Z");
    }
}
