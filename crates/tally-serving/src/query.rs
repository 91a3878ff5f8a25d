//! `GET /v1/views` and `GET /v1/top`: the batch view plus the speed epochs after its cutoff.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tally_batch::{relative_error, BatchView, VisitorSketch};
use tally_core::{format_rfc3339, hour_of, normalize_url, now_ms, parse_ts_param, DAY_MS, HOUR_MS};

use crate::error::{ApiError, ApiResult};
use crate::merge::{bucket_series, top_from_maps, top_merge, Granularity};
use crate::state::{AppState, ViewManager};

pub(crate) type Params = Result<Query<HashMap<String, String>>, QueryRejection>;

pub(crate) fn params(p: Params) -> ApiResult<HashMap<String, String>> {
    p.map(|Query(q)| q)
        .map_err(|e| ApiError::bad(format!("The query string is invalid: {e}.")))
}

/// An hour-aligned range `[from_hour, to_hour)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HourRange {
    pub from_hour: i64,
    pub to_hour: i64,
    /// Neither bound was given and no accepted event can lie at or after `to_hour` (the range
    /// is the whole dataset, so all-time totals answer it).
    pub unbounded: bool,
}

/// `from`/`to` truncated to the hour; missing `from` is the beginning of time, missing `to` is
/// now rounded up to the next hour (API.md). Events may be up to `max_future_ms` ahead of the
/// clock, so in the last minutes of an hour some can lie past that bound: then the range is not
/// the whole dataset.
pub(crate) fn hour_range(q: &HashMap<String, String>, max_future_ms: i64) -> ApiResult<HourRange> {
    let parse = |name: &str| -> ApiResult<Option<i64>> {
        match q.get(name) {
            None => Ok(None),
            Some(s) => parse_ts_param(s).map(Some).ok_or_else(|| {
                ApiError::bad(format!(
                    "{name} must be an RFC 3339 timestamp or epoch milliseconds, not {s:?}."
                ))
            }),
        }
    };
    let from = parse("from")?;
    let to = parse("to")?;
    let from_hour = from.map_or(0, hour_of);
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
        unbounded: from.is_none()
            && to.is_none()
            && hour_of(now.saturating_add(max_future_ms)) < to_hour,
    })
}

pub(crate) fn url_param(q: &HashMap<String, String>) -> ApiResult<String> {
    let raw = q
        .get("url")
        .ok_or_else(|| ApiError::bad("The url parameter is required."))?;
    normalize_url(raw).map_err(|e| ApiError::bad(format!("The url parameter is invalid: {e}.")))
}

pub(crate) fn provenance(view: Option<&Arc<BatchView>>) -> Value {
    match view {
        Some(v) => json!({
            "version": v.version,
            "cutoff_seq": v.cutoff_seq.get(),
            "computed_at": format_rfc3339(v.computed_at_ms),
        }),
        None => Value::Null,
    }
}

/// Adds `X-Tally-Degraded: speed` when the speed layer could not be read.
pub(crate) fn respond(body: Value, speed_available: bool) -> Response {
    let mut resp = Json(body).into_response();
    if !speed_available {
        resp.headers_mut().insert(
            HeaderName::from_static("x-tally-degraded"),
            HeaderValue::from_static("speed"),
        );
    }
    resp
}

/// The serving view, or 503 while a discarded view left nothing exact to answer from.
pub(crate) fn serving_view(state: &AppState) -> ApiResult<Option<Arc<BatchView>>> {
    if state.views.blocked() {
        return Err(ApiError::Unavailable(
            "The batch view was discarded and no earlier good view exists; a rerun is in progress."
                .into(),
        ));
    }
    Ok(state.views.current())
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
    let range = hour_range(&q, state.limits.ingest.max_future_ms)?;
    let view = serving_view(&state)?;
    let cutoff = ViewManager::cutoff(view.as_ref());
    let batch_views = view
        .as_ref()
        .map_or(0, |v| v.range_views(&url, range.from_hour, range.to_hour));
    let speed = &state.speed;
    let speed_views = speed.views(&url, cutoff, range.from_hour, range.to_hour);
    let speed_available = speed_views.is_some();
    let speed_views = speed_views.unwrap_or(0);
    let mut body = json!({
        "url": url,
        "from": format_rfc3339(range.from_hour * HOUR_MS),
        "to": format_rfc3339(range.to_hour * HOUR_MS),
        "views": batch_views + speed_views,
        "batch_views": batch_views,
        "speed_views": speed_views,
        "batch": provenance(view.as_ref()),
        "speed_available": speed_available,
    });
    if granularity != Granularity::Total {
        let batch_hours = view
            .as_ref()
            .map(|v| v.hour_counts(&url, range.from_hour, range.to_hour))
            .unwrap_or_default();
        let speed_hours = if speed_available {
            speed
                .hour_counts(&url, cutoff, range.from_hour, range.to_hour)
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let series = bucket_series(batch_hours.into_iter().chain(speed_hours), granularity);
        body["series"] = series
            .into_iter()
            .map(|(start, views)| json!({ "start": format_rfc3339(start), "views": views }))
            .collect();
    }
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
        Some(h) if h.trim().is_empty() => return Err(ApiError::bad("host must not be empty.")),
        Some(h) => Some(h.trim().trim_end_matches('.').to_ascii_lowercase()),
    };
    let range = hour_range(&q, state.limits.ingest.max_future_ms)?;
    let view = serving_view(&state)?;
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
            );
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
    let range = hour_range(&q, state.limits.ingest.max_future_ms)?;
    // Day-aligned: `from` down to its midnight, `to` up to the next one.
    let from_day = (range.from_hour * HOUR_MS).div_euclid(DAY_MS);
    let to_day = (range.to_hour * HOUR_MS + DAY_MS - 1).div_euclid(DAY_MS);
    let view = serving_view(&state)?;
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
            let batch = match view.as_ref() {
                Some(v) => v
                    .uniques_sketch(&url, from_day, to_day)
                    .map_err(ApiError::internal)?,
                None => None,
            };
            let hashes = state.speed.visitor_hashes(&url, cutoff, from_day, to_day);
            let speed_available = hashes.is_some();
            let mut merged = match batch {
                Some(s) => s,
                None => VisitorSketch::new(precision).map_err(ApiError::internal)?,
            };
            if let Some(hashes) = hashes.filter(|h| !h.is_empty()) {
                // The speed layer keeps 64-bit SipHash values; sketches use their high 32 bits
                // (`tally_core::sketch`), so a visitor in both layers is one hash.
                let hashes = hashes.into_iter().map(tally_core::sketch::narrow).collect();
                let speed =
                    VisitorSketch::from_hashes(precision, hashes).map_err(ApiError::internal)?;
                merged.merge(&speed).map_err(ApiError::internal)?;
            }
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
/// the speed layer could be read.
fn rank_top(
    state: &AppState,
    view: Option<&Arc<BatchView>>,
    cutoff: tally_core::Seq,
    range: &HourRange,
    host: Option<&str>,
    limit: usize,
) -> (Vec<(String, u64)>, bool) {
    let empty = HashMap::new();
    let rank = |speed: &HashMap<&str, u64>| match view {
        None => top_from_maps(std::iter::empty(), speed, limit),
        Some(v) if range.unbounded && host.is_none() => {
            top_merge(v.totals_desc(), |u| v.total_views(u), speed, limit)
        }
        Some(v) => {
            let mut batch = Vec::new();
            v.range_totals(range.from_hour, range.to_hour, host, |url, n| {
                batch.push((url, n));
            });
            top_from_maps(batch, speed, limit)
        }
    };
    // Ranked under the speed mirror's read lock, without copying its URLs.
    match state
        .speed
        .with_range_totals(cutoff, range.from_hour, range.to_hour, host, |speed| {
            rank(speed)
        }) {
        Some(items) => (items, true),
        None => (rank(&empty), false),
    }
}

