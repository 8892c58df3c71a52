//! Abuse controls: per-client rate limits (GCRA, via governor) in three classes, the
//! `Origin` allow-list for Socket.IO and WebSockets, and which requests each applies to.
//! The settings they read are parsed in `config::limits`.

use std::net::IpAddr;
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

/// The configured limiters; a class without a rate is not limited.
#[derive(Default)]
pub struct RateLimits {
    http: Option<DefaultKeyedRateLimiter<IpAddr>>,
    websocket: Option<DefaultKeyedRateLimiter<IpAddr>>,
    engineio: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

impl RateLimits {
    pub fn new(http: Option<Rate>, websocket: Option<Rate>, engineio: Option<Rate>) -> Self {
        RateLimits {
            http: http.map(limiter),
            websocket: websocket.map(limiter),
            engineio: engineio.map(limiter),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.http.is_some() || self.websocket.is_some() || self.engineio.is_some()
    }

    /// `Err(wait)` when `client` is over its rate for `class`.
    pub fn check(&self, class: LimitClass, client: IpAddr) -> Result<(), Duration> {
        let limiter = match class {
            LimitClass::Http => &self.http,
            LimitClass::WebSocket => &self.websocket,
            LimitClass::EngineIoHandshake => &self.engineio,
        };
        match limiter {
            None => Ok(()),
            Some(limiter) => limiter
                .check_key(&client)
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
        let limits = RateLimits::new(parse_rate("3/minute").unwrap(), None, None);
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
