//! Property tests over the pure functions that take client (or operator) input: the route
//! table, the `/chat` redirect builder, the Socket.IO mapping, header rewriting, config
//! validation and the asset cache's negotiation and policy. These are the issue's fuzz
//! targets: cargo-fuzz needs nightly, proptest runs on stable in `cargo test`. Case counts
//! are modest so the file runs in seconds.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use chatgate::asset_cache::negotiate::{self, Coding};
use chatgate::asset_cache::policy;
use chatgate::config::{Cli, Config, parse_backend, parse_trusted_proxies};
use chatgate::proxy::headers::{
    X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, client_addr, is_sane_request_id,
    parse_forwarded_ip, peer_value, set_forwarded, strip_hop_by_hop,
};
use chatgate::routes::{Route, chat_redirect_location, classify, socketio_backend_path};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

/// A run of `cases` cases that writes no regression files into the tree.
fn cases(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Strings biased towards what breaks URL handling: slashes, backslashes, dots, percent
/// signs, colons, whitespace and controls, plus any Unicode at all.
fn hostile_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => prop::sample::select(vec![
            "/", "//", "\\", ".", "..", "%", "%2F", "%2f", "%5C", "%09", "%0a", ":", "@", "?",
            "#", " ", "\t", "\n", "\r", "\u{0}", "\u{7f}", "\u{3000}", "\u{ff0f}", "https:",
            "javascript:", "evil.example", "chat", "auth", "config", "socket.io",
        ])
        .prop_map(str::to_owned),
        1 => any::<String>(),
        2 => "[a-zA-Z0-9._~-]{1,6}",
    ];
    prop::collection::vec(piece, 0..12).prop_map(|parts| parts.concat())
}

/// What a browser does to a `Location` before resolving it against the page (WHATWG URL):
/// strips leading C0 controls and spaces, removes tab/CR/LF anywhere, reads `\` as `/`.
fn browser_cleanup(location: &str) -> String {
    let cleaned: String = location
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .map(|c| if c == '\\' { '/' } else { c })
        .collect();
    cleaned.trim_start_matches(|c: char| c <= ' ').to_owned()
}

/// Whether a (cleaned) reference starts with a URL scheme: `ALPHA *( ALPHA / DIGIT / "+" /
/// "-" / "." ) ":"` before any `/`, `?` or `#` (RFC 3986 §3.1, §4.2).
fn has_scheme(reference: &str) -> bool {
    let end = reference.find(['/', '?', '#']).unwrap_or(reference.len());
    match reference[..end].split_once(':') {
        Some((scheme, _)) => {
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        }
        None => false,
    }
}

/// Any IPv4 or IPv6 address, IPv4-mapped IPv6 included.
fn any_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
        any::<[u8; 16]>().prop_map(|o| IpAddr::V6(Ipv6Addr::from(o))),
        any::<[u8; 4]>().prop_map(|o| IpAddr::V6(Ipv4Addr::from(o).to_ipv6_mapped())),
    ]
}

/// What `client_addr` and friends report for an address: IPv4-mapped IPv6 as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Any bytes a header value may hold (visible ASCII, space, tab, obs-text), as a value.
fn any_header_value() -> impl Strategy<Value = HeaderValue> {
    let byte = prop_oneof![
        8 => 0x20u8..0x7f,
        1 => Just(b'\t'),
        1 => 0x80u8..=0xff,
    ];
    prop::collection::vec(byte, 0..64)
        .prop_map(|bytes| HeaderValue::from_bytes(&bytes).expect("allowed bytes only"))
}

/// An `X-Forwarded-For` line: entries that are addresses, addresses with ports, bracketed
/// IPv6, or garbage, joined by commas with random spacing.
fn forwarded_for_line() -> impl Strategy<Value = HeaderValue> {
    let entry = prop_oneof![
        any_ip().prop_map(|ip| ip.to_string()),
        (any_ip(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port).to_string()),
        "[a-zA-Z0-9:._\\[\\] -]{0,20}",
    ];
    prop::collection::vec(entry, 0..8)
        .prop_map(|entries| entries.join(" ,"))
        .prop_filter_map("a header value", |line| HeaderValue::from_str(&line).ok())
}