/// What a top-N ranking depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopKey {
    version: Option<String>,
    applied: tally_core::Seq,
    limit: usize,
    host: Option<String>,
    from_hour: i64,
    to_hour: i64,
}

/// What a unique-visitor estimate depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UniquesKey {
    version: Option<String>,
    applied: tally_core::Seq,
    url: String,
    from_day: i64,
    to_day: i64,
}

/// A key that names the speed-layer state it was computed from.
pub trait AtApplied: Eq + std::hash::Hash {
    fn applied(&self) -> tally_core::Seq;
}

impl AtApplied for TopKey {
    fn applied(&self) -> tally_core::Seq {
        self.applied
    }
}

impl AtApplied for UniquesKey {
    fn applied(&self) -> tally_core::Seq {
        self.applied
    }
}

/// Recent answers that are pure functions of the serving view, the speed state (which changes
/// only when the applied seq does) and the parameters. Entries for an older applied seq are
/// never hit again and are dropped when the cache is full.
pub struct ResultCache<K, V>(std::sync::Mutex<HashMap<K, Arc<V>>>);

impl<K, V> Default for ResultCache<K, V> {
    fn default() -> Self {
        ResultCache(std::sync::Mutex::new(HashMap::new()))
    }
}

/// Recent `/v1/top` rankings (`(url, views)`, best first).
pub type TopCache = ResultCache<TopKey, Vec<(String, u64)>>;
/// Recent `/v1/uniques` answers: `(uniques, exact)`.
pub type UniquesCache = ResultCache<UniquesKey, (u64, bool)>;

const RESULT_CACHE_ENTRIES: usize = 1024;

impl<K: AtApplied, V> ResultCache<K, V> {
    fn get(&self, key: &K) -> Option<Arc<V>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    fn put(&self, key: K, value: Arc<V>) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= RESULT_CACHE_ENTRIES {
            let applied = key.applied();
            map.retain(|k, _| k.applied() == applied);
            if map.len() >= RESULT_CACHE_ENTRIES {
                map.clear();
            }
        }
        map.insert(key, value);
    }
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
        let r = hour_range(&q(&[]), 300_000).unwrap();
        let after = hour_of(now_ms()) + 1;
        assert!(r.to_hour == before || r.to_hour == after);
        assert_eq!(r.from_hour, 0);
        // Without any future slack the range covers every accepted event.
        assert!(hour_range(&q(&[]), 0).unwrap().unbounded);
    }

    #[test]
    fn bounds_truncate_to_the_hour_and_must_be_ordered() {
        let r = hour_range(
            &q(&[
                ("from", "2026-11-21T10:30:00Z"),
                ("to", "2026-11-21T12:59:59Z"),
            ]),
            0,
        )
        .unwrap();
        assert_eq!(
            format_rfc3339(r.from_hour * HOUR_MS),
            "2026-11-21T10:00:00Z"
        );
        assert_eq!(format_rfc3339(r.to_hour * HOUR_MS), "2026-11-21T12:00:00Z");
        assert!(!r.unbounded);
        assert!(hour_range(
            &q(&[
                ("from", "2026-11-21T10:30:00Z"),
                ("to", "2026-11-21T10:59:00Z")
            ]),
            0
        )
        .is_err());
        assert!(hour_range(&q(&[("from", "yesterday")]), 0).is_err());
    }
}
