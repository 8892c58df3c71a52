//! Settings of the abuse controls and limits: body and connection limits, per-client rates,
//! the `Origin` allow-list, trusted proxies and cookie hardening.

use std::num::NonZeroU32;
use std::time::Duration;

use clap::Args;
use ipnet::IpNet;

use super::values::{Line, Problems, count, invalid, switch};

#[derive(Debug, Clone, Args)]
pub struct LimitsSettings {
    /// Largest request body in bytes (413 beyond it).
    #[arg(
        long,
        env = "CHATGATE_MAX_BODY_BYTES",
        default_value = "2147483648",
        global = true
    )]
    pub max_body_bytes: String,
    /// Most client connections at once; beyond it new ones get a fast 503 and are closed.
    #[arg(
        long,
        env = "CHATGATE_MAX_CONNECTIONS",
        default_value = "10000",
        global = true
    )]
    pub max_connections: String,
    /// Per-client rate of ordinary HTTP requests, e.g. 600/minute (off when empty).
    #[arg(
        long,
        env = "CHATGATE_RATE_LIMIT_HTTP",
        default_value = "",
        global = true
    )]
    pub rate_limit_http: String,
    /// Per-client rate of WebSocket upgrades, e.g. 10/minute (off when empty).
    #[arg(
        long,
        env = "CHATGATE_RATE_LIMIT_WEBSOCKET",
        default_value = "",
        global = true
    )]
    pub rate_limit_websocket: String,
    /// Per-client rate of new Engine.IO sessions (polling handshakes), e.g. 10/minute.
    #[arg(
        long,
        env = "CHATGATE_RATE_LIMIT_ENGINEIO",
        default_value = "",
        global = true
    )]
    pub rate_limit_engineio: String,
    /// Bits of an IPv6 client address that identify one client for the rate limits
    /// (32..128; IPv4 clients are always counted per address).
    #[arg(
        long,
        env = "CHATGATE_RATE_LIMIT_IPV6_PREFIX",
        default_value = "64",
        global = true
    )]
    pub rate_limit_ipv6_prefix: String,
    /// Comma-separated origins allowed to open Socket.IO sessions and WebSockets
    /// (e.g. https://chat.example); empty allows any.
    #[arg(
        long,
        env = "CHATGATE_ALLOWED_ORIGINS",
        default_value = "",
        global = true
    )]
    pub allowed_origins: String,
    /// Comma-separated CIDRs whose X-Forwarded-* headers are trusted.
    #[arg(
        long,
        env = "CHATGATE_TRUSTED_PROXIES",
        default_value = "",
        global = true
    )]
    pub trusted_proxies: String,
    /// on: add Secure, HttpOnly and SameSite=Lax to the backend's cookies where missing.
    #[arg(
        long,
        env = "CHATGATE_HARDEN_COOKIES",
        default_value = "off",
        global = true
    )]
    pub harden_cookies: String,
}

/// A rate as written in the settings: `N/second`, `N/minute` or `N/hour` (also `s`, `m`,
/// `h`, `sec`, `min`): at most N requests per period per client, in bursts of up to N.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: NonZeroU32,
    pub period: Duration,
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub max_body_bytes: u64,
    pub max_connections: usize,
    pub rate_http: Option<Rate>,
    pub rate_websocket: Option<Rate>,
    pub rate_engineio: Option<Rate>,
    /// IPv6 clients are rate-limited per prefix of this many bits.
    pub rate_ipv6_prefix: u8,
    /// Normalised `scheme://host[:port]`, lower case; empty allows any origin.
    pub allowed_origins: Vec<String>,
    pub trusted_proxies: Vec<IpNet>,
    pub harden_cookies: bool,
}

impl LimitsConfig {
    pub(super) fn validate(s: &LimitsSettings, p: &mut Problems) -> Option<LimitsConfig> {
        let max_body_bytes = p.check(s.max_body_bytes.trim().parse::<u64>().map_err(|_| {
            invalid(
                "max-body-bytes",
                &s.max_body_bytes,
                "expected a number of bytes",
            )
        }));
        let max_connections = p.check(count("max-connections", &s.max_connections, 1, 10_000_000));
        let rate = |flag: &str, value: &str| parse_rate(value).map_err(|e| invalid(flag, value, e));
        let rate_http = p.check(rate("rate-limit-http", &s.rate_limit_http));
        let rate_websocket = p.check(rate("rate-limit-websocket", &s.rate_limit_websocket));
        let rate_engineio = p.check(rate("rate-limit-engineio", &s.rate_limit_engineio));
        let rate_ipv6_prefix = p.check(
            count("rate-limit-ipv6-prefix", &s.rate_limit_ipv6_prefix, 32, 128)
                .map(|bits| u8::try_from(bits).unwrap_or(128)),
        );
        let allowed_origins = p.check(
            s.allowed_origins
                .split(',')
                .filter(|o| !o.trim().is_empty())
                .map(|o| {
                    parse_origin(o).map_err(|e| invalid("allowed-origins", &s.allowed_origins, e))
                })
                .collect::<Result<Vec<_>, _>>(),
        );
        let trusted_proxies = p.check(parse_trusted_proxies(&s.trusted_proxies));
        let harden_cookies = p.check(switch("harden-cookies", &s.harden_cookies));
        Some(LimitsConfig {
            max_body_bytes: max_body_bytes?,
            max_connections: max_connections?,
            rate_http: rate_http?,
            rate_websocket: rate_websocket?,
            rate_engineio: rate_engineio?,
            rate_ipv6_prefix: rate_ipv6_prefix?,
            allowed_origins: allowed_origins?,
            trusted_proxies: trusted_proxies?,
            harden_cookies: harden_cookies?,
        })
    }

