"""Plain-HTTP end-to-end checks of chatgate in front of a real Chainlit.

The browser cannot see some of these (Chainlit's SPA catch-all answers 200
HTML for any path), so they are checked with an HTTP client, redirects off.

Usage: http_test.py --url http://127.0.0.1:PORT [--direct]
Prints one `PASS name` / `FAIL name: why` / `SKIP name: why` line per test.
"""

import argparse
import re
import sys
import time
import traceback

import requests

TIMEOUT = 10


class Skip(Exception):
    pass


def get(url, **kw):
    kw.setdefault("timeout", TIMEOUT)
    kw.setdefault("allow_redirects", False)
    return requests.get(url, **kw)


def test_root_serves_chainlit_html(base, direct):
    r = get(base + "/")
    assert r.status_code == 200, f"GET / -> {r.status_code}"
    ct = r.headers.get("content-type", "")
    assert ct.startswith("text/html"), f"content-type {ct!r}"
    assert "<title>" in r.text and "/assets/" in r.text, "not Chainlit's index.html"
    return f"200 {ct}"


def test_assets_have_real_mime_types(base, direct):
    """The page's JS and CSS come back with their own types, never */*."""
    html = get(base + "/").text
    assets = re.findall(r'(?:src|href)="(/assets/[^"]+\.(?:js|css))"', html)
    assert assets, "no /assets/*.js or *.css referenced by index.html"
    seen = []
    for path in assets:
        with get(base + path, stream=True, headers={"Accept-Encoding": "gzip"}) as r:
            assert r.status_code == 200, f"GET {path} -> {r.status_code}"
            ct = r.headers.get("content-type", "")
            want = "javascript" if path.endswith(".js") else "text/css"
            assert want in ct, f"{path} content-type {ct!r}"
            seen.append(f"{path.rsplit('.', 1)[1]}={ct.split(';')[0]}")
    return ", ".join(seen)


def test_backend_health_passes_through(base, direct):
    r = get(base + "/health")
    assert r.status_code == 200, f"GET /health -> {r.status_code}"
    assert r.json() == {"status": "ok"}, f"GET /health body {r.text[:200]!r}"


def test_monitor_health_sees_backend(base, direct):
    if direct:
        raise Skip("direct mode: /monitor/health is chatgate's")
    # The backend is probed in the background (default every 5 s): allow a
    # few rounds for the first probe to land.
    deadline = time.monotonic() + 15
    while True:
        r = get(base + "/monitor/health")
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
        ok = r.status_code == 200 and body and body.get("status") == "ok"
        if ok or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, f"GET /monitor/health -> {r.status_code} {r.text[:300]!r}"
    assert body and body.get("status") == "ok", f"body {r.text[:300]!r}"
    backend = body.get("backend") or {}
    assert backend.get("reachable") is True, f"backend {backend!r}"
    return f"backend reachable, latency_ms={backend.get('latency_ms')}"


def test_auth_config_stub(base, direct):
    if direct:
        raise Skip("direct mode: the stub is chatgate's")
    r = get(base + "/auth/config")
    assert r.status_code == 200, f"GET /auth/config -> {r.status_code}"
    body = r.json()
    assert isinstance(body, dict), f"body {r.text[:200]!r}"
    assert not body.get("requireLogin"), f"requireLogin {body.get('requireLogin')!r}"
    assert body.get("default_theme") == "dark", f"default_theme {body.get('default_theme')!r}"
    return "login off, default_theme dark"


def test_chat_redirects_to_root(base, direct):
    if direct:
        raise Skip("direct mode: /chat redirect is chatgate's")
    cases = [("/chat", "/"), ("/chat/", "/"), ("/chat?x=1", "/?x=1")]
    for path, want in cases:
        r = get(base + path)
        assert r.status_code in (301, 302, 303, 307, 308), f"GET {path} -> {r.status_code}"
        loc = r.headers.get("location", "")
        # Relative or absolute on the same origin, never another site.
        if loc.startswith("http://") or loc.startswith("https://"):
            assert loc.startswith(base), f"GET {path} -> Location {loc!r} leaves the site"
            loc = loc[len(base):]
        assert loc == want, f"GET {path} -> Location {loc!r}, want {want!r}"
    return ", ".join(f"{p} -> {w}" for p, w in cases)


def test_foreign_origin_refused(base, direct, allowed):
    """With an allow-list, a page on another site cannot open a Socket.IO
    session through chatgate; our own origin (and no Origin) can."""
    if direct or not allowed:
        raise Skip("no --allowed-origins under test")
    path = "/ws/socket.io/?EIO=4&transport=polling"
    r = get(base + path, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403, f"Origin http://evil.example -> {r.status_code}"
    own = allowed.split(",")[0]
    r = get(base + path, headers={"Origin": own})
    assert r.status_code == 200 and r.text.startswith("0{"), (
        f"Origin {own} -> {r.status_code} {r.text[:80]!r}"
    )
    return f"evil.example 403, {own} 200"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--direct", action="store_true")
    ap.add_argument("--allowed-origins", default="", help="chatgate's allow-list, if set")
    args = ap.parse_args()
    base = args.url.rstrip("/")
    tests = [
        ("http_root_serves_chainlit_html", test_root_serves_chainlit_html),
        ("http_assets_have_real_mime_types", test_assets_have_real_mime_types),
        ("http_backend_health_passes_through", test_backend_health_passes_through),
        ("http_monitor_health_sees_backend", test_monitor_health_sees_backend),
        ("http_auth_config_stub_selects_dark_theme", test_auth_config_stub),
        ("http_chat_redirects_to_root", test_chat_redirects_to_root),
        ("http_foreign_origin_cannot_open_socketio", lambda b, d: test_foreign_origin_refused(b, d, args.allowed_origins)),
    ]
    failed = 0
    for name, fn in tests:
        try:
            detail = fn(base, args.direct)
            print(f"PASS {name}" + (f" ({detail})" if detail else ""), flush=True)
        except Skip as s:
            print(f"SKIP {name}: {s}", flush=True)
        except Exception as e:
            failed += 1
            print(f"FAIL {name}: {str(e) or e.__class__.__name__}", flush=True)
            traceback.print_exc(file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
