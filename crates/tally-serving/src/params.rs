//! The request parameters every query route reads: the range and zone (`from`, `to`, `tz`),
//! `granularity`, `limit`, `url` (with `hash`) and `host`, each parsed and refused with one
//! readable sentence in one place.

use std::collections::HashMap;

use tally_core::{
    checked_ts, normalize_url, now_ms, parse_ts_param, Granularity, Zone, CELL_MS, MIN_TS_MS,
};

use crate::error::{ApiError, ApiResult};

/// A query range `[from_cell, to_cell)` of 15-minute cells, bounded by local hours of `zone`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CellRange {
    pub from_cell: i64,
    pub to_cell: i64,
    /// Neither bound was given: all time until the next full hour (the speed layer's all-time
    /// rankings answer it).
    pub all_time: bool,
    /// The `tz` of the query (UTC by default): its local hours, days and months.
    pub zone: Zone,
}

impl CellRange {
    pub(crate) fn start_ms(&self) -> i64 {
        self.from_cell * CELL_MS
    }

    pub(crate) fn end_ms(&self) -> i64 {
        self.to_cell * CELL_MS
    }
}

/// `tz`: an IANA zone name, UTC when absent.
pub(crate) fn zone_param(q: &HashMap<String, String>) -> ApiResult<Zone> {
    match q.get("tz") {
        None => Ok(Zone::UTC),
        Some(name) => Zone::parse(name).ok_or_else(|| {
            ApiError::bad(format!(
                "tz must be an IANA time zone name such as Europe/Berlin or UTC, not {name:?}."
            ))
        }),
    }
}

/// `from`/`to` truncated to the (local) hour; missing `from` is the beginning of time, missing
/// `to` is now rounded up to the next (local) hour (API.md). A time without an offset is read
/// in the query's `tz`.
pub(crate) fn query_range(q: &HashMap<String, String>) -> ApiResult<CellRange> {
    let zone = zone_param(q)?;
    let parse = |name: &str| -> ApiResult<Option<i64>> {
        match q.get(name) {
            None => Ok(None),
            Some(s) => parse_ts_param(s)
                .or_else(|| zone.parse_local(s).and_then(checked_ts))
                .map(Some)
                .ok_or_else(|| {
                    ApiError::bad(format!(
                        "{name} must be an RFC 3339 timestamp, a local date-time such as 2026-11-21T10:00 or epoch milliseconds between the years 0001 and 9999, not {s:?}."
                    ))
                }),
        }
    };
    let from = parse("from")?;
    let to = parse("to")?;
    // The beginning of time is the earliest instant any accepted event can have (events before
    // 1970 are valid with a large `ingest.max_age`), so every endpoint counts the same events.
    let from_ms = from.map_or(MIN_TS_MS, |t| zone.hour_start(t).max(MIN_TS_MS));
    let to_ms = match to {
        Some(t) => zone.hour_start(t),
        None => zone.next_hour_start(now_ms()),
    };
    let (from_cell, to_cell) = (from_ms.div_euclid(CELL_MS), to_ms.div_euclid(CELL_MS));
    if from_cell >= to_cell {
        return Err(ApiError::bad(
            "from must be earlier than to (after truncating both to the hour).",
        ));
    }
    Ok(CellRange {
        from_cell,
        to_cell,
        all_time: from.is_none() && to.is_none(),
        zone,
    })
}

/// `limit`: how many items a ranking lists, 1 to 1000 (default 10).
pub(crate) fn limit_param(q: &HashMap<String, String>) -> ApiResult<usize> {
    match q.get("limit") {
        None => Ok(10),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => Ok(n),
            _ => Err(ApiError::bad(format!(
                "limit must be an integer from 1 to 1000, not {s:?}."
            ))),
        },
    }
}

/// `granularity`: `total` (the default), `hour`, `day` or `month`.
pub(crate) fn granularity_param(q: &HashMap<String, String>) -> ApiResult<Granularity> {
    match q.get("granularity") {
        None => Ok(Granularity::Total),
        Some(g) => Granularity::parse(g).ok_or_else(|| {
            ApiError::bad(format!(
                "granularity must be total, hour, day or month, not {g:?}."
            ))
        }),
    }
}

/// The `url` parameter, normalised; with `hash=1` its fragment is kept (a hash-routed page,
/// API.md "Hash-routed pages"), else dropped.
pub(crate) fn url_param(q: &HashMap<String, String>) -> ApiResult<String> {
    let raw = q
        .get("url")
        .ok_or_else(|| ApiError::bad("The url parameter is required."))?;
    let hash = match q.get("hash").map(String::as_str) {
        None | Some("0") | Some("false") => false,
        Some("1") | Some("true") => true,
        Some(h) => {
            return Err(ApiError::bad(format!(
                "hash must be 1 (keep the url's #fragment) or 0, not {h:?}."
            )))
        }
    };
    if hash {
        tally_core::url::normalize_hash_url(raw)
    } else {
        normalize_url(raw)
    }
    .map_err(|e| ApiError::bad(format!("The url parameter is invalid: {e}.")))
}

