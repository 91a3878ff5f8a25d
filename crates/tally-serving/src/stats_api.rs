//! `POST /api/v2/query`: Plausible's Stats API v2, the subset page-view analytics needs (API.md,
//! "POST /api/v2/query"), so that tools written for Plausible can read tally.
//!
//! Every answer is a grouping of the site's source keys (`tally_core::dims`), the same data as
//! `/v1/breakdown`: `pageviews` exact across the batch view and the speed layer, `visitors` one
//! union of sketches per row. What tally does not support — another metric or dimension, a time
//! dimension, a filter operator — is a `400` naming it, never an answer without it.
//!
//! Facts taken from Plausible's query parser (plausible/analytics, `query_parser.ex`): `"day"`
//! is today, `"month"` and `"year"` the current calendar month and year, `"Nd"` the N days
//! before today, `"Nmo"` the N whole months before the current one, a pair of dates is
//! inclusive; the default order is the first metric, descending; the default page is 10 000
//! rows.

use std::borrow::Cow;
use std::cmp::Ordering;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{Datelike, NaiveDate};
use serde_json::{json, Map, Value};
use tally_core::dims::{Dimension, Input};
use tally_core::{Granularity, Zone, CELL_MS, DAY_MS, HOUR_MS};

use crate::answer::{off_runtime, precision_of, respond};
use crate::error::ApiError;
use crate::grouping::{speed_sources, Grouping};
use crate::state::AppState;

/// A Plausible-style `400`: `{"error": "..."}`.
fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad(msg)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metric {
    Pageviews,
    Visitors,
    Events,
}

impl Metric {
    fn parse(s: &str) -> Result<Metric, ApiError> {
        match s {
            "pageviews" => Ok(Metric::Pageviews),
            "visitors" => Ok(Metric::Visitors),
            "events" => Ok(Metric::Events),
            _ => Err(bad(format!(
                "Metric '{s}' is not supported by tally (it supports pageviews, visitors and events)."
            ))),
        }
    }
}

/// A dimension of the query: one of the breakdown dimensions, the hostname / event name, or
/// time buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dim {
    Of(Dimension),
    Hostname,
    /// `event:name`: every event tally stores is a `pageview`.
    Name,
    /// `time:hour|day|month`; `time` is `Time(None)` until the range picks its buckets.
    Time(Option<Granularity>),
}

impl Dim {
    /// A dimension of `dimensions` (time buckets allowed).
    fn parse_dimension(s: &str) -> Result<Dim, ApiError> {
        match s {
            "time" => Ok(Dim::Time(None)),
            "time:hour" => Ok(Dim::Time(Some(Granularity::Hour))),
            "time:day" => Ok(Dim::Time(Some(Granularity::Day))),
            "time:month" => Ok(Dim::Time(Some(Granularity::Month))),
            _ => Dim::parse(s),
        }
    }

    /// A dimension of a filter.
    fn parse(s: &str) -> Result<Dim, ApiError> {
        Ok(match s {
            "event:page" => Dim::Of(Dimension::Page),
            "event:hostname" => Dim::Hostname,
            "event:name" => Dim::Name,
            "visit:source" => Dim::Of(Dimension::Source),
            "visit:referrer" => Dim::Of(Dimension::Referrer),
            "visit:utm_source" => Dim::Of(Dimension::UtmSource),
            "visit:utm_medium" => Dim::Of(Dimension::UtmMedium),
            "visit:utm_campaign" => Dim::Of(Dimension::UtmCampaign),
            t if t == "time" || t.starts_with("time:") => {
                return Err(bad(format!(
                    "Dimension '{t}' is not supported by tally here (it supports time, time:hour, time:day and time:month as dimensions, not in filters)."
                )))
            }
            other => {
                return Err(bad(format!(
                    "Dimension '{other}' is not supported by tally (it supports event:page, event:hostname, event:name, visit:source, visit:referrer, visit:utm_source, visit:utm_medium and visit:utm_campaign)."
                )))
            }
        })
    }

    /// What [`Dim::value`] reads; `None` for a constant.
    fn input(self) -> Option<Input> {
        match self {
            Dim::Of(d) => Some(d.input()),
            Dim::Hostname => Some(Input::Url),
            Dim::Name | Dim::Time(_) => None,
        }
    }

    /// Whether [`Dim::value`] is a function of the campaign alone
    /// (`tally_core::dims::is_campaign_dimension`; the hostname is the site's).
    fn by_campaign(self) -> bool {
        match self {
            Dim::Of(d) => tally_core::dims::is_campaign_dimension(d),
            Dim::Hostname | Dim::Name | Dim::Time(_) => true,
        }
    }

