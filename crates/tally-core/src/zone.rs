//! Time zones: local hours, days and months of an IANA zone as UTC instants (epoch ms).
//!
//! Every layer counts in 15-minute cells ([`crate::CELL_MS`]); every UTC offset in use since the
//! 1970s, and every DST shift, is a multiple of 15 minutes, so each local hour, day and month
//! below starts on a cell boundary and a query in any zone sums whole cells: exact counts, also
//! in Asia/Kolkata (+5:30), Asia/Kathmandu (+5:45) and Australia/Lord_Howe (30-minute DST).
//!
//! A local **hour** bucket is a local hour *at one UTC offset*: the two 01:00–02:00 hours of a
//! fall-back night are two buckets, and an hour cut by a transition starts at the transition.
//! A local **day** starts at the first instant of that local date (midnight, or the end of a
//! DST gap for zones that spring forward at midnight); a DST day has 23 or 25 hours.

use chrono::{
    Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeZone, Timelike,
};
use chrono_tz::Tz;

use crate::time::{format_rfc3339, month_start, CELL_MS, DAY_MS, HOUR_MS, MIN_TS_MS};

/// A bucket size of a time series (`granularity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Granularity {
    Total,
    Hour,
    Day,
    Month,
}

impl Granularity {
    pub fn parse(s: &str) -> Option<Granularity> {
        match s {
            "total" => Some(Granularity::Total),
            "hour" => Some(Granularity::Hour),
            "day" => Some(Granularity::Day),
            "month" => Some(Granularity::Month),
            _ => None,
        }
    }
}

/// An IANA time zone, or UTC (the default, computed without a zone database lookup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Zone(Option<Tz>);

impl Default for Zone {
    fn default() -> Zone {
        Zone::UTC
    }
}

impl Zone {
    pub const UTC: Zone = Zone(None);

    /// An IANA zone name (`Europe/Berlin`, `Asia/Kathmandu`, `UTC`); `None` when unknown.
    pub fn parse(name: &str) -> Option<Zone> {
        let tz: Tz = name.parse().ok()?;
        Some(if tz == Tz::UTC {
            Zone::UTC
        } else {
            Zone(Some(tz))
        })
    }

