//! `GET /v1/site` and `GET /v1/sites`: whole sites (hosts), the batch view's site series plus
//! the speed epochs after its cutoff. Views are exact, as for one URL; uniques are the distinct
//! visitors of any page of the site, one union of the batch view's site-day sketches and the
//! speed layer's visitors — never a sum of per-URL uniques.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use serde_json::{json, Value};
use tally_batch::{relative_error, BatchView, VisitorSketch};
use tally_core::{Granularity, Seq, DAY_MS};
use tally_speed::{SiteSpeed, SpeedVisitors};

use crate::error::{ApiError, ApiResult};
use crate::extract::{params, Params};
use crate::merge::bucket_series;
use crate::query::{
    granularity_param, limit_param, precision_of, provenance, query_range, respond, speed_read,
    uniques_days, CellRange,
};
use crate::state::AppState;
use crate::views::ViewManager;

pub(crate) fn host_param(q: &HashMap<String, String>) -> ApiResult<String> {
    let raw = q
        .get("host")
        .ok_or_else(|| ApiError::bad("The host parameter is required."))?;
    tally_core::url::normalize_host(raw)
        .map_err(|e| ApiError::bad(format!("The host parameter is invalid: {e}.")))
}

/// The distinct visitors of site `host` on the UTC days `[from_day, to_day)`: the batch view's
/// site-day sketches and the speed layer's visitors of those days, in one union.
fn site_uniques(
    view: Option<&Arc<BatchView>>,
    host: &str,
    speed_days: &BTreeMap<i64, SpeedVisitors>,
    (from_day, to_day): (i64, i64),
    precision: u8,
) -> ApiResult<VisitorSketch> {
    let batch: Vec<&VisitorSketch> = view
        .map(|v| {
            v.site_day_sketches(host, from_day, to_day)
                .into_iter()
                .map(|(_, s)| s)
                .collect()
        })
        .unwrap_or_default();
    let mut hashes: Vec<u32> = Vec::new();
    let mut busy: Vec<VisitorSketch> = Vec::new();
    for (_, v) in speed_days.range(from_day..to_day) {
        hashes.extend_from_slice(&v.hashes);
        if let Some(r) = &v.registers {
            busy.push(
                VisitorSketch::from_registers(precision, r.clone()).map_err(ApiError::internal)?,
            );
        }
    }
    hashes.sort_unstable();
    hashes.dedup();
    VisitorSketch::union(precision, batch.into_iter().chain(busy.iter()), &hashes)
        .map_err(ApiError::internal)
}

/// The speed layer's share of the sites `hosts` (views in `cells`, visitors on `days`): `None`
/// when it is unavailable (answer batch-only).
fn speed_sites(
    state: &AppState,
    hosts: &[&str],
    cutoff: Seq,
    cells: (i64, i64),
    days: Option<(i64, i64)>,
    precision: u8,
) -> ApiResult<Option<HashMap<String, SiteSpeed>>> {
    speed_read(
        state
            .speed
            .sites(hosts, cutoff, cells, days.unwrap_or((0, 0)), precision),
    )
}