const FIXED_HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-connection",
];

/// Header names from a small pool (so Connection options often name present headers), in
/// any letter case.
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "proxy-connection",
            "cookie",
            "x-secret",
            "x-other",
            "content-type",
            "host",
        ])
        .prop_map(str::to_owned),
        "[a-z][a-z0-9-]{0,8}",
    ]
    .prop_flat_map(|name| {
        prop::collection::vec(any::<bool>(), name.len()).prop_map(move |upper| {
            name.chars()
                .zip(upper)
                .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
                .collect()
        })
    })
}

/// A `Connection` value: header names separated by commas and optional whitespace, with an
/// occasional byte that is not ASCII (obs-text) somewhere in it.
fn connection_value() -> impl Strategy<Value = HeaderValue> {
    let token = prop_oneof![
        4 => header_name(),
        1 => Just("close".to_owned()),
        1 => Just("\u{e9}".to_owned()),
    ];
    (
        prop::collection::vec(token, 0..5),
        prop::sample::select(vec![",", ", ", " , ", ",\t"]),
    )
        .prop_map(|(tokens, sep)| {
            let text = tokens.join(sep);
            // Latin-1, as a server reading obs-text would see it: one byte per char.
            let bytes: Vec<u8> = text.chars().map(|c| c as u32 as u8).collect();
            HeaderValue::from_bytes(&bytes).expect("valid header bytes")
        })
}

/// The names a `Connection` value lists, as RFC 9110 §7.6.1 reads them: comma-separated
/// tokens with optional whitespace, case-insensitive, whatever else the value holds.
fn named_options(value: &HeaderValue) -> Vec<HeaderName> {
    value
        .as_bytes()
        .split(|b| *b == b',')
        .filter_map(|token| HeaderName::from_bytes(token.trim_ascii()).ok())
        .collect()
}