    fn value<'a>(self, url: &'a str, referrer: &'a str) -> Cow<'a, str> {
        match self {
            Dim::Of(d) => d.value(url, referrer),
            Dim::Hostname => Cow::Borrowed(tally_core::url::host_of(url).unwrap_or("")),
            Dim::Name => Cow::Borrowed("pageview"),
            // Filled in per bucket.
            Dim::Time(_) => Cow::Borrowed(""),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Is,
    IsNot,
    Contains,
    ContainsNot,
}

#[derive(Debug, Clone)]
enum Filter {
    Match {
        op: Op,
        dim: Dim,
        values: Vec<String>,
        case_sensitive: bool,
    },
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
}

impl Filter {
    /// Whether [`Filter::matches`] reads the campaign alone ([`Dim::by_campaign`]).
    fn by_campaign(&self) -> bool {
        match self {
            Filter::Match { dim, .. } => dim.by_campaign(),
            Filter::And(fs) | Filter::Or(fs) => fs.iter().all(Filter::by_campaign),
            Filter::Not(f) => f.by_campaign(),
        }
    }

    /// What [`Filter::matches`] reads; `None` when it reads neither input.
    fn input(&self) -> Option<Input> {
        let all = |fs: &[Filter]| fs.iter().filter_map(Filter::input).reduce(Input::and);
        match self {
            Filter::Match { dim, .. } => dim.input(),
            Filter::And(fs) | Filter::Or(fs) => all(fs),
            Filter::Not(f) => f.input(),
        }
    }

    fn parse(v: &Value) -> Result<Filter, ApiError> {
        let invalid = || bad(format!("Invalid filter '{v}'."));
        let a = v.as_array().ok_or_else(invalid)?;
        let op = a.first().and_then(Value::as_str).ok_or_else(invalid)?;
        match op {
            "and" | "or" => {
                let list = a.get(1).and_then(Value::as_array).ok_or_else(invalid)?;
                if list.is_empty() || a.len() != 2 {
                    return Err(invalid());
                }
                let fs = list.iter().map(Filter::parse).collect::<Result<_, _>>()?;
                Ok(if op == "and" {
                    Filter::And(fs)
                } else {
                    Filter::Or(fs)
                })
            }
            "not" => match (a.get(1), a.len()) {
                (Some(f), 2) => Ok(Filter::Not(Box::new(Filter::parse(f)?))),
                _ => Err(invalid()),
            },
            "is" | "is_not" | "contains" | "contains_not" => {
                let dim = Dim::parse(a.get(1).and_then(Value::as_str).ok_or_else(invalid)?)?;
                let values = a
                    .get(2)
                    .and_then(Value::as_array)
                    .ok_or_else(invalid)?
                    .iter()
                    .map(|x| x.as_str().map(str::to_string).ok_or_else(invalid))
                    .collect::<Result<Vec<_>, _>>()?;
                let case_sensitive = match a.get(3) {
                    None => true,
                    Some(Value::Object(m)) => {
                        if m.keys().any(|k| k != "case_sensitive") {
                            return Err(bad(format!(
                                "Filter modifiers other than case_sensitive are not supported: '{v}'."
                            )));
                        }
                        m.get("case_sensitive").and_then(Value::as_bool).unwrap_or(true)
                    }
                    Some(_) => return Err(invalid()),
                };
                if a.len() > 4 {
                    return Err(invalid());
                }
                let op = match op {
                    "is" => Op::Is,
                    "is_not" => Op::IsNot,
                    "contains" => Op::Contains,
                    _ => Op::ContainsNot,
                };
                // Compared case-insensitively: lower-cased once here, not once per key.
                let values = match case_sensitive {
                    true => values,
                    false => values.iter().map(|v| v.to_lowercase()).collect(),
                };
                Ok(Filter::Match {
                    op,
                    dim,
                    values,
                    case_sensitive,
                })
            }
            other => Err(bad(format!(
                "Filter operator '{other}' is not supported by tally (it supports is, is_not, contains, contains_not, and, or, not)."
            ))),
        }
    }

    fn matches(&self, url: &str, referrer: &str) -> bool {
        match self {
            Filter::And(fs) => fs.iter().all(|f| f.matches(url, referrer)),
            Filter::Or(fs) => fs.iter().any(|f| f.matches(url, referrer)),
            Filter::Not(f) => !f.matches(url, referrer),
            Filter::Match {
                op,
                dim,
                values,
                case_sensitive,
            } => {
                let mut v = dim.value(url, referrer);
                if !case_sensitive {
                    v = Cow::Owned(v.to_lowercase());
                }
                match op {
                    Op::Is => values.iter().any(|x| *x == v),
                    Op::IsNot => !values.iter().any(|x| *x == v),
                    Op::Contains => values.iter().any(|x| v.contains(x.as_str())),
                    Op::ContainsNot => !values.iter().any(|x| v.contains(x.as_str())),
                }
            }
        }
    }
}

/// What `order_by` sorts on.
#[derive(Debug, Clone, Copy)]
enum SortKey {
    Metric(usize),
    Dimension(usize),
}

/// The parsed query.
struct Query {
    host: String,
    metrics: Vec<Metric>,
    dims: Vec<Dim>,
    filters: Vec<Filter>,
    order: Vec<(SortKey, bool)>,
    limit: usize,
    offset: usize,
    zone: Zone,
    /// `[start, end)` in ms.
    range: (i64, i64),
    total_rows: bool,
    time_labels: bool,
    /// `date_range` is `"all"`.
    all_time: bool,
    /// Where the time dimension is in `dims`.
    time_at: Option<usize>,
}

impl Query {
    fn granularity(&self) -> Option<Granularity> {
        match self.dims.get(self.time_at?) {
            Some(Dim::Time(g)) => *g,
            _ => None,
        }
    }

    /// Plausible's label of the time bucket starting at `ms`: `2026-11-28` for days and
    /// months, `2026-11-28 10:00:00` for hours, in the query's zone.
    fn label(&self, ms: i64, g: Granularity) -> String {
        let local = chrono::DateTime::from_timestamp_millis(ms + self.zone.offset_ms(ms))
            .map(|d| d.naive_utc())
            .unwrap_or_default();
        match g {
            Granularity::Hour => local.format("%Y-%m-%d %H:00:00").to_string(),
            _ => local.format("%Y-%m-%d").to_string(),
        }
    }

    /// Every bucket's label from `from` (the range's start, or for `"all"` the first bucket
    /// with data) to the range's end (at most 10 000), each once.
    fn all_labels(&self, g: Granularity, from: i64) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut t = self.zone.bucket_start(from.max(self.range.0), g);
        while t < self.range.1 && out.len() < 10_000 {
            let label = self.label(t, g);
            if out.last() != Some(&label) {
                out.push(label);
            }
            t = match g {
                Granularity::Hour | Granularity::Total => self.zone.next_hour_start(t),
                Granularity::Day => self.zone.next_day_start(t),
                Granularity::Month => self.zone.month_start(t + 32 * DAY_MS),
            };
        }
        out
    }
}

/// The first instant of the local hour *label* containing `ms`: Plausible groups hours by their
/// local wall-clock label, so the two 02:00 hours of a fall-back night (or Lord Howe's two
/// 01:30–02:00 halves) are one row, `2026-10-25 02:00:00`, not two rows with the same label.
fn local_hour_start(zone: Zone, ms: i64) -> i64 {
    let wall_hour = |t: i64| (t + zone.offset_ms(t)).div_euclid(HOUR_MS);
    let mut start = zone.hour_start(ms);
    // Only a bucket that starts where the offset drops (a fall-back) can repeat the label of the
    // one before: every other hour costs two offset lookups, not another bucket search.
    while zone.offset_ms(start - 1) > zone.offset_ms(start) {
        let before = zone.hour_start(start - 1);
        if wall_hour(before) != wall_hour(start) {
            break;
        }
        start = before;
    }
    start
}

fn field<'a>(body: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    body.get(name).filter(|v| !v.is_null())
}

