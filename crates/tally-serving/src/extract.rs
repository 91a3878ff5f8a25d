//! Request pieces every handler reads the same way: the query string and the body.

use std::collections::HashMap;

use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::Query;
use axum::http::StatusCode;

use crate::error::{ApiError, ApiResult};

/// The query string, as the handlers extract it (a malformed one is answered 400 by
/// [`params`], not by axum's default text).
pub(crate) type Params = Result<Query<HashMap<String, String>>, QueryRejection>;

pub(crate) fn params(p: Params) -> ApiResult<HashMap<String, String>> {
    p.map(|Query(q)| q)
        .map_err(|e| ApiError::bad(format!("The query string is invalid: {e}.")))
}

/// A body that could not be read: 413 past the configured limit, else 400.
pub(crate) fn body_rejection(rejection: BytesRejection, max_body_bytes: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge(format!(
            "Request body is larger than {max_body_bytes} bytes."
        ))
    } else {
        ApiError::bad(format!("Request body could not be read: {rejection}."))
    }
}

/// A boolean query parameter: `name`, `name=true|1` or `name=false|0`; absent is `default`.
pub(crate) fn flag(q: &HashMap<String, String>, name: &str, default: bool) -> ApiResult<bool> {
    match q.get(name).map(String::as_str) {
        None => Ok(default),
        Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(other) => Err(ApiError::bad(format!(
            "{name} must be true or false, not {other:?}."
        ))),
    }
}
