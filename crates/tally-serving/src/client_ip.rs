//! Which address a request comes from, for Plausible-style visitor ids.
//!
//! The peer address of the connection is the client, unless the peer is one of the operator's
//! reverse proxies (`http.trusted_proxies`). Only then is `X-Forwarded-For` read, and from the
//! right: each proxy appends the address it received the request from, so the right-most entries
//! were written by trusted proxies and the first address from the right that is not a trusted
//! proxy is the client. Entries further left were written by the client itself and are never
//! believed — taking the left-most one would let any visitor mint new visitor ids at will.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The networks whose `X-Forwarded-For` is believed (default: none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses CIDRs (`10.0.0.0/8`, `fd00::/8`) and bare addresses (`127.0.0.1`, one host).
    /// The error names the entry that is neither.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<TrustedProxies, String> {
        entries
            .iter()
            .map(|e| {
                let e = e.as_ref().trim();
                e.parse::<IpNet>()
                    .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{e:?} is neither an IP address nor a CIDR network"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client address of a request that arrived from `peer` with `headers`.
    pub fn client_ip(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Option<IpAddr> {
        let peer = peer?.ip().to_canonical();
        if !self.trusts(peer) {
            return Some(peer);
        }
        // Every X-Forwarded-For header, in order, as one list; walk it from the right.
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            match parse_hop(hop) {
                Some(ip) => {
                    client = ip;
                    if !self.trusts(ip) {
                        break;
                    }
                }
                // A malformed entry: what lies left of it cannot be trusted either.
                None => break,
            }
        }
        Some(client)
    }
}

/// An `X-Forwarded-For` entry: an address, optionally with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_hop(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    s.parse::<SocketAddr>().ok().map(|a| a.ip().to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn xff(values: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_static(v));
        }
        h
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    fn peer(s: &str) -> Option<SocketAddr> {
        Some(SocketAddr::new(s.parse().unwrap(), 40000))
    }

    #[test]
    fn without_trusted_proxies_the_header_is_ignored() {
        let none = TrustedProxies::default();
        let h = xff(&["198.51.100.1"]);
        assert_eq!(none.client_ip(&h, peer("203.0.113.9")), ip("203.0.113.9"));
        assert_eq!(none.client_ip(&h, peer("127.0.0.1")), ip("127.0.0.1"));
        assert_eq!(none.client_ip(&h, None), None);
    }

    #[test]
    fn behind_a_trusted_proxy_the_right_most_untrusted_address_is_the_client() {
        let t = TrustedProxies::parse(&["10.0.0.0/8", "127.0.0.1", "fd00::/8"]).unwrap();
        // nginx `$proxy_add_x_forwarded_for`: the client's own header, then the real address.
        let spoofed = xff(&["1.1.1.1, 2.2.2.2", "198.51.100.7"]);
        assert_eq!(t.client_ip(&spoofed, peer("10.1.2.3")), ip("198.51.100.7"));
        // Two proxies: the CDN edge appended the client, our balancer appended the edge.
        let two = xff(&["6.6.6.6, 198.51.100.7, 10.9.9.9"]);
        assert_eq!(t.client_ip(&two, peer("127.0.0.1")), ip("198.51.100.7"));
        // A peer that is not trusted: its header is the client's word, not ours.
        assert_eq!(t.client_ip(&two, peer("203.0.113.1")), ip("203.0.113.1"));
        // No header (a health check from the proxy itself): the proxy's address.
        assert_eq!(
            t.client_ip(&HeaderMap::new(), peer("10.0.0.1")),
            ip("10.0.0.1")
        );
        // Malformed right-most entry: nothing left of it is believed.
        let bad = xff(&["198.51.100.7, garbage"]);
        assert_eq!(t.client_ip(&bad, peer("10.0.0.1")), ip("10.0.0.1"));
        // Ports and IPv4-mapped IPv6 peers.
        let ported = xff(&["[2001:db8::1]:443"]);
        assert_eq!(
            t.client_ip(&ported, peer("::ffff:10.0.0.2")),
            ip("2001:db8::1")
        );
        let v4port = xff(&["198.51.100.8:5555"]);
        assert_eq!(t.client_ip(&v4port, peer("fd00::1")), ip("198.51.100.8"));
    }

    #[test]
    fn every_hop_trusted_gives_the_left_most() {
        let t = TrustedProxies::parse(&["10.0.0.0/8"]).unwrap();
        let h = xff(&["10.0.0.5, 10.0.0.6"]);
        assert_eq!(t.client_ip(&h, peer("10.0.0.1")), ip("10.0.0.5"));
    }

    #[test]
    fn parse_names_the_bad_entry() {
        let err = TrustedProxies::parse(&["10.0.0.0/8", "localhost"]).unwrap_err();
        assert!(err.contains("\"localhost\""), "{err}");
        assert!(TrustedProxies::parse(&["10.0.0.0/33"]).is_err());
        assert!(TrustedProxies::parse::<&str>(&[]).unwrap().is_empty());
    }
}
