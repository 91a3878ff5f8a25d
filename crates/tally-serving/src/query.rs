//! `GET /v1/views`, `GET /v1/top` and `GET /v1/uniques` — the batch view plus the speed epochs
//! after its cutoff — and what every query route shares: its parameters (range, zone, URL,
//! limit), the provenance and `speed_available` of an answer, and running a query off the async
//! workers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tally_batch::{relative_error, BatchView, VisitorSketch};
use tally_core::{
    checked_ts, format_rfc3339, normalize_url, now_ms, parse_ts_param, Granularity, Zone, CELL_MS,
    MIN_TS_MS,
};

use crate::cache::{TopKey, UniquesKey};
use crate::error::{ApiError, ApiResult};
use crate::extract::{params, Params};
use crate::merge::{bucket_series, top_from_maps};
use crate::state::AppState;
use crate::views::ViewManager;

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

/// The `url` parameter, normalised; with `hash=1` its fragment is kept (a hash-routed page,
/// API.md "Hash-routed pages"), else dropped.
/// The sketch precision of an answer: the serving view's, else the configured one.
pub(crate) fn precision_of(state: &AppState, view: Option<&Arc<BatchView>>) -> u8 {
    view.and_then(|v| v.sketch_precision())
        .unwrap_or(state.sketch_precision)
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

/// Which batch view an answer comes from (`batch` in every query answer; null without one).
#[derive(Debug, serde::Serialize)]
pub(crate) struct Provenance<'a> {
    version: &'a str,
    cutoff_seq: u64,
    computed_at: String,
}

pub(crate) fn provenance(view: Option<&Arc<BatchView>>) -> Option<Provenance<'_>> {
    view.map(|v| Provenance {
        version: &v.version,
        cutoff_seq: v.cutoff_seq.get(),
        computed_at: format_rfc3339(v.computed_at_ms),
    })
}

/// One bucket of a `series`.
#[derive(serde::Serialize)]
struct Bucket {
    start: String,
    views: u64,
    /// The bucket's views from the batch view and from the speed layer (the dashboard's
    /// page view shows the two apart).
    batch_views: u64,
    speed_views: u64,
}

/// The `GET /v1/views` answer, serialised straight from this struct (the hottest endpoint: no
/// intermediate JSON tree).
#[derive(serde::Serialize)]
struct ViewsAnswer<'a> {
    url: &'a str,
    from: String,
    to: String,
    tz: &'static str,
    views: u64,
    batch_views: u64,
    speed_views: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    series: Option<Vec<Bucket>>,
    batch: Option<Provenance<'a>>,
    speed_available: bool,
}

/// Adds `X-Tally-Degraded: speed` when the speed layer could not be read.
pub(crate) fn respond<T: serde::Serialize>(body: T, speed_available: bool) -> Response {
    let mut resp = Json(body).into_response();
    if !speed_available {
        resp.headers_mut().insert(
            HeaderName::from_static("x-tally-degraded"),
            HeaderValue::from_static("speed"),
        );
    }
    resp
}

/// Runs a query's CPU-bound part on the blocking pool: a grouping over every source key of a
/// large site takes seconds, and on an async worker it would hold up every light request queued
/// behind it (the server's concurrency limit still bounds how many run).
pub(crate) async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("the query task failed: {e}")))?
}

/// A speed-layer read as the handlers need it: `None` when the speed layer is unavailable
/// (answer batch-only, degraded), 503 when the serving view's epochs were collected.
pub(crate) fn speed_read<T>(r: tally_speed::Read<T>) -> ApiResult<Option<T>> {
    r.map_err(|e| {
        ApiError::Unavailable(format!(
            "This answer cannot be exact right now: {e}. A rerun is publishing one; retry shortly."
        ))
    })
}