proptest! {
    #![proptest_config(cases(2000))]

    /// The route table is total and each route matches its definition exactly.
    #[test]
    fn classify_is_total_and_matches_the_table(path in hostile_text()) {
        let path = format!("/{path}");
        let expected = match path.as_str() {
            "/monitor/live" => Route::Live,
            "/monitor/health" => Route::Health,
            "/auth/config" => Route::AuthConfig,
            "/chat" => Route::ChatRedirect { rest: "" },
            "/socket.io" => Route::SocketIo { rest: "" },
            p if p.starts_with("/chat/") => Route::ChatRedirect { rest: &p[6..] },
            p if p.starts_with("/socket.io/") => Route::SocketIo { rest: &p[11..] },
            _ => Route::Backend,
        };
        prop_assert_eq!(classify(&path), expected);
    }

    /// For any rest and query, the Location is a valid header value that starts with
    /// exactly one `/`, and after a browser's cleanup it is still a same-site path.
    #[test]
    fn chat_redirect_location_never_leaves_the_site(
        rest in hostile_text(),
        query in prop::option::of(hostile_text()),
    ) {
        let location = chat_redirect_location(&rest, query.as_deref());
        prop_assert!(HeaderValue::from_str(&location).is_ok(), "not a header value: {:?}", location);
        prop_assert!(location.starts_with('/'), "{:?}", location);
        prop_assert!(!location[1..].starts_with(['/', '\\']), "{:?}", location);
        let cleaned = browser_cleanup(&location);
        prop_assert!(cleaned.starts_with('/') && !cleaned.starts_with("//"), "{:?} -> {:?}", location, cleaned);
        prop_assert!(!has_scheme(&cleaned), "{:?}", location);
        // Nothing a browser would drop or reinterpret is left raw.
        prop_assert!(location.bytes().all(|b| b.is_ascii_graphic() && b != b'\\'), "{:?}", location);
    }

    /// A harmless rest and query come through unchanged (leading slashes aside).
    #[test]
    fn chat_redirect_location_keeps_plain_paths(
        rest in "[a-zA-Z0-9._~%/-]{0,30}",
        query in prop::option::of("[a-zA-Z0-9._~%=&/-]{0,30}"),
    ) {
        let mut expected = format!("/{}", rest.trim_start_matches('/'));
        if let Some(q) = &query {
            expected.push('?');
            expected.push_str(q);
        }
        prop_assert_eq!(chat_redirect_location(&rest, query.as_deref()), expected);
    }

    /// The backend path for `/socket.io/<rest>` always starts with the mount, and never
    /// with a doubled slash after it.
    #[test]
    fn socketio_backend_path_starts_with_the_mount(
        mount in "/([a-zA-Z0-9._-]{1,8}/){0,3}",
        rest in hostile_text(),
    ) {
        let path = socketio_backend_path(&mount, &rest);
        prop_assert!(path.starts_with(&mount), "{:?} + {:?} -> {:?}", mount, rest, path);
        prop_assert!(!path[mount.len()..].starts_with('/'), "{:?}", path);
    }

    /// Any entry parses or not without panicking; an address, with or without a port or
    /// brackets and surrounded by spaces, parses to itself (IPv4-mapped as IPv4).
    #[test]
    fn parse_forwarded_ip_reads_every_address_form(
        garbage in any::<String>(),
        ip in any_ip(),
        port in any::<u16>(),
        pad in "[ \t]{0,3}",
    ) {
        let _ = parse_forwarded_ip(&garbage);
        let want = Some(canonical(ip));
        prop_assert_eq!(parse_forwarded_ip(&format!("{pad}{ip}{pad}")), want);
        prop_assert_eq!(parse_forwarded_ip(&SocketAddr::new(ip, port).to_string()), want);
        if let IpAddr::V6(v6) = ip {
            prop_assert_eq!(parse_forwarded_ip(&format!("[{v6}]")), want);
        }
    }

    /// `client_addr` never panics; an untrusted peer is always the client, whatever it
    /// claims; a trusted peer's answer is the peer or one of the claimed addresses.
    #[test]
    fn client_addr_believes_only_trusted_peers(
        peer in any_ip(),
        lines in prop::collection::vec(prop_oneof![forwarded_for_line(), any_header_value()], 0..4),
        trust_peer in any::<bool>(),
    ) {
        let mut headers = HeaderMap::new();
        for line in &lines {
            headers.append(X_FORWARDED_FOR.clone(), line.clone());
        }
        let untrusted: Vec<IpNet> = Vec::new();
        prop_assert_eq!(client_addr(peer, &headers, &untrusted), canonical(peer));
        if trust_peer {
            let everyone: Vec<IpNet> = vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
            let client = client_addr(peer, &headers, &everyone);
            let claimed: Vec<IpAddr> = lines
                .iter()
                .filter_map(|l| l.to_str().ok())
                .flat_map(|l| l.split(','))
                .filter_map(parse_forwarded_ip)
                .collect();
            prop_assert!(client == canonical(peer) || claimed.contains(&client), "{:?}", client);
        }
    }

    /// From an untrusted peer, `X-Forwarded-For` is exactly the peer, `-Proto` is `http` and
    /// `-Host` is the request's own Host, whatever the request claimed.
    #[test]
    fn set_forwarded_from_an_untrusted_peer_overwrites_every_claim(
        peer in any_ip(),
        xff in prop::collection::vec(any_header_value(), 0..3),
        proto in prop::collection::vec(any_header_value(), 0..3),
        forwarded_host in prop::collection::vec(any_header_value(), 0..3),
        host in prop::option::of(any_header_value()),
    ) {
        let mut headers = HeaderMap::new();
        for (name, values) in [(&X_FORWARDED_FOR, &xff), (&X_FORWARDED_PROTO, &proto), (&X_FORWARDED_HOST, &forwarded_host)] {
            for v in values {
                headers.append(name.clone(), v.clone());
            }
        }
        if let Some(h) = &host {
            headers.insert(header::HOST, h.clone());
        }
        set_forwarded(&mut headers, &peer_value(peer), false);
        let all = |name: &HeaderName| headers.get_all(name).iter().cloned().collect::<Vec<_>>();
        let peer_text = canonical(peer).to_string();
        prop_assert_eq!(all(&X_FORWARDED_FOR), vec![HeaderValue::from_str(&peer_text).unwrap()]);
        prop_assert_eq!(all(&X_FORWARDED_PROTO), vec![HeaderValue::from_static("http")]);
        prop_assert_eq!(all(&X_FORWARDED_HOST), host.into_iter().collect::<Vec<_>>());
    }

    /// From a trusted peer, whatever came before, `X-Forwarded-For` ends with the peer.
    #[test]
    fn set_forwarded_from_a_trusted_peer_always_appends_the_peer(
        peer in any_ip(),
        xff in prop::collection::vec(prop_oneof![forwarded_for_line(), any_header_value()], 0..4),
    ) {
        let mut headers = HeaderMap::new();
        for v in &xff {
            headers.append(X_FORWARDED_FOR.clone(), v.clone());
        }
        set_forwarded(&mut headers, &peer_value(peer), true);
        let values: Vec<&HeaderValue> = headers.get_all(&X_FORWARDED_FOR).iter().collect();
        prop_assert_eq!(values.len(), 1);
        let peer_text = canonical(peer).to_string();
        let last = values[0].as_bytes().rsplit(|b| *b == b',').next().unwrap().trim_ascii();
        prop_assert_eq!(last, peer_text.as_bytes());
    }

    /// After stripping, no header named by any `Connection` option is left, nor any of the
    /// fixed hop-by-hop names; every other header is untouched.
    #[test]
    fn strip_hop_by_hop_leaves_no_connection_option(
        fields in prop::collection::vec((header_name(), any_header_value()), 0..12),
        connection in prop::collection::vec(connection_value(), 0..3),
    ) {
        let mut headers = HeaderMap::new();
        for (name, value) in &fields {
            headers.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), value.clone());
        }
        for value in &connection {
            headers.append(header::CONNECTION, value.clone());
        }
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(named_options)
            .collect();
        let before = headers.clone();
        strip_hop_by_hop(&mut headers);
        for name in &named {
            prop_assert!(!headers.contains_key(name), "{} named in Connection survived", name);
        }
        for name in FIXED_HOP_BY_HOP {
            prop_assert!(!headers.contains_key(name), "{} survived", name);
        }
        for (name, value) in &before {
            if !named.contains(name) && !FIXED_HOP_BY_HOP.contains(&name.as_str()) {
                prop_assert!(headers.get_all(name).iter().any(|v| v == value), "{} was removed", name);
            }
        }
    }

    /// A request id is kept exactly when it is 1 to 128 visible ASCII bytes.
    #[test]
    fn request_ids_are_sane_exactly_when_short_and_visible(
        value in prop_oneof![
            any_header_value(),
            "[!-~]{1,128}".prop_map(|s| HeaderValue::from_str(&s).unwrap()),
            "[!-~]{129,200}".prop_map(|s| HeaderValue::from_str(&s).unwrap()),
        ],
    ) {
        let bytes = value.as_bytes();
        let sane = (1..=128).contains(&bytes.len()) && bytes.iter().all(u8::is_ascii_graphic);
        prop_assert_eq!(is_sane_request_id(&value), sane, "{:?}", value);
    }
}

