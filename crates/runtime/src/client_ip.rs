//! Who is asking: the socket's peer, or, when the peer is one of
//! `UNHIDRA_TRUSTED_PROXIES`, the client its `X-Forwarded-For` (or
//! `Forwarded`) header names. A header from anyone else is ignored, so a
//! client cannot choose its own address to dodge limits and blocks.

use std::net::{IpAddr, Ipv6Addr};

use axum::{
    extract::FromRequestParts,
    http::{HeaderMap, request::Parts},
};
use ipnet::IpNet;

use crate::ApiError;

/// The client address of a request, set by the edge middleware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

impl ClientIp {
    /// Resolves the client behind `peer`.
    pub fn resolve(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> Self {
        let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
        let peer = canonical(peer);
        if !is_trusted(&peer) {
            return Self(peer);
        }
        let chain = forwarded_for(headers);
        // The nearest hop that is not one of our proxies is the client; a
        // chain of proxies only gives its far end.
        let client = chain
            .iter()
            .rev()
            .find(|ip| !is_trusted(ip))
            .or(chain.first())
            .copied()
            .unwrap_or(peer);
        Self(client)
    }

    /// The key limits and blocks count under: the address, or for IPv6 its
    /// /64 (one subscriber's network, which an attacker holds whole).
    pub fn key(&self) -> String {
        match self.0 {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => {
                let s = v6.segments();
                let net = Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("{net}/64")
            }
        }
    }
}

impl std::fmt::Display for ClientIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Self>().copied().ok_or_else(|| {
            ApiError::Unexpected(anyhow::anyhow!(
                "no client address: the edge middleware is not installed"
            ))
        })
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The addresses of `X-Forwarded-For`, else of `Forwarded`'s `for=`, from
/// the original client to the nearest proxy. Unparseable entries end the
/// chain there (everything before them is the client's own claim).
fn forwarded_for(headers: &HeaderMap) -> Vec<IpAddr> {
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_owned())
            .collect()
    };
    let xff = values("x-forwarded-for");
    let entries: Vec<String> = if xff.is_empty() {
        values("forwarded")
            .iter()
            .filter_map(|element| {
                element.split(';').find_map(|pair| {
                    let (key, value) = pair.trim().split_once('=')?;
                    key.eq_ignore_ascii_case("for")
                        .then(|| value.trim_matches('"').to_owned())
                })
            })
            .collect()
    } else {
        xff
    };
    let mut chain: Vec<IpAddr> = Vec::new();
    for entry in entries.iter().rev() {
        match parse_node(entry) {
            Some(ip) => chain.push(canonical(ip)),
            None => break,
        }
    }
    chain.reverse();
    chain
}

/// `203.0.113.7`, `203.0.113.7:4711`, `2001:db8::1` or `[2001:db8::1]:4711`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse() {
        return Some(ip);
    }
    if let Some(rest) = node.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    node.rsplit_once(':')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    #[test]
    fn forwarded_headers_count_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap_or_default()];
        let xff = headers(&[("x-forwarded-for", "198.51.100.9, 203.0.113.7, 10.0.0.2")]);
        // A stranger's header is ignored.
        assert_eq!(
            ClientIp::resolve(ip("192.0.2.1"), &xff, &trusted).0,
            ip("192.0.2.1")
        );
        // Through our proxies, the nearest untrusted hop is the client; what
        // it claims before itself is not believed.
        assert_eq!(
            ClientIp::resolve(ip("10.0.0.1"), &xff, &trusted).0,
            ip("203.0.113.7")
        );
        // No header: the proxy itself.
        assert_eq!(
            ClientIp::resolve(ip("10.0.0.1"), &HeaderMap::new(), &trusted).0,
            ip("10.0.0.1")
        );
        let forwarded = headers(&[(
            "forwarded",
            r#"for="[2001:db8::7]:4711";proto=https, for=10.0.0.3"#,
        )]);
        assert_eq!(
            ClientIp::resolve(ip("10.0.0.1"), &forwarded, &trusted).0,
            ip("2001:db8::7")
        );
        let garbage = headers(&[("x-forwarded-for", "203.0.113.7, not-an-ip")]);
        assert_eq!(
            ClientIp::resolve(ip("10.0.0.1"), &garbage, &trusted).0,
            ip("10.0.0.1")
        );
    }

    #[test]
    fn keys_group_ipv6_by_network() {
        assert_eq!(ClientIp(ip("203.0.113.7")).key(), "203.0.113.7");
        assert_eq!(
            ClientIp(ip("2001:db8:1:2:3:4:5:6")).key(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            ClientIp::resolve(ip("::ffff:203.0.113.7"), &HeaderMap::new(), &[]).key(),
            "203.0.113.7"
        );
    }
}
