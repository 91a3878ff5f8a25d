//! The dashboard at `GET /` (API.md, "Dashboard"): files built from `dashboard/` by
//! `scripts/dashboard.sh` into this crate's `dashboard/` folder and embedded in the binary, so
//! `cargo build` needs no npm and the page works offline.
//!
//! Each file is stored three times (as is, gzip, brotli; compressed once at build time, never per
//! request) and served in the best encoding the browser accepts. Scripts and styles carry a hash
//! of their content in their names and are cached for a year; `index.html` names them and is
//! revalidated on every load (`no-cache` with an `ETag`), so a new binary's dashboard is seen at
//! once. Where `auth.read_token` is set, the files need it as the query API does; a browser asks
//! for it with its login prompt (Basic credentials, the token as the password), and then sends
//! it with every request of the page, the API's included.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::AppState;

/// One embedded file.
pub(crate) struct Asset {
    pub(crate) route: &'static str,
    pub(crate) content_type: &'static str,
    /// Named by its content's hash: cached for a year.
    pub(crate) immutable: bool,
    /// A hash of the content (computed by the build, for the `ETag`).
    pub(crate) hash: &'static str,
    pub(crate) identity: &'static [u8],
    pub(crate) gzip: &'static [u8],
    pub(crate) brotli: &'static [u8],
}

include!("../dashboard/assets.rs");

/// What the page may load: only this origin (uPlot sets inline styles; images are data URLs).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

/// The dashboard's routes, closed by `auth.read_token` as the query API is.
pub(crate) fn routes(state: &AppState) -> Router<AppState> {
    ASSETS
        .iter()
        .fold(Router::new(), |r, a| {
            r.route(
                a.route,
                get(move |headers: HeaderMap| async move { serve(a, &headers) }),
            )
        })
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::require_read_page,
        ))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Brotli,
    Gzip,
    Identity,
}

/// The best encoding `Accept-Encoding` allows (a coding with `q=0` is refused).
fn negotiate(headers: &HeaderMap) -> Encoding {
    let accepted = |name: &str| {
        headers
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|item| {
                let mut parts = item.split(';').map(str::trim);
                let coding = parts.next().unwrap_or_default();
                let refused = parts.any(|p| {
                    p.strip_prefix("q=")
                        .and_then(|q| q.parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                });
                (coding.eq_ignore_ascii_case(name) || coding == "*") && !refused
            })
    };
    if accepted("br") {
        Encoding::Brotli
    } else if accepted("gzip") {
        Encoding::Gzip
    } else {
        Encoding::Identity
    }
}

/// The entity tag of a file: a hash of its content and encoding.
fn etag(a: &Asset, e: Encoding) -> String {
    format!("\"{}-{:?}\"", a.hash, e)
}

fn serve(a: &'static Asset, headers: &HeaderMap) -> Response {
    let encoding = negotiate(headers);
    let tag = etag(a, encoding);
    let cache = if a.immutable {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let mut out = HeaderMap::new();
    out.insert(header::ETAG, HeaderValue::from_str(&tag).expect("hex"));
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    out.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    out.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    if fresh {
        return (StatusCode::NOT_MODIFIED, out).into_response();
    }
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    if !a.immutable {
        out.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        out.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("same-origin"),
        );
    }
    let body = match encoding {
        Encoding::Brotli => {
            out.insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
            a.brotli
        }
        Encoding::Gzip => {
            out.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            a.gzip
        }
        Encoding::Identity => a.identity,
    };
    (StatusCode::OK, out, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn the_best_accepted_encoding_is_chosen_and_q0_refuses_one() {
        assert_eq!(negotiate(&HeaderMap::new()), Encoding::Identity);
        assert_eq!(
            negotiate(&accept("gzip, deflate, br, zstd")),
            Encoding::Brotli
        );
        assert_eq!(negotiate(&accept("gzip")), Encoding::Gzip);
        assert_eq!(negotiate(&accept("br;q=0, gzip;q=0.5")), Encoding::Gzip);
        assert_eq!(negotiate(&accept("identity")), Encoding::Identity);
        assert_eq!(negotiate(&accept("*")), Encoding::Brotli);
    }

    #[test]
    fn the_index_and_its_hashed_script_and_style_are_embedded() {
        let index = ASSETS.iter().find(|a| a.route == "/").expect("index");
        let html = std::str::from_utf8(index.identity).unwrap();
        for a in ASSETS.iter().filter(|a| a.route != "/") {
            assert!(a.immutable, "{}", a.route);
            assert!(html.contains(a.route), "index.html names {}", a.route);
            assert!(!a.gzip.is_empty() && !a.brotli.is_empty());
        }
        assert!(ASSETS
            .iter()
            .any(|a| a.content_type.starts_with("text/javascript")));
        assert!(ASSETS
            .iter()
            .any(|a| a.content_type.starts_with("text/css")));
    }
}