/// A setting's error: one line, naming the flag and the variable.
fn assert_names_the_setting(message: &str, flag: &str) -> Result<(), TestCaseError> {
    let env = format!("CHATGATE_{}", flag.replace('-', "_").to_uppercase());
    prop_assert!(!message.contains('\n'), "more than one line: {:?}", message);
    prop_assert!(
        message.contains(&format!("--{flag}")) && message.contains(&env),
        "does not name --{} / {}: {:?}",
        flag,
        env,
        message
    );
    Ok(())
}

/// Values an operator might type, right or wrong: numbers of every shape, words, URLs,
/// CIDRs, paths and any Unicode.
fn setting_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "-?[0-9]{0,12}(\\.[0-9]{0,6})?([eE][+-]?[0-9]{1,4})?",
        prop::sample::select(vec![
            "",
            " ",
            "0",
            "-0",
            "1e400",
            "NaN",
            "inf",
            "-1",
            "0.000000001",
            "31536000",
            "31536001",
            "18446744073709551616",
            "on",
            "off",
            "auto",
            "json",
            "text",
            "307",
            "/",
            "//",
            "/ws/socket.io/",
            "/a?b/",
            "http://[::1]:8080",
            "https://u:p@h:1/",
            "http://h:99999",
            "10.0.0.0/8,::1",
            "10.0.0.0/33",
            "0.0.0.0:8000",
            "[::]:0",
            "host:",
            "\u{0}",
            "a\nb",
        ])
        .prop_map(str::to_owned),
        hostile_text(),
    ]
}

