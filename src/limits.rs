//! Abuse controls: per-client rate limits (GCRA, via governor) in three classes, the
//! `Origin` allow-list for Socket.IO and WebSockets, and which requests each applies to.
//! The settings they read are parsed in `config::limits`.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use http::HeaderMap;

use crate::config::Rate;

fn limiter(rate: Rate) -> DefaultKeyedRateLimiter<IpAddr> {
    let per_cell = rate.period / rate.count.get();
    let quota = Quota::with_period(per_cell.max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(rate.count))
        .allow_burst(rate.count);
    DefaultKeyedRateLimiter::keyed(quota)
}

/// Which rate limit a request counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitClass {
    Http,
    WebSocket,
    EngineIoHandshake,
}

impl LimitClass {
    pub const ALL: [LimitClass; 3] = [
        LimitClass::Http,
        LimitClass::WebSocket,
        LimitClass::EngineIoHandshake,
    ];

    pub fn label(self) -> &'static str {
        match self {
            LimitClass::Http => "http",
            LimitClass::WebSocket => "websocket",
            LimitClass::EngineIoHandshake => "engineio_handshake",
        }
    }
}

/// The key a client's requests are counted under: an IPv4 address itself (an
/// IPv4-mapped IPv6 address counts as the IPv4 address it maps), an IPv6 address by its
/// first `ipv6_prefix` bits. One subscriber, home or cloud VM, is usually handed a whole
/// /64 (RFC 6177, RFC 8273), and picking a fresh address in it costs nothing, so keying by
/// the full address would hand out a new budget per request.
pub fn rate_key(client: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match client {
        IpAddr::V4(_) => client,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let keep = u32::from(ipv6_prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - keep).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        },
    }
}

/// The configured limiters; a class without a rate is not limited.
#[derive(Default)]
pub struct RateLimits {
    http: Option<DefaultKeyedRateLimiter<IpAddr>>,
    websocket: Option<DefaultKeyedRateLimiter<IpAddr>>,
    engineio: Option<DefaultKeyedRateLimiter<IpAddr>>,
    ipv6_prefix: u8,
}

