//! Breakdown dimensions (API.md, "Sites, breakdowns, realtime"): what a page view's page,
//! referrer, source and UTM values are, derived from its normalised URL and its referrer.
//!
//! Every dimension is a function of two things: the page URL and the referrer's host (empty for
//! a direct visit). Both layers therefore count views and visitors per **source key** — the pair
//! (referrer host, URL), see [`source_key`] — next to their per-URL counts, and a breakdown by
//! any dimension, for any URL filter, is a sum over source keys: exact, like a URL's views.

use std::borrow::Cow;

/// Separates the parts of a [`source_key`]; a normalised URL or host never contains it.
pub const SOURCE_KEY_MARK: char = '\u{1}';

/// The value of a dimension when the event has none.
pub const DIRECT: &str = "(direct)";
pub const NONE: &str = "(none)";

/// A breakdown dimension (`by=` of `GET /v1/breakdown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dimension {
    /// The URL's path (and fragment, for a hash-routed page) without its query.
    Page,
    /// The whole normalised URL.
    Url,
    /// The referrer's host without `www.`; [`DIRECT`] when none or the same site.
    Referrer,
    /// `utm_source` of the page URL, else the referrer host, else [`DIRECT`].
    Source,
    UtmSource,
    UtmMedium,
    UtmCampaign,
}

/// What a grouping's value is a function of: the page URL, the referrer host, or both. A
/// caller grouping many (referrer host, URL) pairs computes a value once per distinct input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    Url,
    Referrer,
    Both,
}

impl Input {
    /// What a value computed from both `self`'s and `other`'s inputs depends on.
    pub fn and(self, other: Input) -> Input {
        if self == other {
            self
        } else {
            Input::Both
        }
    }
}

impl Dimension {
    pub const ALL: [Dimension; 7] = [
        Dimension::Page,
        Dimension::Url,
        Dimension::Referrer,
        Dimension::Source,
        Dimension::UtmSource,
        Dimension::UtmMedium,
        Dimension::UtmCampaign,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Dimension::Page => "page",
            Dimension::Url => "url",
            Dimension::Referrer => "referrer",
            Dimension::Source => "source",
            Dimension::UtmSource => "utm_source",
            Dimension::UtmMedium => "utm_medium",
            Dimension::UtmCampaign => "utm_campaign",
        }
    }

    pub fn parse(s: &str) -> Option<Dimension> {
        Dimension::ALL.into_iter().find(|d| d.name() == s)
    }

    /// What [`Dimension::value`] reads.
    pub fn input(self) -> Input {
        match self {
            Dimension::Referrer => Input::Referrer,
            Dimension::Source => Input::Both,
            Dimension::Page
            | Dimension::Url
            | Dimension::UtmSource
            | Dimension::UtmMedium
            | Dimension::UtmCampaign => Input::Url,
        }
    }

    /// The value of this dimension for a view of `url` (normalised) referred by `referrer_host`
    /// (as [`referrer_host`] gives it: empty for a direct visit).
    pub fn value<'a>(self, url: &'a str, referrer_host: &'a str) -> Cow<'a, str> {
        let or = |v: Option<String>, none: &'static str| match v {
            Some(v) => Cow::Owned(v),
            None => Cow::Borrowed(none),
        };
        match self {
            Dimension::Page => page_of(url),
            Dimension::Url => Cow::Borrowed(url),
            Dimension::Referrer if referrer_host.is_empty() => Cow::Borrowed(DIRECT),
            Dimension::Referrer => Cow::Borrowed(referrer_host),
            Dimension::Source => match utm(url, "utm_source") {
                Some(s) => Cow::Owned(s),
                None if referrer_host.is_empty() => Cow::Borrowed(DIRECT),
                None => Cow::Borrowed(referrer_host),
            },
            Dimension::UtmSource => or(utm(url, "utm_source"), NONE),
            Dimension::UtmMedium => or(utm(url, "utm_medium"), NONE),
            Dimension::UtmCampaign => or(utm(url, "utm_campaign"), NONE),
        }
    }
}