    pub(super) fn describe(&self, lines: &mut Vec<Line>) {
        let proxies: Vec<String> = self
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        lines.extend([
            ("max_body_bytes", self.max_body_bytes.to_string()),
            ("max_connections", self.max_connections.to_string()),
            ("rate_limit_http", describe_rate(self.rate_http)),
            ("rate_limit_websocket", describe_rate(self.rate_websocket)),
            ("rate_limit_engineio", describe_rate(self.rate_engineio)),
            ("rate_limit_ipv6_prefix", self.rate_ipv6_prefix.to_string()),
            ("allowed_origins", self.allowed_origins.join(",")),
            ("trusted_proxies", proxies.join(",")),
            (
                "harden_cookies",
                if self.harden_cookies { "on" } else { "off" }.to_owned(),
            ),
        ]);
    }
}

fn describe_rate(rate: Option<Rate>) -> String {
    rate.map_or("off".to_owned(), |r| {
        format!("{}/{}s", r.count, r.period.as_secs())
    })
}

/// Parses a [`Rate`]; `None` for an empty or `off` value.
pub fn parse_rate(value: &str) -> Result<Option<Rate>, String> {
    let value = value.trim();
    if value.is_empty() || value.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let (count, unit) = value
        .split_once('/')
        .ok_or_else(|| "expected N/second, N/minute or N/hour, e.g. 10/minute".to_owned())?;
    let count: u32 = count
        .trim()
        .parse()
        .map_err(|_| format!("{count:?} is not a whole number"))?;
    let count = NonZeroU32::new(count).ok_or_else(|| "the count must be at least 1".to_owned())?;
    let period = match unit.trim().to_ascii_lowercase().as_str() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        other => {
            return Err(format!(
                "unknown period {other:?}: use second, minute or hour"
            ));
        }
    };
    Ok(Some(Rate { count, period }))
}

/// Normalises an allow-list entry: `scheme://host[:port]`, no path, no trailing slash.
pub fn parse_origin(entry: &str) -> Result<String, String> {
    let entry = entry.trim().trim_end_matches('/');
    let uri: http::Uri = entry
        .parse()
        .map_err(|_| format!("{entry:?} is not an origin"))?;
    match (uri.scheme_str(), uri.authority(), uri.path()) {
        (Some("http" | "https"), Some(_), "" | "/") if uri.query().is_none() => {
            Ok(entry.to_ascii_lowercase())
        }
        _ => Err(format!(
            "{entry:?} is not an origin like https://chat.example"
        )),
    }
}

/// Parses a comma-separated CIDR list; a bare address counts as a single-host network.
pub fn parse_trusted_proxies(value: &str) -> Result<Vec<IpNet>, super::ConfigError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| invalid("trusted-proxies", value, format!("{item:?} is not a CIDR")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_the_seeds_style() {
        let r = parse_rate("10/minute").unwrap().unwrap();
        assert_eq!((r.count.get(), r.period), (10, Duration::from_secs(60)));
        assert_eq!(
            parse_rate(" 5 / s ").unwrap().unwrap().period,
            Duration::from_secs(1)
        );
        assert_eq!(
            parse_rate("100/hour").unwrap().unwrap().period,
            Duration::from_secs(3600)
        );
        assert_eq!(parse_rate("").unwrap(), None);
        assert_eq!(parse_rate("off").unwrap(), None);
        for bad in ["10", "0/minute", "x/minute", "10/fortnight"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trusted_proxies_take_cidrs_and_bare_addresses() {
        let nets = parse_trusted_proxies(" 10.0.0.0/8, 127.0.0.1 ,::1,").unwrap();
        assert_eq!(nets.len(), 3);
        assert!(nets[1].contains(&"127.0.0.1".parse::<std::net::IpAddr>().unwrap()));
        assert!(parse_trusted_proxies("").unwrap().is_empty());
    }

    #[test]
    fn the_ipv6_prefix_defaults_to_64_and_stays_in_range() {
        let limits = |env: &[(&str, &str)]| {
            let cli = crate::config::Cli::parse_with(["chatgate"], |k| {
                env.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            })
            .unwrap();
            crate::config::Config::from_settings(&cli.settings)
                .map(|c| c.limits.rate_ipv6_prefix)
                .map_err(|e| e.to_string())
        };
        assert_eq!(limits(&[]), Ok(64));
        assert_eq!(limits(&[("CHATGATE_RATE_LIMIT_IPV6_PREFIX", "48")]), Ok(48));
        assert_eq!(
            limits(&[("CHATGATE_RATE_LIMIT_IPV6_PREFIX", "128")]),
            Ok(128)
        );
        for bad in ["31", "129", "/64", ""] {
            let e = limits(&[("CHATGATE_RATE_LIMIT_IPV6_PREFIX", bad)]).unwrap_err();
            assert!(e.contains("rate-limit-ipv6-prefix"), "{bad}: {e}");
        }
    }

    #[test]
    fn origins_normalise_and_refuse_paths() {
        assert_eq!(
            parse_origin("https://Chat.example/").unwrap(),
            "https://chat.example"
        );
        assert!(parse_origin("chat.example").is_err());
        assert!(parse_origin("https://chat.example/path").is_err());
    }
}
