"""One Chainlit chat for bench/assets.sh: a message every 200 ms, each reply's latency.

Uses the e2e tests' ChatClient (tests/e2e/socketio_test.py): the frontend's own handshake
and `client_message`. Sends, waits for the streamed reply, sends the next one 200 ms after
the previous send (at once if the reply took longer), until SIGTERM or --seconds.

Prints `ready` once connected, then one line per message:
`<unix time of send> <ms to the first token> <ms to the complete reply>`.

    python bench/assets_chat.py --url http://127.0.0.1:PORT [--seconds 60]
"""

import argparse
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "e2e"))
from socketio_test import ChatClient, expected_reply  # noqa: E402

INTERVAL = 0.2


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--seconds", type=float, default=600)
    args = parser.parse_args()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))

    chat = ChatClient(args.url.rstrip("/"), ["polling", "websocket"])
    chat.connect()
    print("ready", flush=True)
    end = time.monotonic() + args.seconds
    n = 0
    while not stop and time.monotonic() < end:
        n += 1
        text = f"ping {n}"
        sent_wall = time.time()
        sent = time.monotonic()
        start = chat.send_user_message(text)
        _, _, final = chat.wait_for_streamed_reply(start, timeout=60)
        done = time.monotonic()
        if final != expected_reply(text):
            print(f"wrong reply {final!r}", file=sys.stderr)
            return 1
        with chat.cond:
            first = next(
                t for t, event, _ in chat.events[start:] if event == "stream_start"
            )
        print(f"{sent_wall:.3f} {(first - sent) * 1000:.1f} {(done - sent) * 1000:.1f}", flush=True)
        time.sleep(max(0.0, sent + INTERVAL - time.monotonic()))
    chat.sio.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