/// The page of a normalised URL: its path, and its fragment when it kept one (a hash-routed
/// page), without the query, percent-decoded (Plausible's pathname plus hash, which it decodes).
/// `https://x.test/a?b=1` → `/a`; `https://x.test/app#/s` → `/app#/s`;
/// `https://x.test/app?u=1#/s` → `/app#/s`; `https://x.test/caf%C3%A9` → `/café`.
pub fn page_of(url: &str) -> Cow<'_, str> {
    // What follows the first "://" (searched as a char, then checked: a grouping by page asks
    // this of every page of a site, and a string pattern's searcher set-up cost more than the
    // rest of the function).
    let Some(rest) = url
        .match_indices(':')
        .find_map(|(i, _)| url[i + 1..].strip_prefix("//"))
    else {
        return Cow::Borrowed(url);
    };
    let Some(start) = rest.find(['/', '?', '#']) else {
        return Cow::Borrowed("/");
    };
    let tail = &rest[start..];
    let (before_hash, fragment) = match tail.find('#') {
        Some(h) => (&tail[..h], &tail[h..]),
        None => (tail, ""),
    };
    let page = match before_hash.find('?') {
        None => Cow::Borrowed(tail),
        Some(q) => {
            let path = if q == 0 { "/" } else { &before_hash[..q] };
            if fragment.is_empty() {
                Cow::Borrowed(path)
            } else {
                Cow::Owned(format!("{path}{fragment}"))
            }
        }
    };
    if !page.contains('%') {
        return page;
    }
    match percent_encoding::percent_decode_str(&page).decode_utf8_lossy() {
        Cow::Borrowed(_) => page,
        Cow::Owned(decoded) => Cow::Owned(decoded),
    }
}

/// The first non-empty value of query parameter `name` of a normalised URL, decoded. Only the
/// query counts, not a `?` in the fragment (a hash route's), as in Plausible.
fn utm(url: &str, name: &str) -> Option<String> {
    // One scan for the common URL without a query; a `?` after a `#` is the fragment's.
    let (before, after) = url.split_once('?')?;
    if before.contains('#') {
        return None;
    }
    let query = after.split_once('#').map_or(after, |(q, _)| q);
    if !query.contains(name) {
        return None;
    }
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, v)| k == name && !v.trim().is_empty())
        .map(|(_, v)| v.trim().to_string())
}

/// The host of a referrer as the `referrer` dimension counts it: lower case, without `www.`;
/// empty (a direct visit) when there is no referrer, it is not a URL with a host, or it is the
/// page's own site.
pub fn referrer_host(page_url: &str, referrer: Option<&str>) -> String {
    let site = referrer_site(referrer);
    unless_same_site(page_url, &site).to_string()
}

/// [`referrer_host`] before the same-site check: the referrer's host without `www.`, empty
/// when there is none. Depends on the referrer alone, so callers may cache it per referrer.
pub fn referrer_site(referrer: Option<&str>) -> String {
    let Some(r) = referrer.map(str::trim).filter(|r| !r.is_empty()) else {
        return String::new();
    };
    let Ok(parsed) = url::Url::parse(r) else {
        return String::new();
    };
    match parsed.host_str() {
        Some(host) if !host.contains(SOURCE_KEY_MARK) => strip_www(host).to_string(),
        _ => String::new(),
    }
}

/// `site` ([`referrer_site`]) as the referrer host of a view of `page_url`: empty when it is
/// the page's own site.
pub fn unless_same_site<'a>(page_url: &str, site: &'a str) -> &'a str {
    if crate::url::host_of(page_url).map(strip_www) == Some(site) {
        ""
    } else {
        site
    }
}

fn strip_www(h: &str) -> &str {
    h.strip_prefix("www.").unwrap_or(h)
}

/// The key both layers count a view's source under: `\u{1}{referrer host}\u{1}{url}`. It never
/// equals a URL (URLs start with a scheme), so it can share a dictionary with them.
pub fn source_key(referrer_host: &str, url: &str) -> String {
    let mut k = String::with_capacity(referrer_host.len() + url.len() + 2);
    write_source_key(&mut k, referrer_host, url);
    k
}

/// [`source_key`] into `out` (cleared first), for callers that reuse one buffer.
pub fn write_source_key(out: &mut String, referrer_host: &str, url: &str) {
    out.clear();
    out.push(SOURCE_KEY_MARK);
    out.push_str(referrer_host);
    out.push(SOURCE_KEY_MARK);
    out.push_str(url);
}

