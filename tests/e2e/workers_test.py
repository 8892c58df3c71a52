"""Several Chainlit workers behind one chatgate, driven with python-socketio the way
Chainlit's frontend talks (see socketio_test.py), plus the file uploads of a chat.

What ties a chat to one process (Chainlit 2.12, chainlit/socket.py, server.py,
session.py): the Engine.IO session, the handler's task and the uploads under
<APP_ROOT>/.files/<session id>/ all live in the worker that took the handshake.
So every request of a session must reach that worker: the polling requests and
the upgrade (by sid or by chatgate's affinity cookie), `POST /project/file?session_id=`
(by cookie) and the message that refers to the upload.

Tests (each prints `PASS name` / `FAIL name: why`):
- workers_sessions_spread_and_reply: 40 concurrent sessions, half polling only,
  half upgrading to WebSocket; each uploads a file and refers to it in a message;
  every reply arrives, and the sessions are spread over both workers.
- workers_cookieless_session_kept_by_sid: a client that keeps no cookies at all
  chats over polling only: its session holds by the Engine.IO sid alone.
- workers_sigkill_one_worker: SIGKILL one worker; sessions on the others carry on;
  a new session succeeds within 5 s of the kill; (supervised) the worker is back.
- workers_graceful_stop_keeps_other_workers_files (supervised): SIGTERM one worker
  (Chainlit deletes its APP_ROOT/.files on a graceful exit); chats on the other
  keep their uploads and can upload again.

Usage: workers_test.py --url URL --mode supervised|external [--pid PID ...]
(external: the workers' PIDs in worker order).
"""

import argparse
import concurrent.futures
import datetime
import hashlib
import http.cookiejar
import os
import sys
import threading
import time
import traceback
import uuid

import requests

from socketio_test import ChatClient, expected_reply

AFFINITY_COOKIE = "chatgate_worker"
SESSIONS = 40


class WorkerChat(ChatClient):
    """A chat session that also uploads files and knows which worker holds it."""

    def worker(self) -> int:
        value = self.http.cookies.get(AFFINITY_COOKIE)
        assert value, "no affinity cookie"
        return int(value.split(".")[0])

    def upload(self, name: str, content: bytes) -> dict:
        r = self.http.post(
            self.url + "/project/file",
            params={"session_id": self.session_id},
            files={"file": (name, content, "text/plain")},
            timeout=15,
        )
        assert r.status_code == 200, f"upload {name}: {r.status_code} {r.text[:200]}"
        ref = r.json()
        assert ref.get("id"), f"upload {name}: no id in {ref}"
        return ref

    def download(self, file_id: str) -> bytes:
        r = self.http.get(
            f"{self.url}/project/file/{file_id}",
            params={"session_id": self.session_id},
            timeout=15,
        )
        assert r.status_code == 200, f"download {file_id}: {r.status_code} {r.text[:200]}"
        return r.content

    def message_with_files(self, text: str, files: list[tuple[str, bytes, dict]]):
        """Sends `text` referring to `files` (name, content, upload answer) and checks
        the streamed reply and one "Received" acknowledgement per file."""
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
        refs = [{"id": ref["id"]} for _, _, ref in files]
        self.sio.emit("client_message", {"message": message, "fileReferences": refs})
        streamed, _, final = self.wait_for_streamed_reply(start)
        assert final == expected_reply(text), f"reply {final!r}"
        want = {
            f"Received {name}: {len(content)} bytes, sha256 {hashlib.sha256(content).hexdigest()}"
            for name, content, _ in files
        }
        deadline = time.monotonic() + 20
        with self.cond:
            while True:
                got = {
                    data.get("output")
                    for _, event, data in self.events[start:]
                    if event == "new_message" and isinstance(data, dict)
                }
                if want <= got:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.disconnects:
                    raise AssertionError(f"file acknowledgements missing: {want - got}")
                self.cond.wait(remaining)

    def full_exchange(self, tag: str):
        """A round trip, an upload and a message that uses it."""
        self.round_trip(f"hello {tag}")
        content = f"upload {tag} {uuid.uuid4()}\n".encode() * 3
        name = f"note-{tag}.txt"
        ref = self.upload(name, content)
        self.message_with_files(f"see {tag}", [(name, content, ref)])
        return name, content, ref


