//! `POST /v1/events`: validate the whole body, append it to the WAL, acknowledge once durable.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use serde_json::{json, Value};
use tally_core::event::{parse_body, BodyError, BodyFormat};
use tally_core::{now_ms, Event};

use crate::error::{ApiError, ApiResult};
use crate::extract::body_rejection;
use crate::state::AppState;

/// Bodies larger than this are parsed off the async runtime.
const INLINE_PARSE_BYTES: usize = 64 * 1024;

pub(crate) async fn post_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let format = BodyFormat::from_content_type(content_type).ok_or_else(|| {
        ApiError::UnsupportedMediaType(format!(
            "Content-Type must be application/json or application/x-ndjson, not {:?}.",
            content_type
        ))
    })?;
    let body = body.map_err(|r| body_rejection(r, state.limits.max_body_bytes))?;
    let events = match parse(&state, body, format).await {
        Ok(events) => events,
        Err(e) => {
            metrics::counter!(crate::metrics::EVENTS_REJECTED).increment(1);
            return Err(e);
        }
    };
    let accepted = events.len();
    if accepted > 0 {
        state.append(events).await?;
        metrics::counter!(crate::metrics::EVENTS_ACCEPTED).increment(accepted as u64);
    }
    Ok((StatusCode::ACCEPTED, Json(json!({ "accepted": accepted }))))
}

async fn parse(state: &AppState, body: Bytes, format: BodyFormat) -> ApiResult<Vec<Event>> {
    let limits = state.limits.ingest;
    let now = now_ms();
    let result = if body.len() <= INLINE_PARSE_BYTES {
        parse_body(&body, format, now, &limits)
    } else {
        tokio::task::spawn_blocking(move || parse_body(&body, format, now, &limits))
            .await
            .map_err(ApiError::internal)?
    };
    result.map_err(|e| match e {
        BodyError::Invalid(errors) => {
            let message = match errors.first() {
                Some((i, first)) if errors.len() == 1 => {
                    format!("Event {i} is invalid: {first}; nothing was stored.")
                }
                _ => format!("{} events are invalid; nothing was stored.", errors.len()),
            };
            ApiError::InvalidEvents {
                message,
                details: errors
                    .into_iter()
                    .map(|(i, e)| (i, e.to_string()))
                    .collect(),
            }
        }
        BodyError::TooManyEvents(max) => ApiError::PayloadTooLarge(format!(
            "Request has more than {max} events; split it into smaller requests."
        )),
        other => ApiError::bad(format!("{}.", capitalise(&other.to_string()))),
    })
}

pub(crate) fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}
