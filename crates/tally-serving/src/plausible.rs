//! `POST /api/event`: what the official Plausible trackers send, so a site can point them at
//! tally unchanged. Visitor ids are derived as Plausible does: a keyed hash of a daily-rotating
//! secret salt, the domain, the client IP and the User-Agent. The raw IP is never stored.
//!
//! As Plausible does: `h: 1` (hash-based routing) keeps the URL's fragment, so each hash route
//! is a page of its own; events whose User-Agent is a known bot or crawler (the `isbot` pattern
//! list) are answered `202` with `X-Plausible-Dropped: 1` and not stored, like engagement and
//! custom events (answered `202` and not counted as views).

use std::net::{IpAddr, SocketAddr};
use std::sync::LazyLock;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::Value;
use tally_core::event::{truncate_to_bytes, MAX_REFERRER_BYTES};
use tally_core::url::normalize_hash_url;
use tally_core::{day_of, normalize_url, now_ms, Event};

use crate::error::{ApiError, ApiResult};
use crate::extract::body_rejection;
use crate::state::AppState;

/// The visitor id: keyed BLAKE3 of domain, IP and User-Agent under the day's salt.
pub fn visitor_id(salt: &[u8; 32], domain: &str, ip: &IpAddr, user_agent: &str) -> String {
    let mut h = blake3::Hasher::new_keyed(salt);
    h.update(domain.as_bytes());
    h.update(&[0]);
    h.update(ip.to_string().as_bytes());
    h.update(&[0]);
    h.update(user_agent.as_bytes());
    let out = h.finalize();
    out.as_bytes()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The bot and crawler User-Agent patterns, compiled into one regex on first use.
static BOTS: LazyLock<isbot::Bots> = LazyLock::new(isbot::Bots::default);

/// Whether `user_agent` is a known bot or crawler.
pub fn is_bot(user_agent: &str) -> bool {
    BOTS.is_bot(user_agent)
}

/// What became of an accepted request.
enum Outcome {
    /// A page view, stored.
    Stored,
    /// Not a page view, or not a person's: answered and not stored.
    Dropped,
}

fn field<'a>(v: &'a Value, short: &str, long: &str) -> Option<&'a Value> {
    v.get(short)
        .or_else(|| v.get(long))
        .filter(|x| !x.is_null())
}

fn cors(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Content-Type"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    resp
}

pub(crate) async fn preflight() -> Response {
    cors(StatusCode::NO_CONTENT.into_response())
}

pub(crate) async fn post_event(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    cors(
        match accept(
            &state,
            peer.map(|Extension(ConnectInfo(p))| p),
            &headers,
            body,
        )
        .await
        {
            Ok(Outcome::Stored) => (StatusCode::ACCEPTED, "ok").into_response(),
            Ok(Outcome::Dropped) => (
                StatusCode::ACCEPTED,
                [("x-plausible-dropped", HeaderValue::from_static("1"))],
                "ok",
            )
                .into_response(),
            Err(e) => e.into_response(),
        },
    )
}

async fn accept(
    state: &AppState,
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Outcome> {
    let body = body.map_err(|r| body_rejection(r, state.limits.max_body_bytes))?;
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(format!("Request body is not valid JSON: {e}.")))?;
    if !v.is_object() {
        return Err(ApiError::bad("Request body must be a JSON object."));
    }
    let name = field(&v, "n", "name")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            ApiError::bad("The event name (n or name) is required and must be a string.")
        })?;
    let raw_url = field(&v, "u", "url")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            ApiError::bad("The page URL (u or url) is required and must be a string.")
        })?;
    // `h: 1`: the site routes by the fragment, which is then part of the page.
    let hash_mode = field(&v, "h", "hashMode").is_some_and(|h| {
        h.as_u64() == Some(1) || h.as_bool() == Some(true) || h.as_str() == Some("1")
    });
    let url = if hash_mode {
        normalize_hash_url(raw_url)
    } else {
        normalize_url(raw_url)
    }
    .map_err(|e| ApiError::bad(format!("The page URL is invalid: {e}.")))?;
    if name != "pageview" {
        // Engagement and custom events are accepted and not counted as views.
        return Ok(Outcome::Dropped);
    }
    let domain = field(&v, "d", "domain")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| tally_core::url::host_of(&url).map(str::to_string))
        .unwrap_or_default();
    let referrer = field(&v, "r", "referrer")
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty())
        .map(|r| truncate_to_bytes(r, MAX_REFERRER_BYTES).to_string());
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if is_bot(user_agent) {
        return Ok(Outcome::Dropped);
    }
    let now = now_ms();
    let visitor = state
        .trusted_proxies
        .client_ip(headers, peer)
        .map(|ip| visitor_id(&state.salt.for_day(day_of(now)), &domain, &ip, user_agent));
    let event = Event {
        ts: now,
        url,
        visitor,
        referrer,
        id: None,
        received_at: now,
    };
    state.append(vec![event]).await?;
    Ok(Outcome::Stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crawlers_are_bots_and_browsers_are_not() {
        for ua in [
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
            "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
            "curl/8.5.0",
            "python-requests/2.31.0",
        ] {
            assert!(is_bot(ua), "{ua}");
        }
        for ua in [
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0",
        ] {
            assert!(!is_bot(ua), "{ua}");
        }
    }

    #[test]
    fn visitor_ids_depend_on_ip_ua_domain_and_salt() {
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let other: IpAddr = "203.0.113.8".parse().unwrap();
        let s1 = [1u8; 32];
        let s2 = [2u8; 32];
        let a = visitor_id(&s1, "x.com", &ip, "UA");
        assert_eq!(a, visitor_id(&s1, "x.com", &ip, "UA"));
        assert_ne!(a, visitor_id(&s1, "x.com", &other, "UA"));
        assert_ne!(a, visitor_id(&s1, "x.com", &ip, "UA2"));
        assert_ne!(a, visitor_id(&s1, "y.com", &ip, "UA"));
        assert_ne!(a, visitor_id(&s2, "x.com", &ip, "UA"));
        assert!(!a.contains("203"));
    }
}
