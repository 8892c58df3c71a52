"""Socket.IO end-to-end tests: a python-socketio client talks to Chainlit
through chatgate the way Chainlit's own frontend does.

What the frontend does, read off chainlit 2.12.0 (frontend bundle and
chainlit/socket.py): it POSTs `/set-session-cookie`, connects to `{origin}/ws/socket.io` with
`auth={clientType, sessionId, threadId, userEnv, chatProfile}`, polling first
and then upgrading to WebSocket (Engine.IO v4), emits `connection_successful`
and `fetch_favorites` once connected, and sends a user message as the event
`client_message` with `{message: {...type:"user_message"...}, fileReferences}`.
A streamed reply arrives as `stream_start` (carrying the first token in
`output`) followed by `stream_token` events, then `update_message`.

Usage: socketio_test.py --url http://127.0.0.1:PORT [--only NAME ...]
Prints one `PASS name` / `FAIL name: why` line per test; exit 1 if any failed.
"""

import argparse
import datetime
import logging
import sys
import threading
import time
import traceback
import uuid

import requests
import socketio

# The reply examples/chainlit/app.py streams back (same rule, kept in sync).
def expected_reply(text: str) -> str:
    return "You said: " + text.upper()[::-1]


SOCKETIO_PATH = "/ws/socket.io"
CONNECT_TIMEOUT = 15
REPLY_TIMEOUT = 20


class PacketLog(logging.Handler):
    """Counts Engine.IO packets the client received, from the client's log.

    python-engineio logs every received packet ("Received packet PING ...");
    that is the only public view of the heartbeat, so the idle test reads it.
    """

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.pings = 0

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Received packet PING"):
            self.pings += 1