const SETTINGS: &[&str] = &[
    "listen",
    "backend",
    "backend-host",
    "trusted-proxies",
    "chat-redirect-status",
    "auth-stub",
    "socketio-path",
    "health-path",
    "health-interval",
    "body-idle-timeout",
    "header-read-timeout",
    "shutdown-grace",
    "backend-wait",
    "max-headers",
    "max-header-bytes",
    "ws-max-message",
    "max-body-bytes",
    "max-connections",
    "rate-limit-http",
    "rate-limit-websocket",
    "rate-limit-ipv6-prefix",
    "allowed-origins",
    "harden-cookies",
    "admin-listen",
    "log-format",
    "asset-cache-bytes",
    "asset-cache-max-file",
    "asset-cache-paths",
    "asset-cache-revalidate",
];

proptest! {
    #![proptest_config(cases(1000))]

    /// Any backend string parses or is refused without panicking; a parsed backend is
    /// http(s) with a host and shows no credentials; a refusal is one line naming it.
    #[test]
    fn parse_backend_never_panics_and_drops_credentials(value in setting_value()) {
        match parse_backend(&value) {
            Ok(backend) => {
                prop_assert!(backend.display.starts_with("http://") || backend.display.starts_with("https://"));
                prop_assert!(!backend.display.contains('@'), "{:?}", backend.display);
                prop_assert!(!backend.host.is_empty());
            }
            Err(e) => assert_names_the_setting(&e.to_string(), "backend")?,
        }
    }

    /// Well-formed backends with credentials, IPv6 hosts and ports parse to their parts.
    #[test]
    fn parse_backend_reads_host_and_port(
        https in any::<bool>(),
        user in prop::option::of("[a-z]{1,5}(:[a-z@]{0,5})?"),
        host in prop_oneof![
            "[a-z][a-z0-9-]{0,10}(\\.[a-z]{2,4})?",
            any::<[u8; 4]>().prop_map(|o| Ipv4Addr::from(o).to_string()),
            any::<[u8; 16]>().prop_map(|o| format!("[{}]", Ipv6Addr::from(o))),
        ],
        port in prop::option::of(1u16..),
        slash in any::<bool>(),
    ) {
        let scheme = if https { "https" } else { "http" };
        let userinfo = user.map(|u| format!("{u}@")).unwrap_or_default();
        let port_text = port.map(|p| format!(":{p}")).unwrap_or_default();
        let url = format!("{scheme}://{userinfo}{host}{port_text}{}", if slash { "/" } else { "" });
        let backend = parse_backend(&url).map_err(|e| TestCaseError::fail(format!("{url}: {e}")))?;
        prop_assert_eq!(backend.port, port.unwrap_or(if https { 443 } else { 80 }));
        prop_assert_eq!(backend.host.as_str(), host.trim_start_matches('[').trim_end_matches(']'));
        prop_assert_eq!(backend.display, format!("{scheme}://{host}{port_text}"));
    }

    /// Any list parses or is refused without panicking; a list of networks and addresses,
    /// however spaced, parses to exactly those networks.
    #[test]
    fn parse_trusted_proxies_reads_any_list(
        garbage in setting_value(),
        nets in prop::collection::vec(
            prop_oneof![
                any_ip().prop_map(|ip| (IpNet::from(ip), ip.to_string())),
                (any_ip(), 0u8..=128).prop_map(|(ip, len)| {
                    let len = if ip.is_ipv4() { len % 33 } else { len };
                    let net = IpNet::new(ip, len).unwrap();
                    (net, net.to_string())
                }),
            ],
            0..6,
        ),
        sep in prop::sample::select(vec![",", ", ", " ,", ",,"]),
    ) {
        if let Err(e) = parse_trusted_proxies(&garbage) {
            assert_names_the_setting(&e.to_string(), "trusted-proxies")?;
        }
        let text: Vec<&str> = nets.iter().map(|(_, t)| t.as_str()).collect();
        let parsed = parse_trusted_proxies(&text.join(sep))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let want: Vec<IpNet> = nets.iter().map(|(n, _)| *n).collect();
        prop_assert_eq!(parsed, want);
    }

    /// Any value for a setting, as a flag or a variable, yields a config or one error line
    /// naming that setting; never a panic.
    #[test]
    fn any_setting_value_validates_or_names_the_setting(
        setting in prop::sample::select(SETTINGS),
        value in setting_value(),
        as_flag in any::<bool>(),
    ) {
        let env_name = format!("CHATGATE_{}", setting.replace('-', "_").to_uppercase());
        let flag = format!("--{setting}={value}");
        let args: Vec<&str> = if as_flag { vec!["chatgate", &flag] } else { vec!["chatgate"] };
        let env = |name: &str| (!as_flag && name == env_name).then(|| value.clone());
        let cli = match Cli::parse_with(args, env) {
            Ok(cli) => cli,
            // clap's own refusal (a flag value it cannot take) is its usage message.
            Err(e) => {
                prop_assert!(e.to_string().contains(setting), "{}", e);
                return Ok(());
            }
        };
        if let Err(e) = Config::from_settings(&cli.settings) {
            assert_names_the_setting(&e.to_string(), setting)?;
        }
    }
}