pub(crate) async fn get_views(State(state): State<AppState>, q: Params) -> ApiResult<Response> {
    let q = params(q)?;
    let url = url_param(&q)?;
    let granularity = granularity_param(&q)?;
    let range = query_range(&q)?;
    let view = state.views.current();
    let cutoff = ViewManager::cutoff(view.as_ref());
    let batch_views = view
        .as_ref()
        .map_or(0, |v| v.range_views(&url, range.from_cell, range.to_cell));
    let speed = &state.speed;
    // One read of the speed layer per answer: with a series, its total is the series' sum, so
    // an apply (or Redis going away) between two reads cannot make them disagree.
    let speed_cells = match granularity {
        Granularity::Total => None,
        _ => Some(speed_read(speed.cell_counts(
            &url,
            cutoff,
            range.from_cell,
            range.to_cell,
        ))?),
    };
    let speed_views = match &speed_cells {
        None => speed_read(speed.views(&url, cutoff, range.from_cell, range.to_cell))?,
        Some(cells) => (cells.as_ref()).map(|c| c.iter().map(|(_, v)| *v).sum()),
    };
    let speed_available = speed_views.is_some();
    let speed_views = speed_views.unwrap_or(0);
    let series = if let Some(speed_cells) = speed_cells {
        let batch_cells = view
            .as_ref()
            .map(|v| v.cell_counts(&url, range.from_cell, range.to_cell))
            .unwrap_or_default();
        let speed_cells = speed_cells.unwrap_or_default();
        // Each layer bucketed on its own, then the two merged by bucket start.
        let mut buckets: BTreeMap<i64, (u64, u64)> = BTreeMap::new();
        for (start, views) in bucket_series(batch_cells, granularity, range.zone) {
            buckets.entry(start).or_default().0 += views;
        }
        for (start, views) in bucket_series(speed_cells, granularity, range.zone) {
            buckets.entry(start).or_default().1 += views;
        }
        Some(
            buckets
                .into_iter()
                .map(|(start, (batch_views, speed_views))| Bucket {
                    start: range.zone.format(start),
                    views: batch_views + speed_views,
                    batch_views,
                    speed_views,
                })
                .collect(),
        )
    } else {
        None
    };
    let body = ViewsAnswer {
        url: &url,
        from: range.zone.format(range.start_ms()),
        to: range.zone.format(range.end_ms()),
        tz: range.zone.name(),
        views: batch_views + speed_views,
        batch_views,
        speed_views,
        series,
        batch: provenance(view.as_ref()),
        speed_available,
    };
    Ok(respond(body, speed_available))
}

pub(crate) async fn get_top(State(state): State<AppState>, q: Params) -> ApiResult<Response> {
    let q = params(q)?;
    let limit = limit_param(&q)?;
    let host = match q.get("host") {
        None => None,
        Some(h) => Some(
            tally_core::url::normalize_host(h)
                .map_err(|e| ApiError::bad(format!("The host parameter is invalid: {e}.")))?,
        ),
    };
    let range = query_range(&q)?;
    let view = state.views.current();
    let cutoff = ViewManager::cutoff(view.as_ref());
    // A ranking is a pure function of the batch view, the speed state (which changes only
    // when the applied seq does) and the parameters: answer repeats from a small cache.
    let key = TopKey {
        version: view.as_ref().map(|v| v.version.clone()),
        applied: state.speed.applied_seq(),
        limit,
        host: host.clone(),
        from_cell: range.from_cell,
        to_cell: range.to_cell,
    };
    let cached = state
        .speed
        .available()
        .then(|| state.top_cache.get(&key))
        .flatten();
    let (items, speed_available) = match cached {
        Some(items) => (items, true),
        None => {
            let (items, speed_available) = rank_top(
                &state,
                view.as_ref(),
                cutoff,
                &range,
                host.as_deref(),
                limit,
            )?;
            let items = Arc::new(items);
            if speed_available {
                state.top_cache.put(key, items.clone());
            }
            (items, speed_available)
        }
    };
    let body = json!({
        "from": range.zone.format(range.start_ms()),
        "to": range.zone.format(range.end_ms()),
        "tz": range.zone.name(),
        "items": items.iter().map(|(url, views)| json!({ "url": url, "views": views })).collect::<Vec<_>>(),
        "batch": provenance(view.as_ref()),
        "speed_available": speed_available,
    });
    Ok(respond(body, speed_available))
}