fn parse_date(s: &str) -> Result<NaiveDate, ApiError> {
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|_| bad(format!("Invalid date '{s}' in date_range: use YYYY-MM-DD.")))
}

/// `[start, end)` of the local dates `first..=last` in `zone`.
fn dates(zone: Zone, first: NaiveDate, last: NaiveDate) -> Result<(i64, i64), ApiError> {
    if last < first {
        return Err(bad("Invalid date_range: the end is before the start."));
    }
    // The local day's first instant (also where DST skips midnight): from its noon.
    let start = |d: NaiveDate| -> Result<i64, ApiError> {
        let noon = d
            .and_hms_opt(12, 0, 0)
            .ok_or_else(|| bad("Invalid date_range."))?;
        Ok(zone.day_start(zone.instant_of(noon)))
    };
    let from = start(first)?;
    let to = zone.next_day_start(start(last)?);
    Ok((from, to))
}

/// The range of a `date_range` (Plausible's meanings, see the module docs) in `zone`.
fn parse_range(v: &Value, zone: Zone, now: i64) -> Result<(i64, i64), ApiError> {
    let today = chrono::DateTime::from_timestamp_millis(now + zone.offset_ms(now))
        .map(|d| d.date_naive())
        .ok_or_else(|| bad("The server clock is out of range."))?;
    let invalid = || bad(format!("Invalid date_range {v}."));
    match v {
        Value::String(s) => match s.as_str() {
            "day" => dates(zone, today, today),
            "month" => {
                let first = today.with_day(1).ok_or_else(invalid)?;
                let last = add_months(first, 1).pred_opt().ok_or_else(invalid)?;
                dates(zone, first, last)
            }
            "year" => {
                let first = NaiveDate::from_ymd_opt(today.year(), 1, 1).ok_or_else(invalid)?;
                let last = NaiveDate::from_ymd_opt(today.year(), 12, 31).ok_or_else(invalid)?;
                dates(zone, first, last)
            }
            "all" => Ok((tally_core::MIN_TS_MS, zone.next_day_start(now))),
            "realtime" | "30m" => Err(bad(format!(
                "date_range '{s}' is not supported by tally's /api/v2/query."
            ))),
            other => {
                let (n, unit) = other
                    .find(|c: char| !c.is_ascii_digit())
                    .map(|i| other.split_at(i))
                    .ok_or_else(invalid)?;
                let n: u32 = n.parse().map_err(|_| invalid())?;
                match unit {
                    "d" if (1..=5000).contains(&n) => {
                        let first = today - chrono::Days::new(u64::from(n));
                        let last = today.pred_opt().ok_or_else(invalid)?;
                        dates(zone, first, last)
                    }
                    "mo" if (1..=100).contains(&n) => {
                        let this_month = today.with_day(1).ok_or_else(invalid)?;
                        let first = sub_months(this_month, n);
                        let last = this_month.pred_opt().ok_or_else(invalid)?;
                        dates(zone, first, last)
                    }
                    _ => Err(invalid()),
                }
            }
        },
        Value::Array(a) if a.len() == 2 => {
            let (Some(f), Some(t)) = (a[0].as_str(), a[1].as_str()) else {
                return Err(invalid());
            };
            if f.len() == 10 && t.len() == 10 {
                dates(zone, parse_date(f)?, parse_date(t)?)
            } else {
                let p = |s: &str| {
                    chrono::DateTime::parse_from_rfc3339(s)
                        .map(|d| d.timestamp_millis())
                        .map_err(|_| invalid())
                };
                let (from, to) = (p(f)?, p(t)?);
                if from >= to {
                    return Err(bad("Invalid date_range: the end is not after the start."));
                }
                // Every layer counts in whole cells: a range that does not start and end on
                // a cell boundary cannot be answered exactly, and is refused, not rounded. The
                // end is inclusive, as Plausible's: `10:59:59` (or `.999`) ends before 11:00.
                let end = [to + 1, to + 1000]
                    .into_iter()
                    .find(|e| e.rem_euclid(CELL_MS) == 0);
                match (from.rem_euclid(CELL_MS), end) {
                    (0, Some(end)) => Ok((from, end)),
                    _ => Err(bad(format!(
                        "Invalid date_range: tally counts views in 15-minute cells, so a range of \
                         times must start on a quarter hour and end one second before one \
                         (e.g. [\"{}\", \"{}\"]).",
                        zone.format(from.div_euclid(CELL_MS) * CELL_MS),
                        zone.format((to + CELL_MS).div_euclid(CELL_MS) * CELL_MS - 1000),
                    ))),
                }
            }
        }
        _ => Err(invalid()),
    }
}

