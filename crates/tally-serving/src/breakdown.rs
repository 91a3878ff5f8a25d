//! `GET /v1/breakdown?host=H&by=D[&from&to&tz&limit&url=U]`: a site's views and visitors per
//! value of a dimension (`tally_core::dims`).
//!
//! Both layers count every view under its source key (referrer host, URL) next to its URL; every
//! dimension is a function of that pair. So an item's views are the sum, over the batch view's
//! and the speed epochs' source keys that map to its value, of their views in the range — exact,
//! with nothing missed or counted twice at the boundary, like a URL's views — and its uniques are
//! one union of those keys' day sketches, cell visitor lists and speed visitors, never a sum of
//! per-key uniques.

use std::borrow::Cow;
use std::collections::HashMap;

use axum::extract::State;
use axum::response::Response;
use serde_json::{json, Value};
use tally_batch::relative_error;
use tally_core::dims::Dimension;

use crate::answer::{off_runtime, precision_of, provenance, respond};
use crate::error::{ApiError, ApiResult};
use crate::extract::{params, Params};
use crate::grouping::{speed_sources, Grouping};
use crate::params::{host_param, limit_param, query_range, uniques_cells, url_param};
use crate::state::AppState;

fn by_param(q: &HashMap<String, String>) -> ApiResult<Dimension> {
    let by = q
        .get("by")
        .ok_or_else(|| ApiError::bad("The by parameter is required (page, url, referrer, source, utm_source, utm_medium or utm_campaign)."))?;
    Dimension::parse(by).ok_or_else(|| {
        ApiError::bad(format!(
            "by must be page, url, referrer, source, utm_source, utm_medium or utm_campaign, not {by:?}."
        ))
    })
}

/// `GET /v1/breakdown`.
pub(crate) async fn get_breakdown(State(state): State<AppState>, q: Params) -> ApiResult<Response> {
    off_runtime(move || breakdown(&state, q)).await
}

fn breakdown(state: &AppState, q: Params) -> ApiResult<Response> {
    let q = params(q)?;
    let host = host_param(&q)?;
    let by = by_param(&q)?;
    let limit = limit_param(&q)?;
    let url = match q.contains_key("url") {
        true => Some(url_param(&q)?),
        false => None,
    };
    if let Some(u) = &url {
        if tally_core::url::host_of(u) != Some(host.as_str()) {
            return Err(ApiError::bad(format!(
                "The url {u} is not a page of the site {host}."
            )));
        }
    }
    let range = query_range(&q)?;
    let view = state.views.current();
    let precision = precision_of(state, view.as_ref());
    let cells = (range.from_cell, range.to_cell);
    let url = url.as_deref();
    // Uniques count the visitors of every local day the range touches (as `/v1/uniques`): when
    // the range is not whole days, an item's visitors come from the keys with views on those
    // days — also those without views in the range itself.
    let day_cells = uniques_cells(&range);
    let by_campaign = tally_core::dims::is_campaign_dimension(by);
    let keys = (by.input(), by_campaign);
    let speed = speed_sources(state, view.as_ref(), &host, url, cells, false, keys)?;
    let speed_days = match day_cells == cells {
        true => None,
        false => speed_sources(state, view.as_ref(), &host, url, day_cells, false, keys)?,
    };
    let group = (by.input(), by_campaign, |u, referrer| {
        Some(by.value(u, referrer))
    });
    let items = Grouping::new(
        view.as_ref(),
        speed.as_deref(),
        &host,
        url,
        cells,
        group,
        None,
    );
    let mut ranked: Vec<(&Cow<'_, str>, u64)> = items.groups().map(|(v, _, n)| (v, n)).collect();
    let most_viewed = |a: &(&Cow<'_, str>, u64), b: &(&Cow<'_, str>, u64)| {
        b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0))
    };
    if ranked.len() > limit {
        ranked.select_nth_unstable_by(limit, most_viewed);
        ranked.truncate(limit);
    }
    ranked.sort_by(most_viewed);
    let wanted: Vec<(&Cow<'_, str>, i64)> = ranked.iter().map(|(v, _)| (*v, 0)).collect();
    let (uniques, visitors_read) = match day_cells == cells {
        true => items.uniques(state, &wanted, day_cells, precision)?,
        false => {
            let days = Grouping::new(
                view.as_ref(),
                speed_days.as_deref(),
                &host,
                url,
                day_cells,
                group,
                None,
            );
            days.uniques(state, &wanted, day_cells, precision)?
        }
    };
    // The speed layer went unavailable between the reads: the uniques are the batch view's
    // alone, and the answer says so.
    let speed_available = items.speed_available() && visitors_read;
    let out: Vec<Value> = ranked
        .iter()
        .zip(uniques)
        .map(|((value, views), uniques)| json!({ "value": value, "views": views, "uniques": uniques }))
        .collect();
    let body = json!({
        "host": host,
        "by": by.name(),
        "url": url,
        "from": range.zone.format(range.start_ms()),
        "to": range.zone.format(range.end_ms()),
        "tz": range.zone.name(),
        "items": out,
        "relative_error": relative_error(precision),
        "batch": provenance(view.as_ref()),
        "speed_available": speed_available,
    });
    Ok(respond(body, speed_available))
}
