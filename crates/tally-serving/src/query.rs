//! `GET /v1/views`, `GET /v1/top` and `GET /v1/uniques`: the batch view plus the speed epochs
//! after its cutoff (parameters in `params.rs`, what every answer shares in `answer.rs`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use serde_json::json;
use tally_batch::{relative_error, BatchView, VisitorSketch};
use tally_core::{Granularity, CELL_MS};

use crate::answer::{precision_of, provenance, respond, speed_read, Provenance};
use crate::cache::{TopKey, UniquesKey};
use crate::error::{ApiError, ApiResult};
use crate::extract::{params, Params};
use crate::merge::{bucket_series, top_from_maps};
use crate::params::{
    granularity_param, limit_param, query_range, uniques_cells, url_param, CellRange,
};
use crate::state::AppState;
use crate::views::ViewManager;

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
