"""Development stub of chatgate's contract, for writing the ship tests before src/ serves.

NOT used by the tests unless CHATGATE_UNDER_TEST points at it (see conftest.py). It implements
just what the ship tests touch: /monitor/live, /monitor/health (backend GET /health), a
WebSocket relay on any path, and SIGTERM -> readiness 503, relays closed with 1001, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import urllib.request
from http import HTTPStatus

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default=os.environ.get("CHATGATE_LISTEN", "0.0.0.0:8000"))
    parser.add_argument(
        "--backend", default=os.environ.get("CHATGATE_BACKEND", "http://127.0.0.1:8080")
    )
    args = parser.parse_args()
    if os.environ.get("CHATGATE_LOG_FORMAT", "auto") not in ("json", "text", "auto"):
        print("error: invalid CHATGATE_LOG_FORMAT", file=sys.stderr)
        return 2
    return asyncio.run(run(args))


async def run(args: argparse.Namespace) -> int:
    host, port = args.listen.rsplit(":", 1)
    backend = args.backend.rstrip("/")
    draining = False
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def backend_ok() -> bool:
        try:
            with opener.open(backend + "/health", timeout=1) as response:
                return response.status == 200
        except Exception:
            return False

    async def routes(connection: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        path = request.path.split("?", 1)[0]
        if path == "/monitor/live":
            return connection.respond(HTTPStatus.OK, '{"status":"ok"}')
        if path == "/monitor/health":
            ok = not draining and await asyncio.to_thread(backend_ok)
            status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
            return connection.respond(status, '{"status":"%s"}' % ("ok" if ok else "unavailable"))
        return connection.respond(HTTPStatus.BAD_GATEWAY, "stub proxies WebSockets only\n")

    async def relay(client: ServerConnection) -> None:
        url = "ws" + backend[len("http") :] + client.request.path
        async with connect(url, proxy=None, ping_interval=None) as upstream:

            async def pump(source, sink) -> None:
                async for message in source:
                    await sink.send(message)

            tasks = [
                asyncio.create_task(pump(client, upstream)),
                asyncio.create_task(pump(upstream, client)),
            ]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            except ConnectionClosed:
                pass
            for task in tasks:
                task.cancel()

    stop = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))

    async with serve(relay, host, int(port), process_request=routes, ping_interval=None) as server:
        await stop
        draining = True
        server.close(code=1001, reason="chatgate shutting down")
        await server.wait_closed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