/// The UTM parameters of the campaign dimensions, in the order a [`write_campaign_key`] lists them.
const UTM_PARAMS: [&str; 3] = ["utm_source", "utm_medium", "utm_campaign"];

/// Whether a dimension's value is a function of a view's campaign — its referrer host, its
/// URL's site and UTM parameters — so that it is the same for a [`source_key`] and its
/// [`write_campaign_key`]. Only `page` and `url` read more of the URL.
pub fn is_campaign_dimension(d: Dimension) -> bool {
    !matches!(d, Dimension::Page | Dimension::Url)
}

/// [`source_key`] of a view's campaign into `out` (cleared first): the referrer host with the
/// URL reduced to its origin, `/` and the UTM parameters it has (decoded values, encoded
/// again). Every dimension [`is_campaign_dimension`] has the same value for a source key and
/// its campaign key, so a site's views grouped by campaign key — a few entries per referrer,
/// not one per page — give every such breakdown exactly.
pub fn write_campaign_key(out: &mut String, referrer_host: &str, url: &str) {
    let origin_end = url.split_once("://").map_or(url.len(), |(scheme, rest)| {
        scheme.len() + 3 + rest.find(['/', '?', '#']).unwrap_or(rest.len())
    });
    out.clear();
    out.push(SOURCE_KEY_MARK);
    out.push_str(referrer_host);
    out.push(SOURCE_KEY_MARK);
    out.push_str(&url[..origin_end]);
    out.push('/');
    let values = UTM_PARAMS.map(|name| utm(url, name));
    if values.iter().any(Option::is_some) {
        out.push('?');
        let start = out.len();
        let mut query = url::form_urlencoded::Serializer::for_suffix(&mut *out, start);
        for (name, v) in UTM_PARAMS.iter().zip(&values) {
            if let Some(v) = v {
                query.append_pair(name, v);
            }
        }
        query.finish();
    }
}

/// Whether `key` is a [`source_key`] (and not a URL).
pub fn is_source_key(key: &str) -> bool {
    key.starts_with(SOURCE_KEY_MARK)
}