/// `Accept-Encoding` lines: codings chatgate serves and others, with q-values right and wrong,
/// and random spacing and commas.
fn accept_encoding_line() -> impl Strategy<Value = HeaderValue> {
    let coding = prop::sample::select(vec![
        "br", "gzip", "x-gzip", "identity", "*", "deflate", "zstd", "BR", "", ";",
    ]);
    let q = prop::sample::select(vec![
        "",
        ";q=0",
        ";q=1",
        ";q=0.5",
        ";q=0.001",
        ";q=1.0",
        ";q=2",
        ";q=",
        ";q=-1",
        ";q=0.1234",
        " ; q=0.3",
        ";level=5",
    ]);
    let element = (coding, q).prop_map(|(c, q)| format!("{c}{q}"));
    let line = prop::collection::vec(element, 0..6).prop_map(|parts| parts.join(" ,"));
    prop_oneof![
        4 => line.prop_map(|l| HeaderValue::from_str(&l).expect("visible ASCII")),
        1 => any_header_value(),
    ]
}

/// The q-value a line gives a coding, per RFC 9110 (for checking the chosen one).
fn weight_of(lines: &[HeaderValue], coding: &str) -> Option<u16> {
    let mut best: Option<u16> = None;
    for line in lines {
        let Ok(line) = line.to_str() else { continue };
        for element in line.split(',') {
            let mut parts = element.split(';');
            let name = parts.next().unwrap_or("").trim();
            let mut q = Some(1000);
            for param in parts {
                match param.split_once('=') {
                    Some((k, v)) if k.trim().eq_ignore_ascii_case("q") => {
                        q = match v.trim() {
                            "0" => Some(0),
                            "1" | "1.0" => Some(1000),
                            "0.5" => Some(500),
                            "0.3" => Some(300),
                            "0.001" => Some(1),
                            _ => None,
                        }
                    }
                    Some(_) => {}
                    None => q = None,
                }
            }
            let matches = name.eq_ignore_ascii_case(coding)
                || (coding == "gzip" && name.eq_ignore_ascii_case("x-gzip"));
            if let (true, Some(q)) = (matches, q) {
                best = Some(best.map_or(q, |b| b.max(q)));
            }
        }
    }
    best
}