fn add_months(d: NaiveDate, n: u32) -> NaiveDate {
    d.checked_add_months(chrono::Months::new(n)).unwrap_or(d)
}

fn sub_months(d: NaiveDate, n: u32) -> NaiveDate {
    d.checked_sub_months(chrono::Months::new(n)).unwrap_or(d)
}

fn parse(body: &Value, now: i64) -> Result<Query, ApiError> {
    let body = body
        .as_object()
        .ok_or_else(|| bad("The query must be a JSON object."))?;
    let known = [
        "site_id",
        "metrics",
        "date_range",
        "dimensions",
        "filters",
        "order_by",
        "pagination",
        "include",
        "timezone",
        "date",
    ];
    if let Some(k) = body.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(bad(format!("Unknown field '{k}' in the query.")));
    }
    let host = field(body, "site_id")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("site_id is required: the site's domain, such as example.com."))?;
    let host = tally_core::url::normalize_host(host)
        .map_err(|e| bad(format!("site_id is not a valid domain: {e}.")))?;
    let metrics = field(body, "metrics")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| bad("metrics is required: a non-empty list, such as [\"pageviews\"]."))?
        .iter()
        .map(|m| Metric::parse(m.as_str().unwrap_or("")))
        .collect::<Result<Vec<_>, _>>()?;
    let zone = match field(body, "timezone") {
        None => Zone::UTC,
        Some(Value::String(tz)) => Zone::parse(tz)
            .ok_or_else(|| bad(format!("timezone '{tz}' is not a known IANA time zone.")))?,
        Some(_) => return Err(bad("timezone must be a string such as Europe/Berlin.")),
    };
    if field(body, "date").is_some() {
        return Err(bad("The date field is not supported by tally."));
    }
    let range = parse_range(
        field(body, "date_range").ok_or_else(|| bad("date_range is required."))?,
        zone,
        now,
    )?;
    let dim_names: Vec<&str> = match field(body, "dimensions") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|d| d.as_str().ok_or_else(|| bad("dimensions must be strings.")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("dimensions must be a list.")),
    };
    let mut dims = dim_names
        .iter()
        .map(|d| Dim::parse_dimension(d))
        .collect::<Result<Vec<_>, _>>()?;
    let time_at = dims.iter().position(|d| matches!(d, Dim::Time(_)));
    if dims.iter().filter(|d| matches!(d, Dim::Time(_))).count() > 1 {
        return Err(bad("Only one time dimension is allowed per query."));
    }
    if let Some(i) = time_at {
        // `time` picks buckets as Plausible's dashboard does: hours for a day, days up to
        // about two months, months beyond.
        let g = match dims[i] {
            Dim::Time(Some(g)) => g,
            _ if range.1 - range.0 <= 2 * DAY_MS => Granularity::Hour,
            _ if range.1 - range.0 <= 62 * DAY_MS => Granularity::Day,
            _ => Granularity::Month,
        };
        dims[i] = Dim::Time(Some(g));
    }
    let filters = match field(body, "filters") {
        None => Vec::new(),
        Some(Value::Array(a)) => a.iter().map(Filter::parse).collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("filters must be a list.")),
    };
    let metric_names: Vec<&str> = body["metrics"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let order = match field(body, "order_by") {
        None => match time_at {
            Some(i) => vec![(SortKey::Dimension(i), false)],
            None => vec![(SortKey::Metric(0), true)],
        },
        Some(Value::Array(a)) => a
            .iter()
            .map(|e| {
                let invalid = || bad(format!("Invalid order_by entry '{e}'."));
                let pair = e.as_array().filter(|p| p.len() == 2).ok_or_else(invalid)?;
                let (Some(name), Some(dir)) = (pair[0].as_str(), pair[1].as_str()) else {
                    return Err(invalid());
                };
                let desc = match dir {
                    "desc" => true,
                    "asc" => false,
                    _ => return Err(invalid()),
                };
                let key = if let Some(i) = metric_names.iter().position(|m| *m == name) {
                    SortKey::Metric(i)
                } else if let Some(i) = dim_names.iter().position(|d| *d == name) {
                    SortKey::Dimension(i)
                } else {
                    return Err(bad(format!(
                        "Invalid order_by entry '{e}': it must name a metric or dimension of the query."
                    )));
                };
                Ok((key, desc))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("order_by must be a list.")),
    };
    let (mut limit, mut offset) = (10_000usize, 0usize);
    if let Some(p) = field(body, "pagination") {
        let p = p
            .as_object()
            .ok_or_else(|| bad("pagination must be an object."))?;
        for (k, v) in p {
            let n = v
                .as_u64()
                .ok_or_else(|| bad(format!("pagination.{k} must be a non-negative integer.")))?;
            match k.as_str() {
                "limit" if (1..=10_000).contains(&n) => limit = n as usize,
                "offset" => offset = n as usize,
                _ => return Err(bad(format!("Invalid pagination '{k}': {n}."))),
            }
        }
    }
    let mut total_rows = false;
    let mut time_labels = false;
    if let Some(inc) = field(body, "include") {
        let inc = inc
            .as_object()
            .ok_or_else(|| bad("include must be an object."))?;
        for (k, v) in inc {
            match (k.as_str(), v) {
                ("total_rows", Value::Bool(b)) => total_rows = *b,
                ("time_labels", Value::Bool(b)) => time_labels = *b,
                ("imports", Value::Bool(_)) => {}
                _ => {
                    return Err(bad(format!(
                        "include.{k} is not supported by tally (it supports total_rows, time_labels and imports)."
                    )))
                }
            }
        }
    }
    Ok(Query {
        host,
        metrics,
        dims,
        filters,
        order,
        limit,
        offset,
        zone,
        range,
        total_rows,
        time_labels,
        all_time: field(body, "date_range") == Some(&json!("all")),
        time_at,
    })
}

/// Whether the request may query: a key of `auth.api_keys`, or the read or admin token; with
/// no keys and no read token, open on a loopback bind only.
fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    let is = |token: &str| {
        given.is_some_and(|g| crate::auth::constant_time_eq(g.as_bytes(), token.as_bytes()))
    };
    if state.api_keys.is_empty() && state.read_token.is_none() {
        return state.api_open;
    }
    state.api_keys.iter().any(|k| is(k))
        || state.read_token.as_deref().is_some_and(is)
        || state.admin_token.as_deref().is_some_and(is)
}

