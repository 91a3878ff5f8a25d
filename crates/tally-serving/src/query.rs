//! `GET /v1/views` and `GET /v1/top`: the batch view plus the speed epochs after its cutoff.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tally_batch::{relative_error, BatchView, VisitorSketch};
use tally_core::{
    format_rfc3339, hour_of, normalize_url, now_ms, parse_ts_param, DAY_MS, HOUR_MS, MIN_TS_MS,
};

use crate::cache::{TopKey, UniquesKey};
use crate::error::{ApiError, ApiResult};
use crate::extract::{params, Params};
use crate::merge::{bucket_series, top_from_maps, Granularity};
use crate::state::AppState;
use crate::views::ViewManager;

/// An hour-aligned range `[from_hour, to_hour)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HourRange {
    pub from_hour: i64,
    pub to_hour: i64,
    /// Neither bound was given: all time until the next full hour (the speed layer's all-time
    /// rankings answer it).
    pub all_time: bool,
}

/// `from`/`to` truncated to the hour; missing `from` is the beginning of time, missing `to` is
/// now rounded up to the next hour (API.md).
pub(crate) fn hour_range(q: &HashMap<String, String>) -> ApiResult<HourRange> {
    let parse = |name: &str| -> ApiResult<Option<i64>> {
        match q.get(name) {
            None => Ok(None),
            Some(s) => parse_ts_param(s).map(Some).ok_or_else(|| {
                ApiError::bad(format!(
                    "{name} must be an RFC 3339 timestamp or epoch milliseconds between the years 0001 and 9999, not {s:?}."
                ))
            }),
        }
    };
    let from = parse("from")?;
    let to = parse("to")?;
    // The beginning of time is the earliest instant any accepted event can have (events before
    // 1970 are valid with a large `ingest.max_age`), so every endpoint counts the same events.
    let from_hour = hour_of(from.unwrap_or(MIN_TS_MS));
    let now = now_ms();
    let to_hour = match to {
        Some(t) => hour_of(t),
        None => hour_of(now) + 1,
    };
    if from_hour >= to_hour {
        return Err(ApiError::bad(
            "from must be earlier than to (after truncating both to the hour).",
        ));
    }
    Ok(HourRange {
        from_hour,
        to_hour,
        all_time: from.is_none() && to.is_none(),
    })
}

pub(crate) fn url_param(q: &HashMap<String, String>) -> ApiResult<String> {
    let raw = q
        .get("url")
        .ok_or_else(|| ApiError::bad("The url parameter is required."))?;
    normalize_url(raw).map_err(|e| ApiError::bad(format!("The url parameter is invalid: {e}.")))
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
}

/// The `GET /v1/views` answer, serialised straight from this struct (the hottest endpoint: no
/// intermediate JSON tree).
#[derive(serde::Serialize)]
struct ViewsAnswer<'a> {
    url: &'a str,
    from: String,
    to: String,
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
    let granularity = match q.get("granularity") {
        None => Granularity::Total,
        Some(g) => Granularity::parse(g).ok_or_else(|| {
            ApiError::bad(format!(
                "granularity must be total, hour, day or month, not {g:?}."
            ))
        })?,
    };
    let range = hour_range(&q)?;
    let view = state.views.current();
    let cutoff = ViewManager::cutoff(view.as_ref());
    let batch_views = view
        .as_ref()
        .map_or(0, |v| v.range_views(&url, range.from_hour, range.to_hour));
    let speed = &state.speed;
    let speed_views = speed_read(speed.views(&url, cutoff, range.from_hour, range.to_hour))?;
    let speed_available = speed_views.is_some();
    let speed_views = speed_views.unwrap_or(0);
    let series = if granularity == Granularity::Total {
        None
    } else {
        let batch_hours = view
            .as_ref()
            .map(|v| v.hour_counts(&url, range.from_hour, range.to_hour))
            .unwrap_or_default();
        let speed_hours = if speed_available {
            speed_read(speed.hour_counts(&url, cutoff, range.from_hour, range.to_hour))?
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let series = bucket_series(batch_hours.into_iter().chain(speed_hours), granularity);
        Some(
            series
                .into_iter()
                .map(|(start, views)| Bucket {
                    start: format_rfc3339(start),
                    views,
                })
                .collect(),
        )
    };
    let body = ViewsAnswer {
        url: &url,
        from: format_rfc3339(range.from_hour * HOUR_MS),
        to: format_rfc3339(range.to_hour * HOUR_MS),
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
    let limit = match q.get("limit") {
        None => 10,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => {
                return Err(ApiError::bad(format!(
                    "limit must be an integer from 1 to 1000, not {s:?}."
                )))
            }
        },
    };
    let host = match q.get("host") {
        None => None,
        Some(h) => Some(
            tally_core::url::normalize_host(h)
                .map_err(|e| ApiError::bad(format!("The host parameter is invalid: {e}.")))?,
        ),
    };
    let range = hour_range(&q)?;
    let view = state.views.current();
    let cutoff = ViewManager::cutoff(view.as_ref());
    // A ranking is a pure function of the batch view, the speed state (which changes only
    // when the applied seq does) and the parameters: answer repeats from a small cache.
    let key = TopKey {
        version: view.as_ref().map(|v| v.version.clone()),
        applied: state.speed.applied_seq(),
        limit,
        host: host.clone(),
        from_hour: range.from_hour,
        to_hour: range.to_hour,
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
        "from": format_rfc3339(range.from_hour * HOUR_MS),
        "to": format_rfc3339(range.to_hour * HOUR_MS),
        "items": items.iter().map(|(url, views)| json!({ "url": url, "views": views })).collect::<Vec<_>>(),
        "batch": provenance(view.as_ref()),
        "speed_available": speed_available,
    });
    Ok(respond(body, speed_available))
}