proptest! {
    #![proptest_config(cases(2000))]

    /// Negotiation never panics and never picks a variant that does not exist, nor one
    /// the client gave q=0 while listing no `*`.
    #[test]
    fn negotiation_picks_an_existing_acceptable_variant(
        lines in prop::collection::vec(accept_encoding_line(), 0..3),
        has_br in any::<bool>(),
        has_gzip in any::<bool>(),
    ) {
        let chosen = negotiate::choose(&lines, has_br, has_gzip);
        let no_star = weight_of(&lines, "*").is_none();
        match chosen {
            Coding::Brotli => {
                prop_assert!(has_br);
                prop_assert!(!(no_star && weight_of(&lines, "br").unwrap_or(0) == 0));
            }
            Coding::Gzip => {
                prop_assert!(has_gzip);
                prop_assert!(!(no_star && weight_of(&lines, "gzip").unwrap_or(0) == 0));
            }
            Coding::Identity => {}
        }
        if lines.is_empty() {
            prop_assert_eq!(chosen, Coding::Identity);
        }
    }

    /// Only plainly spelled, content-hashed names under a prefix are cacheable: whatever
    /// the path, a cacheable one has no dot segment, no percent sign and no empty segment.
    #[test]
    fn cacheable_paths_are_plain(path in hostile_text(), hash in "[A-Za-z0-9_-]{8}") {
        let prefixes = vec!["/assets/".to_owned()];
        for candidate in [format!("/assets/{path}"), format!("/assets/{path}-{hash}.js"), format!("/{path}")] {
            if policy::is_cacheable_path(&candidate, &prefixes) {
                let rest = candidate.strip_prefix("/assets/").expect("under the prefix");
                prop_assert!(!candidate.contains('%') && !candidate.contains("//"));
                prop_assert!(rest.split('/').all(|s| !s.is_empty() && s != "." && s != ".."));
                prop_assert!(rest.is_ascii());
            }
        }
    }

    /// Conditional headers of any shape never panic, and a request naming the exact tag
    /// (first or later in the list) always gets a 304.
    #[test]
    fn conditionals_never_panic_and_an_exact_tag_matches(
        none_match in any_header_value(),
        since in any_header_value(),
        tag in "[a-f0-9]{16}(-gzip|-br)?",
    ) {
        let etag = HeaderValue::from_str(&format!("\"{tag}\"")).expect("visible ASCII");
        let mut headers = HeaderMap::new();
        headers.insert(header::IF_MODIFIED_SINCE, since);
        let _ = policy::not_modified(&headers, &etag, Some(std::time::SystemTime::UNIX_EPOCH));
        headers.insert(header::IF_NONE_MATCH, none_match.clone());
        let _ = policy::not_modified(&headers, &etag, None);
        let listed = format!("\"x\", W/\"{tag}\"");
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_str(&listed).expect("ASCII"));
        prop_assert!(policy::not_modified(&headers, &etag, None));
    }
}
