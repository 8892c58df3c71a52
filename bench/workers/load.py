"""Load for bench/workers.sh: N concurrent Chainlit chats over python-socketio (polling, then
upgraded to WebSocket, as the browser does), each sending a message, waiting for its reply,
and sending the next, for a fixed time.

    load.py --url http://127.0.0.1:8000 --chats 8 --seconds 30

Prints one JSON line: replies, replies per second, errors (a disconnect, a reply missing after
30 s, a failed connect), and per worker (read from chatgate's affinity cookie) the chats and
replies it served.
"""

import argparse
import json
import os
import threading
import time
import uuid

import requests
import socketio

REPLY_TIMEOUT = 30


class Chat:
    def __init__(self, url: str):
        self.url = url
        self.http = requests.Session()
        self.sio = socketio.Client(reconnection=False, http_session=self.http, request_timeout=10)
        self.session_id = str(uuid.uuid4())
        self.replies = 0
        self.errors = []
        self.cond = threading.Condition()
        self.last = None
        self.sio.on("new_message", self.on_message)
        self.sio.on("disconnect", self.on_disconnect)

    def on_message(self, data):
        with self.cond:
            self.last = data.get("output")
            self.cond.notify_all()

    def on_disconnect(self, *args):
        with self.cond:
            self.errors.append("disconnected")
            self.cond.notify_all()

    def connect(self):
        self.http.post(self.url + "/set-session-cookie", json={"session_id": self.session_id}, timeout=10)
        self.sio.connect(
            self.url,
            socketio_path="/ws/socket.io",
            transports=["polling", "websocket"],
            auth={"clientType": "webapp", "sessionId": self.session_id, "threadId": "",
                  "userEnv": "{}", "chatProfile": ""},
            wait_timeout=20,
        )
        self.sio.emit("connection_successful")

    def worker(self) -> str:
        value = self.http.cookies.get("chatgate_worker")
        return value.split(".")[0] if value else "?"

    def ask(self, text: str) -> bool:
        message = {"threadId": "", "id": str(uuid.uuid4()), "name": "User", "type": "user_message",
                   "output": text, "createdAt": "2026-01-01T00:00:00.000Z", "metadata": {}}
        want = f"done {text}"
        with self.cond:
            self.last = None
        self.sio.emit("client_message", {"message": message, "fileReferences": []})
        deadline = time.monotonic() + REPLY_TIMEOUT
        with self.cond:
            while self.last != want:
                if self.errors:
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.errors.append(f"no reply within {REPLY_TIMEOUT}s")
                    return False
                self.cond.wait(remaining)
        return True

    def run(self, stop_at: float, counting_from: float):
        n = 0
        while time.monotonic() < stop_at and not self.errors:
            n += 1
            if self.ask(f"m{n}") and time.monotonic() >= counting_from:
                self.replies += 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--chats", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--warmup", type=float, default=3)
    args = ap.parse_args()
    chats = [Chat(args.url.rstrip("/")) for _ in range(args.chats)]
    connect_errors = []
    for chat in chats:
        try:
            chat.connect()
        except Exception as e:  # counted, not raised: the run reports its errors
            connect_errors.append(str(e))
    start = time.monotonic()
    counting_from = start + args.warmup
    stop_at = counting_from + args.seconds
    threads = [threading.Thread(target=c.run, args=(stop_at, counting_from)) for c in chats if c.sio.connected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = min(time.monotonic(), stop_at) - counting_from
    per_worker = {}
    for c in chats:
        w = per_worker.setdefault(c.worker(), {"chats": 0, "replies": 0})
        w["chats"] += 1
        w["replies"] += c.replies
    errors = connect_errors + [e for c in chats for e in c.errors]
    replies = sum(c.replies for c in chats)
    times = os.times()
    print(json.dumps({
        "chats": args.chats, "seconds": round(elapsed, 2), "replies": replies,
        "replies_per_second": round(replies / elapsed, 2), "errors": errors, "per_worker": per_worker,
        "client_cpu_seconds": round(times.user + times.system, 2),
    }), flush=True)
    for c in chats:
        try:
            c.sio.disconnect()
        except Exception:
            pass


if __name__ == "__main__":
    main()