/// `GET /v1/site?host=H[&from&to&tz&granularity]`.
pub(crate) async fn get_site(State(state): State<AppState>, q: Params) -> ApiResult<Response> {
    let q = params(q)?;
    let host = host_param(&q)?;
    let granularity = granularity_param(&q)?;
    let range = query_range(&q)?;
    // Uniques are day-aligned on UTC days (the sketches'): none in zones whose midnights in the
    // range are not UTC midnights, rather than visitors of other hours.
    let days = uniques_days(&range).ok();
    let view = state.views.current();
    let cutoff = ViewManager::cutoff(view.as_ref());
    let precision = precision_of(&state, view.as_ref());
    let cells = (range.from_cell, range.to_cell);
    let speed = speed_sites(&state, &[&host], cutoff, cells, days, precision)?;
    let speed_available = speed.is_some();
    let speed = speed.and_then(|mut s| s.remove(&host)).unwrap_or_default();
    let batch_views = view
        .as_ref()
        .map_or(0, |v| v.site_views(&host, range.from_cell, range.to_cell));
    let speed_views: u64 = speed.cells.iter().map(|c| c.1).sum();
    let uniques = match days {
        Some(d) => Some(site_uniques(
            view.as_ref(),
            &host,
            &speed.days,
            d,
            precision,
        )?),
        None => None,
    };
    let mut body = json!({
        "host": host,
        "from": range.zone.format(range.start_ms()),
        "to": range.zone.format(range.end_ms()),
        "tz": range.zone.name(),
        "views": batch_views + speed_views,
        "batch_views": batch_views,
        "speed_views": speed_views,
        "uniques": uniques.as_ref().map(|u| u.estimate().round() as u64),
        "relative_error": uniques.as_ref().map(|_| relative_error(precision)),
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
        let series = series_with_uniques(&buckets, granularity, &range, days.is_some(), |d| {
            site_uniques(view.as_ref(), &host, &speed.days, d, precision)
        })?;
        body["series"] = Value::Array(series);
    }
    Ok(respond(body, speed_available))
}

/// The series items: every bucket's views, and its uniques when the bucket is a whole number of
/// UTC days (`day` and `month` buckets in a zone whose midnights are UTC midnights).
fn series_with_uniques(
    buckets: &[(i64, u64)],
    granularity: Granularity,
    range: &CellRange,
    aligned: bool,
    uniques: impl Fn((i64, i64)) -> ApiResult<VisitorSketch>,
) -> ApiResult<Vec<Value>> {
    let zone = range.zone;
    buckets
        .iter()
        .map(|&(start, views)| {
            let mut item = json!({ "start": zone.format(start), "views": views });
            let end = match granularity {
                Granularity::Day => Some(zone.next_day_start(start)),
                Granularity::Month => Some(zone.month_start(start + 32 * DAY_MS)),
                Granularity::Hour | Granularity::Total => None,
            };
            if let (true, Some(end)) = (aligned, end) {
                if start.rem_euclid(DAY_MS) == 0 && end.rem_euclid(DAY_MS) == 0 {
                    let u = uniques((start.div_euclid(DAY_MS), end.div_euclid(DAY_MS)))?;
                    item["uniques"] = json!(u.estimate().round() as u64);
                }
            }
            Ok(item)
        })
        .collect()
}

/// `GET /v1/sites[?from&to&tz&limit]`: hosts with views in the range, most viewed first (then
/// by host), each with its uniques.
pub(crate) async fn get_sites(State(state): State<AppState>, q: Params) -> ApiResult<Response> {
    let q = params(q)?;
    let limit = limit_param(&q)?;
    let range = query_range(&q)?;
    let days = uniques_days(&range).ok();
    let view = state.views.current();
    let cutoff = ViewManager::cutoff(view.as_ref());
    let precision = precision_of(&state, view.as_ref());
    let speed = speed_read(
        state
            .speed
            .site_totals(cutoff, range.from_cell, range.to_cell),
    )?;
    let speed_available = speed.is_some();
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
    let mut visitors = match (days, speed_available) {
        (Some(d), true) => {
            let hosts: Vec<&str> = ranked.iter().map(|(h, _)| h.as_str()).collect();
            let none = (range.from_cell, range.from_cell);
            speed_sites(&state, &hosts, cutoff, none, Some(d), precision)?.unwrap_or_default()
        }
        _ => HashMap::new(),
    };
    let mut items = Vec::with_capacity(ranked.len());
    for (host, views) in ranked {
        let uniques = match days {
            Some(d) => {
                let sp = visitors.remove(&host).unwrap_or_default();
                Some(
                    site_uniques(view.as_ref(), &host, &sp.days, d, precision)?
                        .estimate()
                        .round() as u64,
                )
            }
            None => None,
        };
        items.push(json!({ "host": host, "views": views, "uniques": uniques }));
    }
    let body = json!({
        "from": range.zone.format(range.start_ms()),
        "to": range.zone.format(range.end_ms()),
        "tz": range.zone.name(),
        "items": items,
        "relative_error": days.map(|_| relative_error(precision)),
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