/// `GET /v1/uniques`: the batch view's sketches and cell visitor lists of the range, merged with
/// the visitor hashes of the live speed epochs, so a visitor seen by both layers counts once.
pub(crate) async fn get_uniques(State(state): State<AppState>, q: Params) -> ApiResult<Response> {
    let q = params(q)?;
    let url = url_param(&q)?;
    let range = query_range(&q)?;
    let cells = uniques_cells(&range);
    let view = state.views.current();
    let cutoff = ViewManager::cutoff(view.as_ref());
    let precision = precision_of(&state, view.as_ref());
    let key = UniquesKey {
        version: view.as_ref().map(|v| v.version.clone()),
        applied: state.speed.applied_seq(),
        url: url.clone(),
        cells,
    };
    let cached = state
        .speed
        .available()
        .then(|| state.uniques_cache.get(&key))
        .flatten();
    let ((uniques, exact), speed_available) = match cached {
        Some(answer) => (*answer, true),
        None => {
            let speed = speed_read(
                state
                    .speed
                    .visitors(&url, cutoff, cells.0, cells.1, precision),
            )?;
            let speed_available = speed.is_some();
            // The same 32-bit visitor hash as the batch sketches (`tally_core::sketch`), so a
            // visitor in both layers is one hash; one union of every day and cell, the speed
            // layer's hashes and the registers of its busy cells.
            let speed = speed.unwrap_or_default();
            let busy = speed
                .registers
                .map(|r| VisitorSketch::from_registers(precision, r))
                .transpose()
                .map_err(ApiError::internal)?;
            let merged = match view.as_ref() {
                Some(v) => v.uniques_sketch(&url, cells, precision, busy.as_ref(), &speed.hashes),
                None => VisitorSketch::union(precision, busy.as_ref(), &speed.hashes),
            }
            .map_err(ApiError::internal)?;
            let answer = (merged.estimate().round() as u64, merged.is_sparse());
            if speed_available {
                state.uniques_cache.put(key, Arc::new(answer));
            }
            (answer, speed_available)
        }
    };
    let body = json!({
        "url": url,
        "from": range.zone.format(cells.0 * CELL_MS),
        "to": range.zone.format(cells.1 * CELL_MS),
        "tz": range.zone.name(),
        "uniques": uniques,
        "relative_error": relative_error(precision),
        "exact": exact,
        "batch": provenance(view.as_ref()),
        "speed_available": speed_available,
    });
    Ok(respond(body, speed_available))
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

/// Exact top-N of the batch view plus the speed epochs after its cutoff; the flag says whether
/// the speed layer could be read. All time (the dashboard's default and the common case) comes
/// from the speed layer's incremental rankings in `O(limit)`; other ranges, and what the rankings
/// do not keep, scan the URLs with views in the range.
fn rank_top(
    state: &AppState,
    view: Option<&Arc<BatchView>>,
    cutoff: tally_core::Seq,
    range: &CellRange,
    host: Option<&str>,
    limit: usize,
) -> ApiResult<(Vec<(String, u64)>, bool)> {
    if range.all_time {
        let id = view.map_or("", |v| v.version.as_str());
        let ranked = speed_read(
            state
                .speed
                .top_all_time(id, cutoff, limit, host, range.to_cell),
        )?;
        if let Some(Some(items)) = ranked {
            return Ok((items, true));
        }
    }
    let empty = HashMap::new();
    let rank = |speed: &HashMap<&str, u64>| match view {
        None => top_from_maps(std::iter::empty(), speed, limit),
        Some(v) => {
            let mut batch = Vec::new();
            v.range_totals(range.from_cell, range.to_cell, host, |url, n| {
                batch.push((url, n));
            });
            top_from_maps(batch, speed, limit)
        }
    };
    // Ranked under the speed mirror's read lock, without copying its URLs.
    let ranked = speed_read(state.speed.with_range_totals(
        cutoff,
        range.from_cell,
        range.to_cell,
        host,
        |speed| rank(speed),
    ))?;
    Ok(match ranked {
        Some(items) => (items, true),
        None => (rank(&empty), false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