    /// The zone's IANA name (`UTC` for the default).
    pub fn name(&self) -> &'static str {
        match self.0 {
            None => "UTC",
            Some(tz) => tz.name(),
        }
    }

    pub fn is_utc(&self) -> bool {
        self.0.is_none()
    }

    /// Local time minus UTC at the instant `ts_ms`, in milliseconds.
    pub fn offset_ms(&self, ts_ms: i64) -> i64 {
        match self.0 {
            None => 0,
            Some(tz) => match chrono::DateTime::from_timestamp_millis(ts_ms) {
                Some(dt) => {
                    let off = tz.offset_from_utc_datetime(&dt.naive_utc());
                    i64::from(off.fix().local_minus_utc()) * 1000
                }
                None => 0,
            },
        }
    }

    /// The local date and time at `ts_ms`.
    fn local(&self, ts_ms: i64) -> NaiveDateTime {
        let t = ts_ms + self.offset_ms(ts_ms);
        chrono::DateTime::from_timestamp_millis(t)
            .map(|d| d.naive_utc())
            .unwrap_or_default()
    }

    /// The first instant whose local time is `naive` or later: `naive` itself (the earlier of
    /// two on a fall-back night), or the end of the DST gap it falls in.
    pub fn instant_of(&self, naive: NaiveDateTime) -> i64 {
        let Some(tz) = self.0 else {
            return naive.and_utc().timestamp_millis();
        };
        let mut t = naive;
        // Gaps are at most a few hours and a multiple of 15 minutes.
        for _ in 0..=4 * 26 {
            match tz.from_local_datetime(&t) {
                LocalResult::Single(d) => return d.timestamp_millis(),
                LocalResult::Ambiguous(a, _) => return a.timestamp_millis(),
                LocalResult::None => {
                    // Round up to the next quarter hour: the gap ends on one.
                    let into = i64::from(t.minute() % 15) * 60_000
                        + i64::from(t.second()) * 1000
                        + i64::from(t.nanosecond() / 1_000_000);
                    t += Duration::milliseconds(CELL_MS - into);
                }
            }
        }
        naive.and_utc().timestamp_millis() - self.offset_ms(naive.and_utc().timestamp_millis())
    }

    /// Start of the local midnight of `date`.
    fn day_start_of(&self, date: NaiveDate) -> i64 {
        self.instant_of(date.and_hms_opt(0, 0, 0).expect("midnight exists"))
    }

    /// Start of the local hour (at one offset) containing `ts_ms`.
    pub fn hour_start(&self, ts_ms: i64) -> i64 {
        if self.is_utc() {
            return ts_ms.div_euclid(HOUR_MS) * HOUR_MS;
        }
        let off = self.offset_ms(ts_ms);
        let mut s = ts_ms - (ts_ms + off).rem_euclid(HOUR_MS);
        // A transition inside this local hour: the bucket starts at the transition.
        while s < ts_ms && self.offset_ms(s) != off {
            s += CELL_MS.min(ts_ms - s);
        }
        s
    }

    /// Start of the local day containing `ts_ms`.
    pub fn day_start(&self, ts_ms: i64) -> i64 {
        if self.is_utc() {
            return ts_ms.div_euclid(DAY_MS) * DAY_MS;
        }
        self.day_start_of(self.local(ts_ms).date())
    }

    /// Start of the local day after the one containing `ts_ms`.
    pub fn next_day_start(&self, ts_ms: i64) -> i64 {
        if self.is_utc() {
            return (ts_ms.div_euclid(DAY_MS) + 1) * DAY_MS;
        }
        let d = self.local(ts_ms).date();
        match d.succ_opt() {
            Some(n) => self.day_start_of(n),
            None => ts_ms,
        }
    }

    /// Start of the local calendar month containing `ts_ms`.
    pub fn month_start(&self, ts_ms: i64) -> i64 {
        if self.is_utc() {
            return month_start(ts_ms);
        }
        let d = self.local(ts_ms).date();
        match d.with_day(1) {
            Some(first) => self.day_start_of(first),
            None => ts_ms,
        }
    }

    /// Start of the local bucket of `granularity` containing `ts_ms` (`Total`: `ts_ms`).
    pub fn bucket_start(&self, ts_ms: i64, granularity: Granularity) -> i64 {
        match granularity {
            Granularity::Total => ts_ms,
            Granularity::Hour => self.hour_start(ts_ms),
            Granularity::Day => self.day_start(ts_ms),
            Granularity::Month => self.month_start(ts_ms),
        }
    }

    /// The start of the next local hour after the one containing `ts_ms`.
    pub fn next_hour_start(&self, ts_ms: i64) -> i64 {
        let s = self.hour_start(ts_ms);
        let mut t = s + CELL_MS;
        while self.hour_start(t) == s {
            t += CELL_MS;
        }
        self.hour_start(t)
    }

    /// Parses a local date-time without an offset (`2026-11-21T10:00`, with optional seconds
    /// and fraction, or a date `2026-11-21` meaning its midnight) as a time in this zone.
    pub fn parse_local(&self, s: &str) -> Option<i64> {
        let s = s.trim();
        let naive = NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
            .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M"))
            .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f"))
            .ok()
            .or_else(|| {
                NaiveDate::parse_from_str(s, "%Y-%m-%d")
                    .ok()
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
            })?;
        if !(1..=9999).contains(&naive.year()) {
            return None;
        }
        Some(self.instant_of(naive))
    }

    /// RFC 3339 in local time with the zone's offset at that instant (`Z` in UTC). The
    /// beginning of time (a range without `from`) is spelled in UTC: the zone database's local
    /// mean time of the year 1 (`+05:53:28` in Asia/Kolkata) names the same instant, oddly.
    pub fn format(&self, ts_ms: i64) -> String {
        if ts_ms <= MIN_TS_MS {
            return format_rfc3339(ts_ms);
        }
        match self.0 {
            None => format_rfc3339(ts_ms),
            Some(tz) => match tz.timestamp_millis_opt(ts_ms).single() {
                Some(dt) => dt.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false),
                None => format_rfc3339(ts_ms),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::parse_ts_str;

    fn ts(s: &str) -> i64 {
        parse_ts_str(s).unwrap()
    }

    fn z(name: &str) -> Zone {
        Zone::parse(name).unwrap()
    }

    #[test]
    fn unknown_zones_are_refused_and_utc_is_the_default() {
        assert!(Zone::parse("Mars/Olympus_Mons").is_none());
        assert!(Zone::parse("").is_none());
        assert!(z("UTC").is_utc());
        assert_eq!(Zone::default().name(), "UTC");
        assert_eq!(z("Asia/Kathmandu").name(), "Asia/Kathmandu");
    }

    #[test]
    fn hours_in_zones_with_quarter_and_half_hour_offsets() {
        let k = z("Asia/Kathmandu"); // +5:45
        assert_eq!(
            k.format(k.hour_start(ts("2026-11-21T10:20:00Z"))),
            "2026-11-21T16:00:00+05:45"
        );
        assert_eq!(
            k.hour_start(ts("2026-11-21T10:20:00Z")),
            ts("2026-11-21T10:15:00Z")
        );
        let i = z("Asia/Kolkata"); // +5:30
        assert_eq!(
            i.day_start(ts("2026-11-21T20:00:00Z")),
            ts("2026-11-21T18:30:00Z")
        );
        assert_eq!(
            i.format(ts("2026-11-21T18:30:00Z")),
            "2026-11-22T00:00:00+05:30"
        );
        assert_eq!(i.format(MIN_TS_MS), "0001-01-01T00:00:00Z");
    }

    #[test]
    fn dst_days_have_23_and_25_hours_and_fall_back_hours_are_two_buckets() {
        let b = z("Europe/Berlin");
        // 2026-03-29: clocks go 02:00 -> 03:00 (23 hours); 2026-10-25: 03:00 -> 02:00 (25 hours).
        let spring = b.day_start(ts("2026-03-29T12:00:00Z"));
        assert_eq!(b.next_day_start(spring) - spring, 23 * HOUR_MS);
        let fall = b.day_start(ts("2026-10-25T12:00:00Z"));
        assert_eq!(fall, ts("2026-10-24T22:00:00Z"));
        assert_eq!(b.next_day_start(fall) - fall, 25 * HOUR_MS);
        // Local 02:00-03:00 happens twice on 2026-10-25: at +02:00 (00:00Z) and +01:00 (01:00Z).
        let first = b.hour_start(ts("2026-10-25T00:30:00Z"));
        let second = b.hour_start(ts("2026-10-25T01:30:00Z"));
        assert_eq!(first, ts("2026-10-25T00:00:00Z"));
        assert_eq!(second, ts("2026-10-25T01:00:00Z"));
        assert_eq!(b.next_hour_start(first), second);
        assert_eq!(b.format(second), "2026-10-25T02:00:00+01:00");
        // A local time in the spring gap is the end of the gap; an ambiguous one the earlier.
        assert_eq!(
            b.parse_local("2026-03-29T02:30"),
            Some(ts("2026-03-29T01:00:00Z"))
        );
        assert_eq!(
            b.parse_local("2026-10-25T02:30:00"),
            Some(ts("2026-10-25T00:30:00Z"))
        );
        assert_eq!(
            b.month_start(ts("2026-11-21T10:00:00Z")),
            ts("2026-10-31T23:00:00Z")
        );
    }

    #[test]
    fn lord_howe_shifts_by_half_an_hour() {
        let l = z("Australia/Lord_Howe");
        // 2026-10-04 02:00 local (+10:30) becomes 02:30 (+11:00), at 15:30Z the day before.
        let h = l.hour_start(ts("2026-10-03T15:40:00Z"));
        assert_eq!(h, ts("2026-10-03T15:30:00Z"));
        assert_eq!(l.format(h), "2026-10-04T02:30:00+11:00");
        let before = l.hour_start(ts("2026-10-03T15:20:00Z"));
        assert_eq!(l.format(before), "2026-10-04T01:00:00+10:30");
        assert_eq!(l.next_hour_start(before), h);
        let day = l.day_start(ts("2026-10-03T20:00:00Z"));
        assert_eq!(l.next_day_start(day) - day, 23 * HOUR_MS + 30 * 60_000);
    }

    #[test]
    fn a_day_that_starts_after_a_midnight_gap() {
        // America/Havana springs forward at midnight: 2026-03-08 starts at 01:00 local.
        let h = z("America/Havana");
        let d = h.day_start(ts("2026-03-08T12:00:00Z"));
        assert_eq!(h.format(d), "2026-03-08T01:00:00-04:00");
    }

    #[test]
    fn every_bucket_starts_on_a_cell_boundary() {
        for name in [
            "Asia/Kathmandu",
            "Australia/Eucla",
            "Pacific/Chatham",
            "America/St_Johns",
        ] {
            let zone = z(name);
            let mut t = ts("2026-01-01T00:00:00Z");
            while t < ts("2027-01-01T00:00:00Z") {
                for g in [Granularity::Hour, Granularity::Day, Granularity::Month] {
                    let s = zone.bucket_start(t, g);
                    assert_eq!(s.rem_euclid(CELL_MS), 0, "{name} {g:?} at {t}");
                    assert!(s <= t);
                }
                t += 7 * HOUR_MS + CELL_MS;
            }
        }
    }
}
