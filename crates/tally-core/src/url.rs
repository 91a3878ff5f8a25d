//! URL normalisation: the key every count is kept under.

use thiserror::Error;

/// Longest URL accepted, in bytes.
pub const MAX_URL_BYTES: usize = 2048;

#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum UrlError {
    #[error("url is empty")]
    Empty,
    #[error("url is longer than {MAX_URL_BYTES} bytes")]
    TooLong,
    #[error("url is not a valid absolute URL: {0}")]
    Invalid(String),
    #[error("url scheme must be http or https, not {0:?}")]
    Scheme(String),
}

/// Normalises a page URL as the WHATWG URL standard does (scheme and host lower-cased, default
/// port removed, empty path becomes `/`, percent-encoding normalised) and drops the fragment.
pub fn normalize_url(input: &str) -> Result<String, UrlError> {
    normalize(input, false)
}

/// [`normalize_url`] for a hash-routed page (API.md, "Hash-routed pages"): the fragment is
/// part of the page and kept (`/app#/settings` and `/app#/billing` are two pages); an empty
/// fragment is dropped.
pub fn normalize_hash_url(input: &str) -> Result<String, UrlError> {
    normalize(input, true)
}

fn normalize(input: &str, keep_fragment: bool) -> Result<String, UrlError> {
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Err(UrlError::Empty);
    }
    if trimmed.len() > MAX_URL_BYTES {
        return Err(UrlError::TooLong);
    }
    let mut parsed = ::url::Url::parse(trimmed).map_err(|e| UrlError::Invalid(e.to_string()))?;
    match parsed.scheme() {
        "http" | "https" => {}
        other => return Err(UrlError::Scheme(other.to_string())),
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(UrlError::Invalid("empty host".to_string()));
    }
    if !keep_fragment || parsed.fragment().is_some_and(str::is_empty) {
        parsed.set_fragment(None);
    }
    let out: String = parsed.into();
    if out.len() > MAX_URL_BYTES {
        return Err(UrlError::TooLong);
    }
    Ok(out)
}

/// Normalises a host name given on its own (a query's `host=` parameter) exactly as
/// [`normalize_url`] normalises the host of a page URL: lower case, IDNA to punycode
/// (`bücher.de` → `xn--bcher-kva.de`), a trailing dot kept, a port dropped. So a host filter
/// matches [`host_of`] of every URL of that host.
pub fn normalize_host(input: &str) -> Result<String, UrlError> {
    let h = input.trim();
    if h.is_empty() {
        return Err(UrlError::Empty);
    }
    if h.contains(['/', '?', '#', '@', '\\']) || h.chars().any(char::is_whitespace) {
        return Err(UrlError::Invalid(format!(
            "{h:?} is not a host name such as example.com"
        )));
    }
    let url = normalize_url(&format!("http://{h}/"))?;
    host_of(&url)
        .map(str::to_string)
        .ok_or_else(|| UrlError::Invalid("empty host".to_string()))
}

/// The host of a normalised URL (what `GET /v1/top?host=` filters on).
pub fn host_of(normalized: &str) -> Option<&str> {
    let rest = normalized.split_once("://")?.1;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    // Strip a port, but not the colons of an IPv6 literal.
    if authority.starts_with('[') {
        return authority.find(']').map(|i| &authority[..=i]);
    }
    Some(authority.split_once(':').map_or(authority, |(h, _)| h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_url_agree() {
        let a = normalize_url("HTTP://Example.COM:80/a#top").unwrap();
        assert_eq!(a, "http://example.com/a");
        assert_eq!(
            normalize_url("https://EXAMPLE.com:443").unwrap(),
            "https://example.com/"
        );
        assert_eq!(
            normalize_url("http://example.com:8080/A?b=C").unwrap(),
            "http://example.com:8080/A?b=C"
        );
        assert_eq!(
            normalize_url("http://example.com/a b").unwrap(),
            "http://example.com/a%20b"
        );
    }

    #[test]
    fn rejects_what_is_not_a_web_page() {
        assert_eq!(normalize_url(""), Err(UrlError::Empty));
        assert!(matches!(
            normalize_url("ftp://x.org/"),
            Err(UrlError::Scheme(_))
        ));
        assert!(matches!(
            normalize_url("/relative"),
            Err(UrlError::Invalid(_))
        ));
        let long = format!("http://example.com/{}", "a".repeat(MAX_URL_BYTES));
        assert_eq!(normalize_url(&long), Err(UrlError::TooLong));
    }

    #[test]
    fn a_host_parameter_matches_the_host_of_its_urls() {
        for (param, page) in [
            ("bücher.de", "https://BÜCHER.de/x"),
            ("Example.COM", "http://example.com:8080/a"),
            ("example.com.", "http://example.com./a"),
            ("[::1]", "http://[0:0::1]/"),
            ("example.com:81", "http://example.com/"),
        ] {
            let url = normalize_url(page).unwrap();
            assert_eq!(
                normalize_host(param).as_deref(),
                Ok(host_of(&url).unwrap()),
                "{param} vs {page}"
            );
        }
        assert_eq!(normalize_host("bücher.de").unwrap(), "xn--bcher-kva.de");
        assert_ne!(normalize_host("example.com.").unwrap(), "example.com");
        for bad in ["", " ", "a/b", "a?b", "u@h", "a b", "exa mple.com", "[::1"] {
            assert!(normalize_host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hash_routed_pages_keep_their_fragment() {
        assert_eq!(
            normalize_hash_url("HTTPS://X.test/app#/settings").unwrap(),
            "https://x.test/app#/settings"
        );
        assert_eq!(
            normalize_hash_url("https://x.test/app#").unwrap(),
            "https://x.test/app"
        );
        assert_eq!(
            normalize_hash_url("https://x.test/a?b=1").unwrap(),
            "https://x.test/a?b=1"
        );
        assert_eq!(
            normalize_url("https://x.test/app#/settings").unwrap(),
            "https://x.test/app"
        );
        assert_eq!(
            host_of(&normalize_hash_url("https://x.test#/a").unwrap()),
            Some("x.test")
        );
    }

    #[test]
    fn host_of_strips_port() {
        assert_eq!(host_of("http://example.com:8080/a"), Some("example.com"));
        assert_eq!(host_of("https://a.b/"), Some("a.b"));
        assert_eq!(host_of("http://[::1]:80/"), Some("[::1]"));
    }
}
