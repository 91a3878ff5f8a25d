//! `GET /v1/site` and `GET /v1/sites`: whole sites (hosts), the batch view's site series plus
//! the speed epochs after its cutoff. Views are exact, as for one URL; uniques are the distinct
//! visitors of any page of the site, one union of the batch view's site-day sketches and
//! site-cell visitor lists and the speed layer's visitors — never a sum of per-URL uniques.
//! Every bucket of every zone gets its uniques: its days and hours are whole cells.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use serde_json::{json, Value};
use tally_batch::{relative_error, BatchView, Pieces, VisitorSketch};
use tally_core::{Granularity, Seq, CELL_MS, DAY_MS};
use tally_speed::{SiteSpeed, SpeedVisitors};

use crate::answer::{precision_of, provenance, respond, speed_read};
use crate::error::{ApiError, ApiResult};
use crate::extract::{flag, params, Params};
use crate::merge::bucket_series;
use crate::params::{
    granularity_param, host_param, limit_param, query_range, uniques_cells, CellRange,
};
use crate::state::AppState;
use crate::views::ViewManager;

/// The distinct visitors of site `host` in the cells `[from_cell, to_cell)`: the batch view's
/// site-day sketches and site-cell visitor lists and the speed layer's visitors of those cells,
/// in one union.
fn site_uniques(
    view: Option<&Arc<BatchView>>,
    host: &str,
    speed_cells: &BTreeMap<i64, SpeedVisitors>,
    (from_cell, to_cell): (i64, i64),
    precision: u8,
) -> ApiResult<VisitorSketch> {
    let mut batch = Pieces::default();
    if let Some(v) = view {
        v.site_visitors(host)
            .collect(from_cell, to_cell, &mut batch);
    }
    let mut hashes: Vec<u32> = Vec::new();
    let mut busy: Vec<VisitorSketch> = Vec::new();
    for (_, v) in speed_cells.range(from_cell..to_cell.max(from_cell)) {
        hashes.extend_from_slice(&v.hashes);
        if let Some(r) = &v.registers {
            busy.push(
                VisitorSketch::from_registers(precision, r.clone()).map_err(ApiError::internal)?,
            );
        }
    }
    hashes.sort_unstable();
    hashes.dedup();
    batch
        .union(precision, busy.iter(), &hashes)
        .map_err(ApiError::internal)
}

/// The speed layer's share of the sites `hosts` (views in `cells`, visitors in
/// `visitor_cells`): `None` when it is unavailable (answer batch-only).
fn speed_sites(
    state: &AppState,
    hosts: &[&str],
    cutoff: Seq,
    cells: (i64, i64),
    visitor_cells: (i64, i64),
    precision: u8,
) -> ApiResult<Option<HashMap<String, SiteSpeed>>> {
    speed_read(
        state
            .speed
            .sites(hosts, cutoff, cells, visitor_cells, precision),
    )
}

/// `GET /v1/site?host=H[&from&to&tz&granularity]`.
pub(crate) async fn get_site(State(state): State<AppState>, q: Params) -> ApiResult<Response> {
    let q = params(q)?;
    let host = host_param(&q)?;
    let granularity = granularity_param(&q)?;
    let range = query_range(&q)?;
    // Uniques are day-aligned (local midnights); the series' buckets each get their own.
    let ucells = uniques_cells(&range);
    let view = state.views.current();
    let cutoff = ViewManager::cutoff(view.as_ref());
    let precision = precision_of(&state, view.as_ref());
    let cells = (range.from_cell, range.to_cell);
    // The speed layer's visitors of the day-aligned range and of every bucket (a month bucket
    // reaches past the range's days).
    let vcells = match granularity {
        Granularity::Month => {
            let zone = range.zone;
            let first = zone.month_start(range.start_ms());
            let end = zone.month_start(zone.month_start(range.end_ms() - 1) + 32 * DAY_MS);
            (
                ucells.0.min(first.div_euclid(CELL_MS)),
                ucells.1.max(end.div_euclid(CELL_MS)),
            )
        }
        _ => ucells,
    };
    let speed = speed_sites(&state, &[&host], cutoff, cells, vcells, precision)?;
    let speed_available = speed.is_some();
    let speed = speed.and_then(|mut s| s.remove(&host)).unwrap_or_default();
    let batch_views = view
        .as_ref()
        .map_or(0, |v| v.site_views(&host, range.from_cell, range.to_cell));
    let speed_views: u64 = speed.cells.iter().map(|c| c.1).sum();
    let uniques = site_uniques(view.as_ref(), &host, &speed.visitors, ucells, precision)?;
    let mut body = json!({
        "host": host,
        "from": range.zone.format(range.start_ms()),
        "to": range.zone.format(range.end_ms()),
        "tz": range.zone.name(),
        "views": batch_views + speed_views,
        "batch_views": batch_views,
        "speed_views": speed_views,
        "uniques": uniques.estimate().round() as u64,
        "relative_error": relative_error(precision),
        "batch": provenance(view.as_ref()),
        "speed_available": speed_available,
    });
    if granularity != Granularity::Total {
        let batch_cells = view
            .as_ref()
            .map(|v| v.site_cell_counts(&host, range.from_cell, range.to_cell))
            .unwrap_or_default();
        let buckets = bucket_series(
            batch_cells.into_iter().chain(speed.cells.iter().copied()),
            granularity,
            range.zone,
        );
        let series = series_with_uniques(&buckets, granularity, &range, |c| {
            site_uniques(view.as_ref(), &host, &speed.visitors, c, precision)
        })?;
        body["series"] = Value::Array(series);
    }
    Ok(respond(body, speed_available))
}