/// `(referrer host, url)` of a [`source_key`].
pub fn parse_source_key(key: &str) -> Option<(&str, &str)> {
    key.strip_prefix(SOURCE_KEY_MARK)?
        .split_once(SOURCE_KEY_MARK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_drop_the_query_and_keep_a_hash_route() {
        assert_eq!(page_of("https://x.test/a/b?c=1"), "/a/b");
        // The path begins after the first "://", whatever colons come before or after it.
        assert_eq!(page_of("https://x.test/a:b//c"), "/a:b//c");
        assert_eq!(page_of("x:y://h.test/p"), "/p");
        assert_eq!(page_of("mailto:a@b.test"), "mailto:a@b.test");
        assert_eq!(page_of("https://x.test/"), "/");
        assert_eq!(page_of("https://x.test/app#/settings"), "/app#/settings");
        assert_eq!(page_of("https://x.test/app#/s?x=1"), "/app#/s?x=1");
        assert_eq!(page_of("https://x.test/app?u=1#/s"), "/app#/s");
        assert_eq!(page_of("https://x.test/caf%C3%A9?x=%20"), "/café");
        assert_eq!(page_of("https://x.test/a%20b#/r%C3%A9f"), "/a b#/réf");
        assert_eq!(page_of("https://x.test/bad%FF"), "/bad\u{FFFD}");
    }

    #[test]
    fn referrers_are_hosts_without_www_and_the_own_site_is_direct() {
        let page = "https://www.shop.test/a";
        assert_eq!(referrer_host(page, None), "");
        assert_eq!(referrer_host(page, Some("")), "");
        assert_eq!(referrer_host(page, Some("not a url")), "");
        assert_eq!(referrer_host(page, Some("https://shop.test/b")), "");
        assert_eq!(referrer_host(page, Some("https://www.shop.test/b")), "");
        assert_eq!(
            referrer_host(page, Some("https://WWW.Google.com/search?q=1")),
            "google.com"
        );
        assert_eq!(
            referrer_host(page, Some("android-app://com.slack/")),
            "com.slack"
        );
    }

    /// `input()` names everything `value()` reads: callers compute a value once per input.
    #[test]
    fn a_value_depends_only_on_its_input() {
        let urls = [
            "https://x.test/a?utm_source=news&utm_medium=mail&utm_campaign=c1",
            "https://x.test/a",
            "https://x.test/b?q=1#/route",
            "https://y.test/",
        ];
        let referrers = ["", "google.com", "news.test", "x.test"];
        for d in Dimension::ALL {
            for u in urls {
                for r in referrers {
                    let v = d.value(u, r);
                    match d.input() {
                        Input::Url => assert_eq!(v, d.value(u, ""), "{d:?} {u} {r}"),
                        Input::Referrer => assert_eq!(v, d.value(urls[1], r), "{d:?} {u} {r}"),
                        Input::Both => {}
                    }
                }
            }
        }
        assert_eq!(Input::Url.and(Input::Url), Input::Url);
        assert_eq!(Input::Url.and(Input::Referrer), Input::Both);
    }

    #[test]
    fn sources_prefer_utm_source_then_the_referrer() {
        let u = "https://x.test/p?utm_source=news%20letter&utm_medium=email&utm_campaign=";
        assert_eq!(Dimension::Source.value(u, "google.com"), "news letter");
        assert_eq!(Dimension::UtmMedium.value(u, ""), "email");
        assert_eq!(Dimension::UtmCampaign.value(u, ""), NONE);
        assert_eq!(Dimension::Page.value(u, ""), "/p");
        let plain = "https://x.test/p";
        assert_eq!(Dimension::Source.value(plain, "google.com"), "google.com");
        assert_eq!(Dimension::Source.value(plain, ""), DIRECT);
        assert_eq!(Dimension::Referrer.value(plain, ""), DIRECT);
        assert_eq!(Dimension::UtmSource.value(plain, "google.com"), NONE);
        // A `?` in a hash route's fragment is not the URL's query (Plausible reads the query).
        let route = "https://x.test/app#/p?utm_source=news";
        assert_eq!(Dimension::UtmSource.value(route, ""), NONE);
        assert_eq!(Dimension::Source.value(route, "google.com"), "google.com");
        let both = "https://x.test/app?utm_source=ads#/p?utm_source=news";
        assert_eq!(Dimension::UtmSource.value(both, ""), "ads");
    }

    #[test]
    fn a_campaign_key_has_the_campaign_dimensions_of_its_source_key() {
        let urls = [
            "https://x.test/a/b?c=1",
            "https://x.test",
            "https://x.test:8443/p#/hash?utm_source=no",
            "https://x.test/p?utm_source=%20News%20Letter%20&utm_medium=e%26mail&x=1",
            "https://x.test/p?utm_source=&utm_source=second&utm_campaign=%C3%A9t%C3%A9#/r",
            "https://x.test/?utm_campaign=a+b&utm_medium=cpc",
        ];
        let mut k = String::new();
        for url in urls {
            for referrer in ["", "google.com"] {
                write_campaign_key(&mut k, referrer, url);
                let (r, u) = parse_source_key(&k).expect("a source key");
                assert_eq!(r, referrer);
                assert_eq!(crate::url::host_of(u), crate::url::host_of(url), "{u}");
                for d in Dimension::ALL
                    .into_iter()
                    .filter(|d| is_campaign_dimension(*d))
                {
                    assert_eq!(
                        d.value(u, r),
                        d.value(url, referrer),
                        "{d:?} of {url} as {u}"
                    );
                }
            }
        }
        write_campaign_key(&mut k, "", "https://x.test/a?b=1");
        assert_eq!(parse_source_key(&k), Some(("", "https://x.test/")));
    }

    #[test]
    fn source_keys_round_trip_and_are_never_urls() {
        let k = source_key("google.com", "https://x.test/a?b=1");
        assert!(is_source_key(&k));
        assert!(!is_source_key("https://x.test/a"));
        assert_eq!(
            parse_source_key(&k),
            Some(("google.com", "https://x.test/a?b=1"))
        );
        assert_eq!(
            parse_source_key(&source_key("", "https://x.test/")),
            Some(("", "https://x.test/"))
        );
        for d in Dimension::ALL {
            assert_eq!(Dimension::parse(d.name()), Some(d));
        }
    }
}