class NoCookies(http.cookiejar.DefaultCookiePolicy):
    def set_ok(self, cookie, request):
        return False

    def return_ok(self, cookie, request):
        return False


def health(url: str) -> dict:
    return requests.get(url + "/monitor/health", timeout=5).json()


def until(what: str, check, timeout: float, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def kill(pid: int, sig: int):
    os.kill(pid, sig)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class Suite:
    def __init__(self, url: str, mode: str, pids: list[int]):
        self.url = url
        self.mode = mode
        self.external_pids = pids
        self.clients: list[WorkerChat] = []
        self.lock = threading.Lock()

    def pid_of(self, worker: int) -> int:
        if self.mode == "external":
            return self.external_pids[worker]
        pid = health(self.url)["workers"][worker]["pid"]
        assert pid, f"worker {worker} has no pid: {health(self.url)}"
        return pid

    def new_chat(self, transports) -> WorkerChat:
        c = WorkerChat(self.url, transports)
        with self.lock:
            self.clients.append(c)
        return c

    def test_sessions_spread_and_reply(self):
        def one(i: int):
            transports = ["polling"] if i % 2 else ["polling", "websocket"]
            c = self.new_chat(transports)
            c.connect()
            if len(transports) == 2:
                assert c.wait_transport("websocket", 10), f"session {i} did not upgrade"
            else:
                assert c.transport() == "polling"
            c.full_exchange(f"s{i}")
            return c.worker()

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(SESSIONS) as pool:
            workers = list(pool.map(one, range(SESSIONS)))
        per_worker = {w: workers.count(w) for w in sorted(set(workers))}
        assert len(per_worker) == 2 and min(per_worker.values()) >= SESSIONS // 5, (
            f"sessions not spread over both workers: {per_worker}"
        )
        return (
            f"{SESSIONS} sessions (20 polling only, 20 upgraded) replied and used their "
            f"uploads in {time.monotonic() - started:.1f} s; per worker {per_worker}"
        )

    def test_cookieless_session_kept_by_sid(self):
        c = WorkerChat(self.url, ["polling"])
        c.http.cookies.set_policy(NoCookies())
        try:
            # The frontend's /set-session-cookie is pointless without cookies: straight
            # to the Socket.IO connection, as a plain python-socketio client would.
            c.sio.connect(
                self.url,
                socketio_path="/ws/socket.io",
                transports=["polling"],
                auth={
                    "clientType": "webapp",
                    "sessionId": c.session_id,
                    "threadId": "",
                    "userEnv": "{}",
                    "chatProfile": "",
                },
                wait_timeout=15,
            )
            assert not list(c.http.cookies), "the client kept a cookie"
            for i in range(4):
                c.round_trip(f"no cookies {i}")
            assert c.disconnects == 0
            return "4 round trips over polling with no cookie at all"
        finally:
            c.close()

    def test_sigkill_one_worker(self):
        victim = 0
        on_victim = [c for c in self.clients if c.sio.connected and c.worker() == victim]
        others = [c for c in self.clients if c.sio.connected and c.worker() != victim]
        assert on_victim and others, "need sessions on both workers first"
        before = health(self.url)["workers"][victim]["restarts"] if self.mode == "supervised" else 0
        pid = self.pid_of(victim)
        kill(pid, 9)
        killed = time.monotonic()
        # A new session (chat, upload, message using it) must work within 5 s.
        attempts = 0
        while True:
            attempts += 1
            c = self.new_chat(["polling", "websocket"])
            try:
                c.connect()
                c.full_exchange(f"after-kill-{attempts}")
                break
            except Exception as e:
                c.close()
                if time.monotonic() - killed > 5:
                    raise AssertionError(f"no new session within 5 s of the kill ({attempts} tries): {e}")
                time.sleep(0.1)
        new_session_after = time.monotonic() - killed
        assert new_session_after <= 5, f"first new session after {new_session_after:.1f} s"
        assert c.worker() != victim or self.mode == "supervised"
        # The other worker's chats never noticed.
        for i, other in enumerate(others[:6]):
            assert other.sio.connected, "a session on the surviving worker dropped"
            other.round_trip(f"still here {i}")
        detail = (
            f"new session {new_session_after:.2f} s after SIGKILL of worker {victim} "
            f"({attempts} attempt(s)); {len(others)} sessions on the other worker unaffected"
        )
        if self.mode == "supervised":
            back = until(
                "the killed worker to be restarted and ready",
                lambda: (lambda w: w["reachable"] and w["restarts"] > before)(
                    health(self.url)["workers"][victim]
                ),
                90,
            )
            assert back
            detail += f"; worker back after {time.monotonic() - killed:.1f} s"
        close_all(on_victim)
        return detail

    def test_graceful_stop_keeps_other_workers_files(self):
        began = time.monotonic()
        # Sessions on worker 0 (restarted: least loaded, so new visitors go there).
        keep = []
        for i in range(6):
            c = self.new_chat(["polling", "websocket"])
            c.connect()
            if c.worker() == 0:
                keep.append((c, c.full_exchange(f"keep{i}")))
            else:
                close_all([c])
            if len(keep) >= 2:
                break
        assert keep, "no new session landed on worker 0"
        victim = 1
        # Its own chats end first (the close packet sent, their long-polls not waited
        # for), so that its exit is not held by them.
        for c in self.clients:
            if c.sio.connected and c.worker() == victim:
                c.sio.eio.disconnect(abort=True)
        closed = time.monotonic()
        pid = self.pid_of(victim)
        kill(pid, 15)
        until(f"worker {victim} (pid {pid}) to exit", lambda: gone(pid), 40)
        print(f"closing took {closed - began:.1f}s, exit {time.monotonic() - closed:.1f}s", file=sys.stderr)
        for c, (name, content, ref) in keep:
            assert c.download(ref["id"]) == content, "an upload of another worker's chat vanished"
            new = f"after-stop-{uuid.uuid4()}".encode()
            new_ref = c.upload("after.txt", new)
            c.message_with_files("after the stop", [(name, content, ref), ("after.txt", new, new_ref)])
        return (
            f"worker {victim} stopped with SIGTERM (it deleted its own .files); "
            f"{len(keep)} chat(s) on worker 0 kept their uploads and uploaded again"
        )

    def close(self):
        close_all(self.clients)