/// `POST /api/v2/query`.
pub(crate) async fn post_query(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !authorized(&state, &headers) {
        return (
            axum::http::StatusCode::UNAUTHORIZED,
            Json(json!({"error": "Missing or invalid API key: send Authorization: Bearer <key> with a key of auth.api_keys."})),
        )
            .into_response();
    }
    match off_runtime(move || run(&state, &body)).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn run(state: &AppState, body: &[u8]) -> Result<Response, ApiError> {
    let body: Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("The request body is not valid JSON: {e}.")))?;
    let q = parse(&body, tally_core::now_ms())?;
    let cells = (q.range.0.div_euclid(CELL_MS), q.range.1.div_euclid(CELL_MS));
    let wants_visitors = q.metrics.contains(&Metric::Visitors);
    // The range is local midnights (or hours): whole cells in every zone.
    let visitor_cells = match wants_visitors {
        true => cells,
        false => (0, 0),
    };
    let view = state.views.current();
    let precision = precision_of(state, view.as_ref());
    let granularity = q.granularity();
    let zone = q.zone;
    let bucket_of = move |ms: i64| match granularity {
        Some(Granularity::Hour) => local_hour_start(zone, ms),
        g => zone.bucket_start(ms, g.unwrap_or(Granularity::Day)),
    };
    let bucket = granularity.map(|_| &bucket_of as &dyn Fn(i64) -> i64);
    let by_campaign =
        q.dims.iter().all(|d| d.by_campaign()) && q.filters.iter().all(Filter::by_campaign);
    // What the rows' values are a function of: each is computed once per distinct input.
    let input = (q.dims.iter().filter_map(|d| d.input()))
        .chain(q.filters.iter().filter_map(Filter::input))
        .reduce(Input::and)
        .unwrap_or(Input::Url);
    let speed = speed_sources(
        state,
        view.as_ref(),
        &q.host,
        None,
        cells,
        bucket.is_some(),
        (input, by_campaign),
    )?;
    let groups = Grouping::new(
        view.as_ref(),
        speed.as_deref(),
        &q.host,
        None,
        cells,
        (input, by_campaign, |url, referrer| {
            q.filters.iter().all(|f| f.matches(url, referrer)).then(|| {
                q.dims
                    .iter()
                    .map(|d| d.value(url, referrer))
                    .collect::<Vec<Cow<'_, str>>>()
            })
        }),
        bucket,
    );
    // "all" starts at the site's first bucket with data (Plausible: its first stats date),
    // whatever the filters keep: with filters, the site is grouped once more without them.
    let first_bucket = match (q.all_time && !q.filters.is_empty(), granularity) {
        (true, Some(_)) => {
            let site = Grouping::new(
                view.as_ref(),
                speed.as_deref(),
                &q.host,
                None,
                cells,
                (Input::Url, by_campaign, |_, _| Some(())),
                bucket,
            );
            site.groups().map(|(_, b, _)| b).min()
        }
        _ => groups.groups().map(|(_, b, _)| b).min(),
    };
    let labels_from = match q.all_time {
        true => first_bucket.unwrap_or_else(|| zone.day_start(q.range.1 - 1)),
        false => q.range.0,
    };
    /// One result row: its group, dimension values, views and (once counted) visitors.
    struct Row<'k, K> {
        key: (&'k K, i64),
        dims: Vec<String>,
        views: u64,
        visitors: u64,
    }
    let mut rows: Vec<Row<'_, _>> = groups
        .groups()
        .map(|(key, bucket, views)| {
            let mut dims: Vec<String> = key.iter().map(|d| d.to_string()).collect();
            if let (Some(i), Some(g)) = (q.time_at, granularity) {
                dims[i] = q.label(bucket, g);
            }
            Row {
                key: (key, bucket),
                dims,
                views,
                visitors: 0,
            }
        })
        .collect();
    let mut speed_available = groups.speed_available();
    // Visitors are one union per row: counted for every row only when the order needs them,
    // else for the rows of the page asked for.
    let mut count_visitors = |rows: &mut [Row<'_, _>]| -> Result<(), ApiError> {
        let wanted: Vec<_> = rows.iter().map(|r| r.key).collect();
        let (uniques, read) = groups.uniques(state, &wanted, visitor_cells, precision)?;
        speed_available &= read;
        for (r, u) in rows.iter_mut().zip(uniques) {
            r.visitors = u;
        }
        Ok(())
    };
    let by_visitors = q
        .order
        .iter()
        .any(|(k, _)| matches!(k, SortKey::Metric(i) if q.metrics[*i] == Metric::Visitors));
    if wants_visitors && by_visitors {
        count_visitors(&mut rows)?;
    }
    // No dimensions: one row, also for a site without views.
    let empty = Vec::new();
    if q.dims.is_empty() && rows.is_empty() {
        rows.push(Row {
            key: (&empty, 0),
            dims: Vec::new(),
            views: 0,
            visitors: 0,
        });
    }
    let metric = |r: &Row<'_, _>, m: Metric| match m {
        Metric::Pageviews | Metric::Events => r.views,
        Metric::Visitors => r.visitors,
    };
    let order = |a: &Row<'_, _>, b: &Row<'_, _>| {
        for (key, desc) in &q.order {
            let o = match key {
                SortKey::Metric(i) => metric(a, q.metrics[*i]).cmp(&metric(b, q.metrics[*i])),
                SortKey::Dimension(i) => a.dims[*i].cmp(&b.dims[*i]),
            };
            let o = if *desc { o.reverse() } else { o };
            if o != Ordering::Equal {
                return o;
            }
        }
        a.dims.cmp(&b.dims)
    };
    let total = rows.len();
    // Only the rows up to the end of the page need their order.
    let end = q.offset.saturating_add(q.limit);
    if end < total {
        rows.select_nth_unstable_by(end, order);
        rows.truncate(end);
    }
    rows.sort_by(order);
    let page = q.offset.min(rows.len())..rows.len();
    if wants_visitors && !by_visitors {
        count_visitors(&mut rows[page.clone()])?;
    }
    let rows: Vec<(Vec<String>, Vec<u64>)> = rows
        .drain(page)
        .map(|r| {
            let metrics = q.metrics.iter().map(|m| metric(&r, *m)).collect();
            (r.dims, metrics)
        })
        .collect();
    let results: Vec<Value> = rows
        .into_iter()
        .map(|(d, m)| json!({"metrics": m, "dimensions": d}))
        .collect();
    let mut meta = Map::new();
    if q.total_rows {
        meta.insert("total_rows".into(), json!(total));
    }
    if let (true, Some(g)) = (q.time_labels, granularity) {
        meta.insert("time_labels".into(), json!(q.all_labels(g, labels_from)));
    }
    let mut echo = body.clone();
    if let Some(o) = echo.as_object_mut() {
        o.insert("site_id".into(), json!(q.host));
        o.insert(
            "date_range".into(),
            json!([q.zone.format(q.range.0), q.zone.format(q.range.1 - 1000)]),
        );
        o.insert("timezone".into(), json!(q.zone.name()));
    }
    let reply = json!({"results": results, "meta": meta, "query": echo});
    Ok(respond(reply, speed_available))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn date_ranges_mean_what_they_mean_in_plausible() {
        let now = ms("2026-11-28T15:00:00Z");
        let utc = Zone::UTC;
        let r = |v: Value| parse_range(&v, utc, now).unwrap();
        assert_eq!(
            r(json!("day")),
            (ms("2026-11-28T00:00:00Z"), ms("2026-11-29T00:00:00Z"))
        );
        assert_eq!(
            r(json!("7d")),
            (ms("2026-11-21T00:00:00Z"), ms("2026-11-28T00:00:00Z"))
        );
        assert_eq!(
            r(json!("month")),
            (ms("2026-11-01T00:00:00Z"), ms("2026-12-01T00:00:00Z"))
        );
        assert_eq!(
            r(json!("6mo")),
            (ms("2026-05-01T00:00:00Z"), ms("2026-11-01T00:00:00Z"))
        );
        assert_eq!(
            r(json!("year")),
            (ms("2026-01-01T00:00:00Z"), ms("2027-01-01T00:00:00Z"))
        );
        assert_eq!(
            r(json!(["2026-11-01", "2026-11-02"])),
            (ms("2026-11-01T00:00:00Z"), ms("2026-11-03T00:00:00Z"))
        );
        let berlin = Zone::parse("Europe/Berlin").unwrap();
        assert_eq!(
            parse_range(&json!("day"), berlin, now).unwrap(),
            (ms("2026-11-27T23:00:00Z"), ms("2026-11-28T23:00:00Z"))
        );
        // The ends of the calendar answer or refuse, never panic.
        for edge in [
            json!(["0001-01-01", "0001-01-01"]),
            json!(["9999-12-31", "9999-12-31"]),
            json!(["0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"]),
            json!("5000d"),
            json!("100mo"),
        ] {
            let _ = parse_range(&edge, berlin, now);
            let _ = parse_range(&edge, utc, now);
        }
        for bad in [
            json!("0d"),
            json!("7x"),
            json!(["2026-11-02", "2026-11-01"]),
            json!(3),
        ] {
            assert!(parse_range(&bad, utc, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn ranges_of_times_are_whole_cells_or_refused_never_rounded() {
        let now = ms("2026-11-28T15:00:00Z");
        let r = |f: &str, t: &str| parse_range(&json!([f, t]), Zone::UTC, now);
        // The end is inclusive, to the second or the millisecond.
        assert_eq!(
            r("2026-11-28T10:00:00Z", "2026-11-28T10:59:59Z").unwrap(),
            (ms("2026-11-28T10:00:00Z"), ms("2026-11-28T11:00:00Z"))
        );
        assert_eq!(
            r("2026-11-28T10:15:00+05:30", "2026-11-28T10:44:59.999+05:30").unwrap(),
            (ms("2026-11-28T04:45:00Z"), ms("2026-11-28T05:15:00Z"))
        );
        // Rounding either end would count minutes outside the range or drop some inside it.
        for (f, t) in [
            ("2026-11-28T10:07:00Z", "2026-11-28T10:59:59Z"),
            ("2026-11-28T10:00:00Z", "2026-11-28T10:52:00Z"),
            ("2026-11-28T10:01:00Z", "2026-11-28T10:05:00Z"),
            ("2026-11-28T10:00:00Z", "2026-11-28T11:00:00Z"),
        ] {
            let e = r(f, t).expect_err(&format!("{f}..{t}"));
            assert!(format!("{e:?}").contains("15-minute"), "{e:?}");
        }
        // The range it suggests is the smallest exact one around the one asked for.
        let e = r("2026-11-28T10:07:00Z", "2026-11-28T10:59:59Z").unwrap_err();
        assert!(
            format!("{e:?}").contains(r#"[\"2026-11-28T10:00:00Z\", \"2026-11-28T10:59:59Z\"]"#),
            "{e:?}"
        );
    }

    #[test]
    fn hours_are_grouped_by_their_local_label() {
        let berlin = Zone::parse("Europe/Berlin").unwrap();
        // 2026-10-25: 02:00-03:00 local twice, at +02:00 (00:00Z) and at +01:00 (01:00Z).
        let first = ms("2026-10-25T00:00:00Z");
        assert_eq!(local_hour_start(berlin, first + 5 * 60_000), first);
        assert_eq!(local_hour_start(berlin, ms("2026-10-25T01:30:00Z")), first);
        assert_eq!(
            local_hour_start(berlin, ms("2026-10-25T02:10:00Z")),
            ms("2026-10-25T02:00:00Z")
        );
        // Lord Howe falls back half an hour (2026-04-05, 02:00 +11:00 → 01:30 +10:30): the
        // hour labelled 01:00 is 01:00-02:00 at +11:00 and 01:30-02:00 at +10:30.
        let lord_howe = Zone::parse("Australia/Lord_Howe").unwrap();
        let one = ms("2026-04-05T01:00:00+11:00");
        assert_eq!(
            local_hour_start(lord_howe, ms("2026-04-05T01:45:00+10:30")),
            one
        );
        assert_eq!(
            local_hour_start(lord_howe, ms("2026-04-05T01:15:00+11:00")),
            one
        );
        let q = Query {
            host: String::new(),
            metrics: vec![Metric::Pageviews],
            dims: Vec::new(),
            filters: Vec::new(),
            order: Vec::new(),
            limit: 10,
            offset: 0,
            zone: berlin,
            range: (ms("2026-10-24T22:00:00Z"), ms("2026-10-25T04:00:00Z")),
            total_rows: false,
            time_labels: true,
            all_time: false,
            time_at: None,
        };
        let labels = q.all_labels(Granularity::Hour, q.range.0);
        assert_eq!(
            labels,
            ["00", "01", "02", "03", "04"].map(|h| format!("2026-10-25 {h}:00:00"))
        );
    }

    #[test]
    fn filters_combine_and_match_values() {
        let f = Filter::parse(&json!(["and", [
            ["is", "visit:source", ["google.com", "news.test"]],
            ["not", ["contains", "event:page", ["ADMIN"], {"case_sensitive": false}]]
        ]]))
        .unwrap();
        assert!(f.matches("https://x.test/a", "google.com"));
        assert!(!f.matches("https://x.test/admin/a", "google.com"));
        assert!(!f.matches("https://x.test/a", ""));
        assert!(Filter::parse(&json!(["matches", "event:page", ["^/a"]])).is_err());
        assert!(Filter::parse(&json!(["is", "visit:country", ["DE"]])).is_err());
    }
}