impl RateLimits {
    pub fn new(
        http: Option<Rate>,
        websocket: Option<Rate>,
        engineio: Option<Rate>,
        ipv6_prefix: u8,
    ) -> Self {
        RateLimits {
            http: http.map(limiter),
            websocket: websocket.map(limiter),
            engineio: engineio.map(limiter),
            ipv6_prefix,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.http.is_some() || self.websocket.is_some() || self.engineio.is_some()
    }

    /// `Err(wait)` when `client` (counted under its [`rate_key`]) is over its rate for
    /// `class`.
    pub fn check(&self, class: LimitClass, client: IpAddr) -> Result<(), Duration> {
        let limiter = match class {
            LimitClass::Http => &self.http,
            LimitClass::WebSocket => &self.websocket,
            LimitClass::EngineIoHandshake => &self.engineio,
        };
        match limiter {
            None => Ok(()),
            Some(limiter) => limiter
                .check_key(&rate_key(client, self.ipv6_prefix))
                .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now())),
        }
    }

    /// Forgets clients whose limits have fully replenished, so the table stays as small as
    /// the set of recently active clients.
    pub fn forget_idle_clients(&self) {
        for limiter in [&self.http, &self.websocket, &self.engineio]
            .into_iter()
            .flatten()
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// Which limit a request counts against; `None` for what is exempt: probes, static assets
/// (one page load is dozens of them) and Engine.IO requests of an established session.
pub fn limit_class(
    path: &str,
    query: Option<&str>,
    upgrade: bool,
    engineio: bool,
    probe: bool,
) -> Option<LimitClass> {
    if probe {
        return None;
    }
    if upgrade {
        return Some(LimitClass::WebSocket);
    }
    if engineio {
        // An empty `sid=` is no session: python-engineio starts a new one for it.
        let in_session = query.is_some_and(|q| {
            q.split('&')
                .any(|kv| kv.strip_prefix("sid=").is_some_and(|v| !v.is_empty()))
        });
        return (!in_session).then_some(LimitClass::EngineIoHandshake);
    }
    if is_static_asset(path) {
        return None;
    }
    Some(LimitClass::Http)
}

/// Chainlit's static routes, and anything that looks like a file.
pub fn is_static_asset(path: &str) -> bool {
    const PREFIXES: [&str; 3] = ["/assets/", "/public/", "/avatars/"];
    if PREFIXES.iter().any(|p| path.starts_with(p)) || matches!(path, "/favicon" | "/logo") {
        return true;
    }
    let file = path.rsplit('/').next().unwrap_or("");
    matches!(
        file.rsplit_once('.').map(|(_, ext)| ext),
        Some(
            "js" | "css"
                | "map"
                | "png"
                | "jpg"
                | "jpeg"
                | "gif"
                | "svg"
                | "ico"
                | "webp"
                | "woff"
                | "woff2"
                | "ttf"
        )
    )
}

/// Whether a request's `Origin` is allowed: always when no list is configured or the request
/// has no `Origin` (not a browser); otherwise only an exact (case-insensitive) match.
pub fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    if allowed.is_empty() {
        return true;
    }
    match headers.get(http::header::ORIGIN).map(|o| o.to_str()) {
        None => true,
        Some(Ok(origin)) => {
            let origin = origin.trim().trim_end_matches('/');
            allowed.iter().any(|a| a.eq_ignore_ascii_case(origin))
        }
        Some(Err(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_origin, parse_rate};

    #[test]
    fn limits_allow_a_burst_then_refuse_with_a_wait() {
        let limits = RateLimits::new(parse_rate("3/minute").unwrap(), None, None, 64);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert!(limits.check(LimitClass::Http, a).is_ok());
        }
        let wait = limits.check(LimitClass::Http, a).unwrap_err();
        assert!(
            wait > Duration::from_secs(1) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert!(
            limits.check(LimitClass::Http, b).is_ok(),
            "clients are limited separately"
        );
        assert!(
            limits.check(LimitClass::WebSocket, a).is_ok(),
            "an unset class is not limited"
        );
    }

    #[test]
    fn ipv6_clients_are_keyed_by_prefix_and_ipv4_by_address() {
        let key = |a: &str, prefix| rate_key(a.parse().unwrap(), prefix).to_string();
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 64), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:ffff::1", 48), "2001:db8:1::");
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 128), "2001:db8:1:2:3:4:5:6");
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 32), "2001:db8::");
        assert_eq!(key("::1", 64), "::");
        assert_eq!(key("192.0.2.7", 64), "192.0.2.7");
        assert_eq!(
            key("::ffff:192.0.2.7", 64),
            "192.0.2.7",
            "mapped counts as IPv4"
        );
        assert_eq!(key("::ffff:192.0.2.7", 32), "192.0.2.7");
    }

    #[test]
    fn addresses_in_one_ipv6_prefix_share_a_budget() {
        let limits = RateLimits::new(parse_rate("2/minute").unwrap(), None, None, 64);
        let ip = |a: &str| a.parse::<IpAddr>().unwrap();
        assert!(
            limits
                .check(LimitClass::Http, ip("2001:db8:0:1::1"))
                .is_ok()
        );
        assert!(
            limits
                .check(LimitClass::Http, ip("2001:db8:0:1::2"))
                .is_ok()
        );
        assert!(
            limits
                .check(LimitClass::Http, ip("2001:db8:0:1:abcd::3"))
                .is_err(),
            "a third address in the same /64 is over the budget"
        );
        assert!(
            limits
                .check(LimitClass::Http, ip("2001:db8:0:2::1"))
                .is_ok()
        );
        assert!(limits.check(LimitClass::Http, ip("192.0.2.1")).is_ok());
        assert!(
            limits
                .check(LimitClass::Http, ip("::ffff:192.0.2.1"))
                .is_ok()
        );
        assert!(
            limits.check(LimitClass::Http, ip("192.0.2.1")).is_err(),
            "an IPv4-mapped address shares its IPv4 address's budget"
        );
        assert!(limits.check(LimitClass::Http, ip("192.0.2.2")).is_ok());
        let per_address = RateLimits::new(parse_rate("1/minute").unwrap(), None, None, 128);
        assert!(
            per_address
                .check(LimitClass::Http, ip("2001:db8::1"))
                .is_ok()
        );
        assert!(
            per_address
                .check(LimitClass::Http, ip("2001:db8::2"))
                .is_ok()
        );
    }

    #[test]
    fn assets_probes_and_session_polling_are_exempt() {
        assert_eq!(
            limit_class("/assets/index.js", None, false, false, false),
            None
        );
        assert_eq!(limit_class("/favicon", None, false, false, false), None);
        assert_eq!(
            limit_class("/monitor/health", None, false, false, true),
            None
        );
        assert_eq!(
            limit_class(
                "/ws/socket.io/",
                Some("EIO=4&transport=polling&sid=abc"),
                false,
                true,
                false
            ),
            None
        );
        assert_eq!(
            limit_class(
                "/ws/socket.io/",
                Some("EIO=4&transport=polling&t=x"),
                false,
                true,
                false
            ),
            Some(LimitClass::EngineIoHandshake)
        );
        assert_eq!(
            limit_class(
                "/ws/socket.io/",
                Some("EIO=4&transport=websocket&sid=a"),
                true,
                true,
                false
            ),
            Some(LimitClass::WebSocket)
        );
        assert_eq!(
            limit_class("/", None, false, false, false),
            Some(LimitClass::Http)
        );
        assert_eq!(
            limit_class("/project/settings", None, false, false, false),
            Some(LimitClass::Http)
        );
    }

    #[test]
    fn origins_are_matched_exactly() {
        let allowed = vec![parse_origin("https://Chat.example/").unwrap()];
        let mut h = HeaderMap::new();
        assert!(origin_allowed(&h, &allowed), "no Origin: not a browser");
        h.insert("origin", "https://chat.example".parse().unwrap());
        assert!(origin_allowed(&h, &allowed));
        h.insert(
            "origin",
            "https://chat.example.evil.example".parse().unwrap(),
        );
        assert!(!origin_allowed(&h, &allowed));
        h.insert("origin", "null".parse().unwrap());
        assert!(!origin_allowed(&h, &allowed));
        assert!(origin_allowed(&h, &[]), "no list: everything allowed");
    }
}