/// `GET /v1/uniques`: day sketches of the range from the batch view, merged with the visitor
/// hashes of the live speed epochs, so a visitor seen by both layers counts once.
pub(crate) async fn get_uniques(State(state): State<AppState>, q: Params) -> ApiResult<Response> {
    let q = params(q)?;
    let url = url_param(&q)?;
    let range = hour_range(&q)?;
    // Day-aligned: `from` down to its midnight, `to` up to the next one.
    let from_day = (range.from_hour * HOUR_MS).div_euclid(DAY_MS);
    let to_day = (range.to_hour * HOUR_MS + DAY_MS - 1).div_euclid(DAY_MS);
    let view = state.views.current();
    let cutoff = ViewManager::cutoff(view.as_ref());
    let precision = view
        .as_ref()
        .and_then(|v| v.sketch_precision())
        .unwrap_or(state.sketch_precision);
    let key = UniquesKey {
        version: view.as_ref().map(|v| v.version.clone()),
        applied: state.speed.applied_seq(),
        url: url.clone(),
        from_day,
        to_day,
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
                    .visitors(&url, cutoff, from_day, to_day, precision),
            )?;
            let speed_available = speed.is_some();
            // The same 32-bit visitor hash as the batch sketches (`tally_core::sketch`), so a
            // visitor in both layers is one hash; one union of every day, the speed layer's
            // hashes and the registers of its busy days.
            let speed = speed.unwrap_or_default();
            let busy = speed
                .registers
                .map(|r| VisitorSketch::from_registers(precision, r))
                .transpose()
                .map_err(ApiError::internal)?;
            let merged = match view.as_ref() {
                Some(v) => v.uniques_sketch(
                    &url,
                    from_day,
                    to_day,
                    precision,
                    busy.as_ref(),
                    &speed.hashes,
                ),
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
        "from": format_rfc3339(from_day * DAY_MS),
        "to": format_rfc3339(to_day * DAY_MS),
        "uniques": uniques,
        "relative_error": relative_error(precision),
        "exact": exact,
        "batch": provenance(view.as_ref()),
        "speed_available": speed_available,
    });
    Ok(respond(body, speed_available))
}

/// Exact top-N of the batch view plus the speed epochs after its cutoff; the flag says whether
/// the speed layer could be read. All time (the dashboard's default and the common case) comes
/// from the speed layer's incremental rankings in `O(limit)`; other ranges, and what the rankings
/// do not keep, scan the URLs with views in the range.
fn rank_top(
    state: &AppState,
    view: Option<&Arc<BatchView>>,
    cutoff: tally_core::Seq,
    range: &HourRange,
    host: Option<&str>,
    limit: usize,
) -> ApiResult<(Vec<(String, u64)>, bool)> {
    if range.all_time {
        let id = view.map_or("", |v| v.version.as_str());
        let ranked = speed_read(
            state
                .speed
                .top_all_time(id, cutoff, limit, host, range.to_hour),
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
            v.range_totals(range.from_hour, range.to_hour, host, |url, n| {
                batch.push((url, n));
            });
            top_from_maps(batch, speed, limit)
        }
    };
    // Ranked under the speed mirror's read lock, without copying its URLs.
    let ranked = speed_read(state.speed.with_range_totals(
        cutoff,
        range.from_hour,
        range.to_hour,
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
        let before = hour_of(now_ms()) + 1;
        let r = hour_range(&q(&[])).unwrap();
        let after = hour_of(now_ms()) + 1;
        assert!(r.to_hour == before || r.to_hour == after);
        assert_eq!(r.from_hour, hour_of(MIN_TS_MS));
        assert!(r.all_time);
    }

    #[test]
    fn bounds_truncate_to_the_hour_and_must_be_ordered() {
        let r = hour_range(&q(&[
            ("from", "2026-11-21T10:30:00Z"),
            ("to", "2026-11-21T12:59:59Z"),
        ]))
        .unwrap();
        assert_eq!(
            format_rfc3339(r.from_hour * HOUR_MS),
            "2026-11-21T10:00:00Z"
        );
        assert_eq!(format_rfc3339(r.to_hour * HOUR_MS), "2026-11-21T12:00:00Z");
        assert!(!r.all_time);
        assert!(hour_range(&q(&[
            ("from", "2026-11-21T10:30:00Z"),
            ("to", "2026-11-21T10:59:00Z")
        ]))
        .is_err());
        assert!(hour_range(&q(&[("from", "yesterday")])).is_err());
        // Bounds that would overflow the bucket arithmetic are refused, not wrapped.
        assert!(hour_range(&q(&[("to", "9223372036854775807")])).is_err());
        assert!(hour_range(&q(&[("from", "-9223372036854775808")])).is_err());
        let far = hour_range(&q(&[("to", "253402300799999")])).unwrap();
        assert_eq!(
            format_rfc3339(far.to_hour * HOUR_MS),
            "9999-12-31T23:00:00Z"
        );
    }
}
