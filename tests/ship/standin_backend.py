"""A stand-in for Chainlit in the ship tests: GET /health, WebSocket echo on any path.

    python standin_backend.py --port 8080 [--start-delay 1.5] [--exit-after 2 --exit-code 3]
                              [--never-listen] [--ignore-term] [--events FILE]

--events FILE gets one line per event, `<unix time> <event>`: `listening`, `sigterm`,
`ws-open <path>`, `ws-closed <code>`. On SIGTERM it closes its WebSockets with 4002 (not 1001),
so a client that sees 1001 knows the close came from chatgate, not from the backend.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

BACKEND_STOPPING = 4002


class Events:
    def __init__(self, path: str | None) -> None:
        self.path = path

    def record(self, event: str) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as events:
                events.write(f"{time.time():.6f} {event}\n")


def health(connection: ServerConnection, request: Request) -> Response | None:
    """Plain HTTP for anything that isn't a WebSocket upgrade; None lets the handshake go on."""
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return None
    if request.path.split("?", 1)[0] == "/health":
        response = connection.respond(HTTPStatus.OK, '{"status":"ok"}')
        response.headers["Content-Type"] = "application/json"
        return response
    return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")


async def run(args: argparse.Namespace) -> int:
    events = Events(args.events)
    stop = asyncio.get_running_loop().create_future()

    def on_term() -> None:
        events.record("sigterm")
        if not args.ignore_term and not stop.done():
            stop.set_result(None)

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_term)

    if args.start_delay:
        await asyncio.sleep(args.start_delay)
    if args.never_listen:
        await stop
        return 0

    async def echo(connection: ServerConnection) -> None:
        events.record(f"ws-open {connection.request.path}")
        try:
            async for message in connection:
                await connection.send(message)
        except ConnectionClosed:
            pass
        events.record(f"ws-closed {connection.close_code}")

    async with serve(
        echo, "127.0.0.1", args.port, process_request=health, ping_interval=None
    ) as server:
        events.record("listening")
        print(f"standin backend listening on 127.0.0.1:{args.port}", flush=True)
        if args.exit_after is not None:
            try:
                await asyncio.wait_for(asyncio.shield(stop), args.exit_after)
            except TimeoutError:
                events.record(f"exiting {args.exit_code}")
                return args.exit_code
        else:
            await stop
        server.close(code=BACKEND_STOPPING, reason="backend stopping")
        await server.wait_closed()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--start-delay", type=float, default=0.0)
    parser.add_argument("--exit-after", type=float, default=None)
    parser.add_argument("--exit-code", type=int, default=3)
    parser.add_argument("--never-listen", action="store_true")
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--events", default=None)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