/// The cells `[from, to)` of a uniques query: day-aligned in the query's zone, `from` down to
/// its local midnight and `to` up to the next one. Local midnights are whole cells in every zone
/// (the batch view keeps visitor lists per cell for the UTC days they cut). Never before the
/// beginning of time ([`MIN_TS_MS`], a cell boundary): in a zone east of UTC its local midnight
/// would be in year 0.
pub(crate) fn uniques_cells(range: &CellRange) -> (i64, i64) {
    let zone = range.zone;
    let from = zone.day_start(range.start_ms()).max(MIN_TS_MS);
    let to = match zone.day_start(range.end_ms()) {
        t if t == range.end_ms() => t,
        _ => zone.next_day_start(range.end_ms()),
    };
    (from.div_euclid(CELL_MS), to.div_euclid(CELL_MS))
}

pub(crate) fn host_param(q: &HashMap<String, String>) -> ApiResult<String> {
    let raw = q
        .get("host")
        .ok_or_else(|| ApiError::bad("The host parameter is required."))?;
    tally_core::url::normalize_host(raw)
        .map_err(|e| ApiError::bad(format!("The host parameter is invalid: {e}.")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::format_rfc3339;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn missing_to_is_the_next_hour_and_from_the_beginning_of_time() {
        let next = || (tally_core::hour_of(now_ms()) + 1) * tally_core::CELLS_PER_HOUR;
        let before = next();
        let r = query_range(&q(&[])).unwrap();
        let after = next();
        assert!(r.to_cell == before || r.to_cell == after);
        assert_eq!(r.start_ms(), MIN_TS_MS);
        assert!(r.all_time);
    }

    #[test]
    fn bounds_truncate_to_the_hour_and_must_be_ordered() {
        let r = query_range(&q(&[
            ("from", "2026-11-21T10:30:00Z"),
            ("to", "2026-11-21T12:59:59Z"),
        ]))
        .unwrap();
        assert_eq!(format_rfc3339(r.start_ms()), "2026-11-21T10:00:00Z");
        assert_eq!(format_rfc3339(r.end_ms()), "2026-11-21T12:00:00Z");
        assert!(!r.all_time);
        assert!(query_range(&q(&[
            ("from", "2026-11-21T10:30:00Z"),
            ("to", "2026-11-21T10:59:00Z")
        ]))
        .is_err());
        assert!(query_range(&q(&[("from", "yesterday")])).is_err());
        // Bounds that would overflow the bucket arithmetic are refused, not wrapped.
        assert!(query_range(&q(&[("to", "9223372036854775807")])).is_err());
        assert!(query_range(&q(&[("from", "-9223372036854775808")])).is_err());
        let far = query_range(&q(&[("to", "253402300799999")])).unwrap();
        assert_eq!(format_rfc3339(far.end_ms()), "9999-12-31T23:00:00Z");
    }

    #[test]
    fn a_zone_truncates_to_its_local_hour_and_reads_local_times() {
        // Asia/Kolkata is +5:30: a `from` at local midnight is 18:30Z and stays there.
        let r = query_range(&q(&[
            ("tz", "Asia/Kolkata"),
            ("from", "2026-11-21"),
            ("to", "2026-11-21T10:59"),
        ]))
        .unwrap();
        assert_eq!(format_rfc3339(r.start_ms()), "2026-11-20T18:30:00Z");
        assert_eq!(r.zone.format(r.end_ms()), "2026-11-21T10:00:00+05:30");
        // A time with an offset is that instant, truncated to the local hour.
        let k = query_range(&q(&[
            ("tz", "Asia/Kathmandu"),
            ("from", "2026-11-21T10:20:00Z"),
            ("to", "2026-11-21T12:00:00Z"),
        ]))
        .unwrap();
        assert_eq!(format_rfc3339(k.start_ms()), "2026-11-21T10:15:00Z");
        assert_eq!(format_rfc3339(k.end_ms()), "2026-11-21T11:15:00Z");
        assert!(query_range(&q(&[("tz", "Europe/Atlantis")])).is_err());
        assert!(query_range(&q(&[("from", "2026-13-01")])).is_err());
    }

    #[test]
    fn uniques_cells_are_local_midnights_in_every_zone() {
        let r = query_range(&q(&[
            ("from", "2026-11-21T10:00:00Z"),
            ("to", "2026-11-22T00:00:00Z"),
        ]))
        .unwrap();
        let (a, b) = uniques_cells(&r);
        assert_eq!(
            (format_rfc3339(a * CELL_MS), format_rfc3339(b * CELL_MS)),
            ("2026-11-21T00:00:00Z".into(), "2026-11-22T00:00:00Z".into())
        );
        // Asia/Kolkata: from local midnight (18:30Z the day before) to the next one after `to`.
        let kolkata = query_range(&q(&[
            ("tz", "Asia/Kolkata"),
            ("from", "2026-11-21T10:00:00"),
            ("to", "2026-11-22T03:00:00"),
        ]))
        .unwrap();
        let (a, b) = uniques_cells(&kolkata);
        assert_eq!(
            (format_rfc3339(a * CELL_MS), format_rfc3339(b * CELL_MS)),
            ("2026-11-20T18:30:00Z".into(), "2026-11-22T18:30:00Z".into())
        );
        // All time, east of UTC: from the beginning of time, not the local midnight before it.
        let all = query_range(&q(&[("tz", "Asia/Kolkata")])).unwrap();
        assert_eq!(uniques_cells(&all).0 * CELL_MS, MIN_TS_MS);
    }
}
