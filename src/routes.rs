//! The route table: which handler a request path belongs to, in one `match`, and the
//! pure helpers that build a route's target (the `/chat` redirect, the Socket.IO mapping).

/// Where a request goes. Borrowed from the request path; no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// `/monitor/live`: the process serves.
    Live,
    /// `/monitor/health`: readiness, from the cached backend probe.
    Health,
    /// `/chat`, `/chat/`, `/chat/<rest>`: redirect to `/<rest>`.
    ChatRedirect { rest: &'a str },
    /// `/auth/config`: the login-off stub (depending on `--auth-stub`).
    AuthConfig,
    /// `/socket.io` and `/socket.io/<rest>`: the backend's Socket.IO mount + `<rest>`.
    SocketIo { rest: &'a str },
    /// Everything else, `/` included: straight to the backend.
    Backend,
}

/// Classifies a request path (without the query).
pub fn classify(path: &str) -> Route<'_> {
    match path {
        "/monitor/live" => Route::Live,
        "/monitor/health" => Route::Health,
        "/auth/config" => Route::AuthConfig,
        "/chat" => Route::ChatRedirect { rest: "" },
        "/socket.io" => Route::SocketIo { rest: "" },
        _ => {
            if let Some(rest) = path.strip_prefix("/chat/") {
                Route::ChatRedirect { rest }
            } else if let Some(rest) = path.strip_prefix("/socket.io/") {
                Route::SocketIo { rest }
            } else {
                Route::Backend
            }
        }
    }
}

/// Whether a route is a probe, whose requests are logged at debug level only.
pub fn is_probe(route: Route<'_>) -> bool {
    matches!(route, Route::Live | Route::Health)
}

/// Builds the `Location` for `/chat/<rest>?<query>`: always a same-site absolute path.
///
/// A browser reading `Location` drops tabs and newlines anywhere, reads `\` as `/`, and takes
/// `//host` or `/\host` as another site. So `rest` is never decoded (a `%2F` stays a
/// literal path character), every byte a browser might drop or reinterpret (controls,
/// space, `\`, non-ASCII) is percent-encoded, and leading slashes are removed: the result
/// starts with exactly one `/` followed by a byte that cannot begin an authority.
pub fn chat_redirect_location(rest: &str, query: Option<&str>) -> String {
    let rest = rest.trim_start_matches('/');
    let mut location = String::with_capacity(1 + rest.len() + query.map_or(0, |q| q.len() + 1));
    location.push('/');
    push_safe(&mut location, rest);
    // A dot segment ("/..//x") can only yield the *path* "//x" on this site: a browser
    // decides path-absolute versus network-path on the reference's first two bytes.
    if let Some(q) = query {
        location.push('?');
        push_safe(&mut location, q);
    }
    location
}

fn push_safe(out: &mut String, input: &str) {
    for &byte in input.as_bytes() {
        let reinterpreted = byte <= b' ' || byte == b'\\' || byte >= 0x7f;
        if reinterpreted {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        } else {
            out.push(char::from(byte));
        }
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// The backend path for `/socket.io/<rest>`: the configured mount (ends in `/`) + `rest`.
pub fn socketio_backend_path(mount: &str, rest: &str) -> String {
    let mut path = String::with_capacity(mount.len() + rest.len());
    path.push_str(mount);
    path.push_str(rest.trim_start_matches('/'));
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_table() {
        let table: &[(&str, Route<'_>)] = &[
            ("/", Route::Backend),
            ("/monitor/live", Route::Live),
            ("/monitor/health", Route::Health),
            ("/monitor/healthz", Route::Backend),
            ("/auth/config", Route::AuthConfig),
            ("/auth/config/", Route::Backend),
            ("/auth/jwt", Route::Backend),
            ("/chat", Route::ChatRedirect { rest: "" }),
            ("/chat/", Route::ChatRedirect { rest: "" }),
            ("/chat/thread/1", Route::ChatRedirect { rest: "thread/1" }),
            ("/chatter", Route::Backend),
            ("/socket.io", Route::SocketIo { rest: "" }),
            ("/socket.io/", Route::SocketIo { rest: "" }),
            ("/socket.io/x", Route::SocketIo { rest: "x" }),
            ("/ws/socket.io/", Route::Backend),
            ("/assets/index.js", Route::Backend),
        ];
        for (path, route) in table {
            assert_eq!(classify(path), *route, "{path}");
        }
    }

    /// What a browser does with a Location, reduced to what decides the origin: it removes
    /// tab/CR/LF, reads `\` as `/`, and treats a leading `//` as a network-path reference.
    fn browser_leaves_site(location: &str) -> bool {
        let cleaned: String = location
            .chars()
            .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
            .map(|c| if c == '\\' { '/' } else { c })
            .collect();
        let trimmed = cleaned.trim_start_matches(|c: char| c <= ' ');
        // A Location is relative unless it has a scheme; with one it leaves the site.
        let has_scheme = trimmed
            .split_once(':')
            .is_some_and(|(scheme, _)| !scheme.contains('/') && !scheme.is_empty());
        has_scheme || !trimmed.starts_with('/') || trimmed.starts_with("//")
    }

    #[test]
    fn chat_redirect_never_leaves_the_site() {
        let hostile = [
            "/evil.example",
            "//evil.example",
            "\\evil.example",
            "/\\evil.example",
            "%2F%2Fevil.example",
            "%2f/evil.example",
            "%5C%5Cevil.example",
            "\t/evil.example",
            "%09/evil.example",
            "\n//evil.example",
            " //evil.example",
            "https://evil.example",
            "\u{3000}//evil.example",
            "..//evil.example",
            "./\\evil.example",
        ];
        for rest in hostile {
            let location = chat_redirect_location(rest, None);
            assert!(!browser_leaves_site(&location), "{rest:?} -> {location:?}");
            assert!(
                location.is_ascii() && !location.bytes().any(|b| b < 0x21),
                "{location:?}"
            );
            http::HeaderValue::from_str(&location).expect("valid header value");
        }
    }

    #[test]
    fn chat_redirect_keeps_the_rest_and_query() {
        assert_eq!(chat_redirect_location("", None), "/");
        assert_eq!(chat_redirect_location("", Some("a=1")), "/?a=1");
        assert_eq!(
            chat_redirect_location("thread/7", Some("x=y&z")),
            "/thread/7?x=y&z"
        );
        assert_eq!(chat_redirect_location("a%20b", None), "/a%20b");
    }

    #[test]
    fn socketio_maps_onto_the_mount() {
        assert_eq!(
            socketio_backend_path("/ws/socket.io/", ""),
            "/ws/socket.io/"
        );
        assert_eq!(
            socketio_backend_path("/ws/socket.io/", "x/y"),
            "/ws/socket.io/x/y"
        );
        assert_eq!(socketio_backend_path("/sio/", "/x"), "/sio/x");
    }
}