/// The series items: every bucket's views and uniques (the visitors of the whole bucket: a
/// local hour, day or month — whole cells in every zone).
fn series_with_uniques(
    buckets: &[(i64, u64)],
    granularity: Granularity,
    range: &CellRange,
    uniques: impl Fn((i64, i64)) -> ApiResult<VisitorSketch>,
) -> ApiResult<Vec<Value>> {
    let zone = range.zone;
    buckets
        .iter()
        .map(|&(start, views)| {
            let end = match granularity {
                Granularity::Day => zone.next_day_start(start),
                Granularity::Month => zone.month_start(start + 32 * DAY_MS),
                Granularity::Hour | Granularity::Total => zone.next_hour_start(start),
            };
            // An hour bucket cut by the range (its start truncated to a quarter hour in a
            // zone off the hour) counts the visitors of its part in the range.
            let (a, b) = match granularity {
                Granularity::Hour => (start.max(range.start_ms()), end.min(range.end_ms())),
                _ => (start, end),
            };
            let u = uniques((a.div_euclid(CELL_MS), b.div_euclid(CELL_MS)))?;
            Ok(json!({
                "start": zone.format(start),
                "views": views,
                "uniques": u.estimate().round() as u64,
            }))
        })
        .collect()
}

/// `GET /v1/sites[?from&to&tz&limit&uniques]`: hosts with views in the range, most viewed first
/// (then by host), each with its uniques — unless `uniques=false`, for a caller that needs the
/// names and views only (a site picker): a union of every listed site's sketches is most of the
/// work.
pub(crate) async fn get_sites(State(state): State<AppState>, q: Params) -> ApiResult<Response> {
    let q = params(q)?;
    let limit = limit_param(&q)?;
    let with_uniques = flag(&q, "uniques", true)?;
    let range = query_range(&q)?;
    let ucells = uniques_cells(&range);
    let view = state.views.current();
    let cutoff = ViewManager::cutoff(view.as_ref());
    let precision = precision_of(&state, view.as_ref());
    let speed = speed_read(
        state
            .speed
            .site_totals(cutoff, range.from_cell, range.to_cell),
    )?;
    let mut speed_available = speed.is_some();
    let mut totals: HashMap<String, u64> = speed.unwrap_or_default();
    if let Some(v) = view.as_ref() {
        for (host, n) in v.site_totals(range.from_cell, range.to_cell) {
            *totals.entry(host.to_string()).or_default() += n;
        }
    }
    let mut ranked: Vec<(String, u64)> = totals.into_iter().filter(|t| t.1 > 0).collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    ranked.truncate(limit);
    // The listed sites' visitors in the speed layer, in one scan (no views: an empty cell range).
    let mut visitors = match speed_available && with_uniques {
        true => {
            let hosts: Vec<&str> = ranked.iter().map(|(h, _)| h.as_str()).collect();
            let none = (range.from_cell, range.from_cell);
            let read = speed_sites(&state, &hosts, cutoff, none, ucells, precision)?;
            // A second read: the speed layer may have gone since the first; say so.
            speed_available &= read.is_some();
            read.unwrap_or_default()
        }
        false => HashMap::new(),
    };
    let mut items = Vec::with_capacity(ranked.len());
    for (host, views) in ranked {
        if !with_uniques {
            items.push(json!({ "host": host, "views": views }));
            continue;
        }
        let sp = visitors.remove(&host).unwrap_or_default();
        let uniques = site_uniques(view.as_ref(), &host, &sp.visitors, ucells, precision)?
            .estimate()
            .round() as u64;
        items.push(json!({ "host": host, "views": views, "uniques": uniques }));
    }
    let body = json!({
        "from": range.zone.format(range.start_ms()),
        "to": range.zone.format(range.end_ms()),
        "tz": range.zone.name(),
        "items": items,
        "relative_error": relative_error(precision),
        "batch": provenance(view.as_ref()),
        "speed_available": speed_available,
    });
    Ok(respond(body, speed_available))
}

/// `GET /v1/realtime?host=H[&limit=N]`: the site's last five minutes from the speed layer —
/// views (exact for the events applied so far), distinct visitors, and its most viewed pages
/// (`limit`, default 100).
pub(crate) async fn get_realtime(State(state): State<AppState>, q: Params) -> ApiResult<Response> {
    let q = params(q)?;
    let host = host_param(&q)?;
    let limit = match q.contains_key("limit") {
        true => limit_param(&q)?,
        false => 100,
    };
    let Some(mut r) = state.speed.realtime(&host) else {
        return Err(ApiError::Unavailable(
            "Realtime numbers come from the speed layer, which is not available right now; retry shortly.".into(),
        ));
    };
    r.pages.truncate(limit);
    let pages: Vec<Value> = r
        .pages
        .iter()
        .map(|(url, views)| json!({ "url": url, "views": views }))
        .collect();
    Ok(respond(
        json!({
            "host": host,
            "since": tally_core::format_rfc3339(r.since_ms),
            "views": r.views,
            "visitors": r.visitors,
            "pages": pages,
            "speed_available": true,
        }),
        true,
    ))
}
