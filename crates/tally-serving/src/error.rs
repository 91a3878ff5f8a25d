//! The one place where errors become HTTP responses. A 4xx carries a readable sentence; a 5xx
//! carries a generic sentence while the cause is logged.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug)]
pub enum ApiError {
    /// The client's mistake: 400 with a sentence.
    BadRequest(String),
    /// 400 with per-event details.
    InvalidEvents {
        message: String,
        details: Vec<(usize, String)>,
    },
    /// No valid admin token where one is needed: 401.
    Unauthorized,
    /// No valid read (or admin) token for a query endpoint while `auth.read_token` is set: 401.
    ReadUnauthorized,
    NotFound(String),
    MethodNotAllowed,
    Conflict {
        message: String,
        run_id: String,
    },
    PayloadTooLarge(String),
    UnsupportedMediaType(String),
    /// Temporarily unable (disk full, store closed, no view): 503 with Retry-After.
    Unavailable(String),
    /// Our bug or an unexpected failure: 500, cause logged, generic body.
    Internal(String),
}

impl ApiError {
    pub fn bad(msg: impl Into<String>) -> Self {
        ApiError::BadRequest(msg.into())
    }

    pub fn internal(err: impl std::fmt::Display) -> Self {
        ApiError::Internal(err.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, json!({ "error": m })),
            ApiError::InvalidEvents { message, details } => (
                StatusCode::BAD_REQUEST,
                json!({
                    "error": message,
                    "details": details
                        .into_iter()
                        .map(|(index, error)| json!({ "index": index, "error": error }))
                        .collect::<Vec<_>>(),
                }),
            ),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                json!({ "error": "This endpoint needs a valid admin token in the Authorization: Bearer header." }),
            ),
            ApiError::ReadUnauthorized => (
                StatusCode::UNAUTHORIZED,
                json!({ "error": "This endpoint needs the read token (or the admin token) in the Authorization: Bearer header." }),
            ),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, json!({ "error": m })),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                json!({ "error": "This method is not allowed on this path." }),
            ),
            ApiError::Conflict { message, run_id } => (
                StatusCode::CONFLICT,
                json!({ "error": message, "run_id": run_id }),
            ),
            ApiError::PayloadTooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, json!({ "error": m })),
            ApiError::UnsupportedMediaType(m) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, json!({ "error": m }))
            }
            ApiError::Unavailable(m) => {
                tracing::warn!(reason = %m, "answering 503");
                let mut resp =
                    (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": m }))).into_response();
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return resp;
            }
            ApiError::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({ "error": "The server failed to answer this request; the cause is in its log." }),
                )
            }
        };
        (status, Json(body)).into_response()
    }
}

impl From<tally_master::Error> for ApiError {
    fn from(e: tally_master::Error) -> Self {
        match e {
            tally_master::Error::Unavailable { what, source } => ApiError::Unavailable(format!(
                "Events could not be made durable right now ({what}: {source}); retry later."
            )),
            tally_master::Error::Closed => {
                ApiError::Unavailable("The server is shutting down; retry later.".to_string())
            }
            tally_master::Error::ThreadStopped(t) => ApiError::Unavailable(format!(
                "Events cannot be made durable: the server's {t} thread stopped and tally must be restarted; retry later."
            )),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<tally_log::Error> for ApiError {
    fn from(e: tally_log::Error) -> Self {
        if let tally_log::Error::TooLarge { bytes, max } = e {
            return ApiError::PayloadTooLarge(format!(
                "The request's events take {bytes} bytes and the log's largest message is {max} bytes; split them into smaller requests."
            ));
        }
        match e.kind() {
            tally_core::error::ErrorKind::Transient => ApiError::Unavailable(format!(
                "Events could not be stored in the log right now ({e}); retry later."
            )),
            _ => ApiError::Internal(e.to_string()),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