def close_all(clients):
    """Disconnects clients side by side: one waits for its long-poll to end."""
    if clients:
        with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
            list(pool.map(lambda c: c.close(), clients))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--mode", choices=["supervised", "external"], required=True)
    ap.add_argument("--pid", type=int, action="append", default=[])
    args = ap.parse_args()
    suite = Suite(args.url.rstrip("/"), args.mode, args.pid)
    tests = [
        ("workers_sessions_spread_and_reply", suite.test_sessions_spread_and_reply),
        ("workers_cookieless_session_kept_by_sid", suite.test_cookieless_session_kept_by_sid),
        ("workers_sigkill_one_worker", suite.test_sigkill_one_worker),
    ]
    if args.mode == "supervised":
        tests.append(
            (
                "workers_graceful_stop_keeps_other_workers_files",
                suite.test_graceful_stop_keeps_other_workers_files,
            )
        )
    failed = 0
    prefix = "" if args.mode == "supervised" else "external_"
    try:
        for name, fn in tests:
            name = prefix + name
            began = time.monotonic()
            try:
                detail = fn()
                detail = f"{detail}; {time.monotonic() - began:.1f} s"
                print(f"PASS {name} ({detail})", flush=True)
            except Exception as e:
                failed += 1
                print(f"FAIL {name}: {str(e) or e.__class__.__name__}", flush=True)
                traceback.print_exc(file=sys.stderr)
    finally:
        suite.close()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