class ChatClient:
    """One Chainlit frontend session over python-socketio."""

    def __init__(self, url: str, transports: list[str]):
        self.url = url
        self.transports = transports
        self.packets = PacketLog()
        eio_logger = logging.getLogger(f"engineio.e2e.{uuid.uuid4().hex[:8]}")
        eio_logger.setLevel(logging.INFO)
        eio_logger.propagate = False
        eio_logger.addHandler(self.packets)
        # reconnection=False: a dropped connection must fail the test, not be
        # silently replaced by a fresh one.
        # One HTTP session for the sticky-session cookie and the polling
        # requests, as the browser's cookie jar would be.
        self.http = requests.Session()
        self.sio = socketio.Client(
            reconnection=False,
            engineio_logger=eio_logger,
            request_timeout=10,
            http_session=self.http,
        )
        # python-engineio hands every received packet to its own new thread
        # (run_async=True), so under load events reach _on_any out of order: a
        # reply's update_message before its last stream_tokens. The browser's
        # socket.io client handles packets in order; so does this one, on the
        # transport's read thread (the handlers below only append).
        trigger = self.sio.eio._trigger_event

        def in_order(event, *args, **kwargs):
            if event == "message":
                kwargs["run_async"] = False
            return trigger(event, *args, **kwargs)

        self.sio.eio._trigger_event = in_order
        self.session_id = str(uuid.uuid4())
        self.events: list[tuple[float, str, object]] = []
        self.cond = threading.Condition()
        self.disconnects = 0
        self.sio.on("*", self._on_any)
        self.sio.on("disconnect", self._on_disconnect)

    def _on_any(self, event, *args):
        with self.cond:
            self.events.append((time.monotonic(), event, args[0] if args else None))
            self.cond.notify_all()

    def _on_disconnect(self, *args):
        with self.cond:
            self.disconnects += 1
            self.cond.notify_all()

    def connect(self):
        # The frontend asks for the affinity cookie before opening the socket.
        r = self.http.post(
            self.url + "/set-session-cookie",
            json={"session_id": self.session_id},
            timeout=10,
        )
        assert r.status_code == 200, f"POST /set-session-cookie -> {r.status_code}"
        assert self.http.cookies.get("X-Chainlit-Session-id") == self.session_id, (
            f"no X-Chainlit-Session-id cookie (Set-Cookie: {r.headers.get('set-cookie')!r})"
        )
        self.sio.connect(
            self.url,
            socketio_path=SOCKETIO_PATH,
            transports=self.transports,
            auth={
                "clientType": "webapp",
                "sessionId": self.session_id,
                "threadId": "",
                "userEnv": "{}",
                "chatProfile": "",
            },
            wait_timeout=CONNECT_TIMEOUT,
        )
        self.sio.emit("connection_successful")
        self.sio.emit("fetch_favorites")

    def transport(self) -> str:
        return self.sio.transport()

    def engineio_sid(self):
        return self.sio.eio.sid

    def send_user_message(self, text: str):
        """Emit the message exactly as the frontend's composer does."""
        message = {
            "threadId": "",
            "id": str(uuid.uuid4()),
            "name": "User",
            "type": "user_message",
            "output": text,
            "createdAt": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "metadata": {"location": self.url + "/"},
        }
        with self.cond:
            start = len(self.events)
        self.sio.emit("client_message", {"message": message, "fileReferences": []})
        return start

    def wait_for_streamed_reply(self, start: int, timeout: float = REPLY_TIMEOUT):
        """Collect stream_start + stream_token events after index `start` until
        the streamed message is finalised (update_message with its id).

        Returns (streamed_text, token_event_count, final_output_or_None).
        """
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                stream_id = None
                parts: list[str] = []
                tokens = 0
                final = None
                for _, event, data in self.events[start:]:
                    if event == "stream_start" and stream_id is None:
                        stream_id = data["id"]
                        parts.append(data.get("output") or "")
                    elif event == "stream_token" and data.get("id") == stream_id:
                        tokens += 1
                        if data.get("isSequence"):
                            parts = [data["token"]]
                        else:
                            parts.append(data["token"])
                    elif (
                        event in ("update_message", "new_message")
                        and stream_id is not None
                        and data.get("id") == stream_id
                    ):
                        final = data.get("output")
                if final is not None:
                    return "".join(parts), tokens, final
                if self.disconnects:
                    raise AssertionError("disconnected while waiting for the reply")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [e for _, e, _ in self.events[start:]]
                    raise AssertionError(
                        f"no complete streamed reply within {timeout}s; events seen: {seen}"
                    )
                self.cond.wait(remaining)

    def round_trip(self, text: str):
        start = self.send_user_message(text)
        streamed, tokens, final = self.wait_for_streamed_reply(start)
        want = expected_reply(text)
        assert streamed == want, f"streamed tokens {streamed!r} != expected {want!r}"
        assert final == want, f"final message {final!r} != expected {want!r}"
        assert tokens >= 2, f"only {tokens} stream_token events: reply was not streamed"
        return tokens

    def wait_transport(self, name: str, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.transport() == name:
                return True
            time.sleep(0.05)
        return self.transport() == name

    def close(self):
        try:
            self.sio.disconnect()
        except Exception:
            pass


def test_polling_then_upgrade(url):
    """The frontend's default: polling handshake, then upgrade to WebSocket."""
    c = ChatClient(url, ["polling", "websocket"])
    try:
        c.connect()
        assert c.wait_transport("websocket"), (
            f"transport is {c.transport()!r} after connect: the WebSocket upgrade "
            "did not happen"
        )
        tokens = c.round_trip("hello through the proxy")
        assert c.transport() == "websocket", "fell back from websocket"
        return f"upgraded to websocket, {tokens} stream_token events"
    finally:
        c.close()


def test_websocket_only(url):
    """transports=['websocket'] (Chainlit's `[project] transports` option)."""
    c = ChatClient(url, ["websocket"])
    try:
        c.connect()
        assert c.transport() == "websocket", f"transport is {c.transport()!r}"
        tokens = c.round_trip("websocket only please")
        return f"{tokens} stream_token events"
    finally:
        c.close()


def test_idle_connection_survives(url, idle_seconds):
    """A connection left idle past Engine.IO's 25 s ping interval is still the
    same connection afterwards and still round-trips."""
    c = ChatClient(url, ["polling", "websocket"])
    try:
        c.connect()
        assert c.wait_transport("websocket"), f"transport is {c.transport()!r}"
        c.round_trip("before the idle period")
        sid = c.engineio_sid()
        pings_before = c.packets.pings
        deadline = time.monotonic() + idle_seconds
        with c.cond:
            while time.monotonic() < deadline and not c.disconnects:
                c.cond.wait(max(0.0, deadline - time.monotonic()))
        assert not c.disconnects, "disconnected during the idle period"
        assert c.sio.connected, "client no longer connected after the idle period"
        assert c.engineio_sid() == sid, "Engine.IO session changed (reconnected)"
        pings = c.packets.pings - pings_before
        assert pings >= 1, "no Engine.IO PING reached the client while idle"
        tokens = c.round_trip("after the idle period")
        return f"idle {idle_seconds}s, {pings} ping(s) answered, then {tokens} tokens"
    finally:
        c.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True, help="origin, e.g. http://127.0.0.1:8000")
    ap.add_argument("--only", action="append", help="run only these tests")
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    args = ap.parse_args()
    url = args.url.rstrip("/")

    tests = {
        "socketio_polling_handshake_upgrades_and_streams_reply": lambda: test_polling_then_upgrade(url),
        "socketio_websocket_only_streams_reply": lambda: test_websocket_only(url),
        "socketio_idle_connection_survives_ping_interval": lambda: test_idle_connection_survives(
            url, args.idle_seconds
        ),
    }
    failed = 0
    for name, fn in tests.items():
        if args.only and name not in args.only:
            continue
        try:
            detail = fn()
            print(f"PASS {name}" + (f" ({detail})" if detail else ""), flush=True)
        except Exception as e:  # a test failure of any kind is reported, not raised
            failed += 1
            why = str(e) or e.__class__.__name__
            print(f"FAIL {name}: {why}", flush=True)
            traceback.print_exc(file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
