//! `GET /v1/breakdown?host=H&by=D[&from&to&tz&limit&url=U]`: a site's views and visitors per
//! value of a dimension (`tally_core::dims`).
//!
//! Both layers count every view under its source key (referrer host, URL) next to its URL; every
//! dimension is a function of that pair. So an item's views are the sum, over the batch view's
//! and the speed epochs' source keys that map to its value, of their views in the range — exact,
//! with nothing missed or counted twice at the boundary, like a URL's views — and its uniques are
//! one union of those keys' day sketches, cell visitor lists and speed visitors, never a sum of
//! per-key uniques.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use serde_json::json;
use tally_batch::{relative_error, BatchView, Piece, Pieces, VisitorSketch};
use tally_core::dims::Dimension;
use tally_core::CELL_MS;
use tally_speed::SpeedVisitors;

use crate::error::{ApiError, ApiResult};
use crate::extract::{params, Params};
use crate::query::{
    limit_param, off_runtime, precision_of, provenance, query_range, respond, speed_read,
    uniques_cells, url_param,
};
use crate::site::host_param;
use crate::state::AppState;
use crate::views::ViewManager;

/// One group's views and the visitors collected for it, from both layers.
#[derive(Default)]
pub(crate) struct Tally<'a> {
    pub(crate) views: u64,
    batch: Pieces<'a>,
    speed: Vec<VisitorSketch>,
    hashes: Vec<u32>,
}

impl<'a> Tally<'a> {
    /// Adds a piece of the batch view's visitors.
    fn add_batch(&mut self, piece: Piece<'a>) {
        match piece {
            Piece::Day(s) => self.batch.sketches.push(s),
            Piece::Cell(l) => self.batch.lists.push(l),
        }
    }

    /// Adds the speed layer's visitors of one cell.
    pub(crate) fn add_speed(&mut self, v: SpeedVisitors, precision: u8) -> ApiResult<()> {
        self.hashes.extend_from_slice(&v.hashes);
        if let Some(r) = v.registers {
            self.speed
                .push(VisitorSketch::from_registers(precision, r).map_err(ApiError::internal)?);
        }
        Ok(())
    }

    /// The distinct visitors of the group: one union of everything collected.
    pub(crate) fn uniques(mut self, precision: u8) -> ApiResult<u64> {
        self.hashes.sort_unstable();
        self.hashes.dedup();
        let u = self
            .batch
            .union(precision, self.speed.iter(), &self.hashes)
            .map_err(ApiError::internal)?;
        Ok(u.estimate().round() as u64)
    }
}

/// Groups of source keys: (group, time bucket start or 0) → its views and visitors.
pub(crate) type Groups<'a, K> = HashMap<(K, i64), Tally<'a>>;

/// The source keys of site `host` (of `url` alone when given) with views in `cells`, from the
/// batch view and the speed epochs after its cutoff, grouped by `group_of(url, referrer host)`
/// (`None` leaves a key out) and, with `bucket_of` (an instant → its time bucket's start),
/// by time bucket too (else bucket 0): each group's views in `cells` and its visitors in the
/// cells `visitor_cells`. Also says whether the speed layer could be read.
#[allow(clippy::too_many_arguments)]
pub(crate) fn collect_sources<'a, K: std::hash::Hash + Eq + Clone>(
    state: &AppState,
    view: Option<&'a Arc<BatchView>>,
    host: &str,
    url: Option<&'a str>,
    cells: (i64, i64),
    visitor_cells: (i64, i64),
    precision: u8,
    group_of: impl Fn(&str, &str) -> Option<K>,
    bucket_of: Option<&dyn Fn(i64) -> i64>,
) -> ApiResult<(Groups<'a, K>, bool)> {
    let cutoff = ViewManager::cutoff(view);
    let speed =
        speed_read(
            state
                .speed
                .sources(host, url, cutoff, cells, visitor_cells, precision),
        )?;
    let speed_available = speed.is_some();
    let mut groups: Groups<'a, K> = HashMap::new();
    if let Some(v) = view {
        let (va, vb) = visitor_cells;
        for c in v.sources_of(host, url, cells) {
            let Some(k) = group_of(c.url, c.referrer) else {
                continue;
            };
            match bucket_of {
                None => {
                    let t = groups.entry((k, 0)).or_default();
                    t.views += c.views;
                    c.visitors.collect(va, vb, &mut t.batch);
                }
                Some(b) => {
                    for (cell, n) in c.cells.iter().zip(c.cell_views) {
                        groups
                            .entry((k.clone(), b(cell * CELL_MS)))
                            .or_default()
                            .views += n;
                    }
                    c.visitors
                        .collect_by(va, vb, Some(b), &mut |bucket, piece| {
                            groups
                                .entry((k.clone(), bucket))
                                .or_default()
                                .add_batch(piece)
                        });
                }
            }
        }
    }
    for s in speed.unwrap_or_default() {
        let Some(k) = group_of(&s.url, &s.referrer) else {
            continue;
        };
        match bucket_of {
            None => {
                let t = groups.entry((k, 0)).or_default();
                t.views += s.views;
                for v in s.visitors.into_values() {
                    t.add_speed(v, precision)?;
                }
            }
            Some(b) => {
                for (cell, n) in &s.cells {
                    groups
                        .entry((k.clone(), b(cell * CELL_MS)))
                        .or_default()
                        .views += n;
                }
                for (cell, v) in s.visitors {
                    let t = groups.entry((k.clone(), b(cell * CELL_MS))).or_default();
                    t.add_speed(v, precision)?;
                }
            }
        }
    }
    Ok((groups, speed_available))
}

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
    // Uniques count the visitors of every local day the range touches (as `/v1/uniques`): when
    // the range is not whole days, an item's visitors come from a second read over those days —
    // all its keys with visitors on them, also those without views in the range itself.
    let day_cells = uniques_cells(&range);
    let part_days = (day_cells != cells).then_some(day_cells);
    let read = |cells, visitor_cells| {
        collect_sources(
            state,
            view.as_ref(),
            &host,
            url.as_deref(),
            cells,
            visitor_cells,
            precision,
            |u, referrer| Some(by.value(u, referrer).into_owned()),
            None,
        )
    };
    let first_visitors = match part_days {
        Some(_) => (0, 0),
        None => day_cells,
    };
    let (items, mut speed_available) = read(cells, first_visitors)?;
    let mut whole_days = match part_days {
        Some(dc) => {
            let (groups, ok) = read(dc, dc)?;
            // The speed layer went unavailable between the two reads: the uniques are the
            // batch view's alone, and the answer says so.
            speed_available &= ok;
            Some(groups)
        }
        None => None,
    };
    let mut ranked: Vec<(String, Tally<'_>)> =
        items.into_iter().map(|((v, _), t)| (v, t)).collect();
    ranked.sort_by(|a, b| b.1.views.cmp(&a.1.views).then_with(|| a.0.cmp(&b.0)));
    ranked.truncate(limit);
    let mut out = Vec::with_capacity(ranked.len());
    for (value, item) in ranked {
        let views = item.views;
        let visitors = whole_days
            .as_mut()
            .and_then(|w| w.remove(&(value.clone(), 0)))
            .unwrap_or(item);
        let uniques = visitors.uniques(precision)?;
        out.push(json!({ "value": value, "views": views, "uniques": uniques }));
    }
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
