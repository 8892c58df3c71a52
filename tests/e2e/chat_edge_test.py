"""The chat-aware edge against the real Chainlit: chatgate reads the Socket.IO traffic it
relays to count and time chat messages, limit them, and let answers finish on a drain.

Each test starts its own chatgate (the binary under test) in front of the running Chainlit
with the settings it needs, on ports chosen by the OS, and stops it by PID.

Usage: chat_edge_test.py --chatgate BIN --backend-port PORT [--only NAME ...]
Prints one `PASS name` / `FAIL name: why` line per test; exit 1 if any failed.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import requests

from socketio_test import ChatClient, expected_reply


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gate:
    """A chatgate of our own in front of the test's Chainlit."""

    def __init__(self, binary: str, backend_port: int, *args: str):
        self.port = free_port()
        self.admin = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="chatgate-chat-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [
                binary,
                "--listen", f"127.0.0.1:{self.port}",
                "--backend", f"http://127.0.0.1:{backend_port}",
                "--admin-listen", f"127.0.0.1:{self.admin}",
                "--log-format", "json",
                *args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/monitor/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"chatgate did not become ready; log: {self.log_text()[-400:]}")

    def metrics(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.admin}/monitor/metrics", timeout=5).text

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one series, 0 when absent."""
        pattern = re.compile(r"^" + re.escape(name + labels) + r" ([0-9.eE+-]+)$", re.M)
        match = pattern.search(self.metrics())
        return float(match.group(1)) if match else 0.0

    def log_text(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode


def wait_for(what, predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def events_after(client, start, name):
    with client.cond:
        return [data for _, event, data in client.events[start:] if event == name]


def test_metrics_count_messages_and_time_answers(binary, backend_port):
    gate = Gate(binary, backend_port)
    clients = []
    try:
        for transports in (["polling", "websocket"], ["websocket"]):
            c = ChatClient(gate.url, transports)
            c.connect()
            assert c.wait_transport("websocket"), f"transport is {c.transport()!r}"
            clients.append(c)
        sent = 0
        for c in clients:
            for i in range(3):
                c.round_trip(f"count me {i}")
                sent += 1
        wait_for(
            "every answer's task_end to be counted",
            lambda: gate.metric("chatgate_chat_answer_duration_seconds_count") == sent,
        )
        messages = gate.metric("chatgate_chat_messages_total")
        ttft = gate.metric("chatgate_chat_time_to_first_token_seconds_count")
        assert messages == sent, f"chatgate_chat_messages_total {messages} != {sent} sent"
        assert ttft == sent, f"time-to-first-token count {ttft} != {sent} messages"
        assert gate.metric("chatgate_chat_answers_in_progress") == 0, "answers still in progress"
        ttft_sum = gate.metric("chatgate_chat_time_to_first_token_seconds_sum")
        assert 0 < ttft_sum < 10 * sent, f"implausible time-to-first-token sum {ttft_sum}"
        for c in clients:
            c.close()
        wait_for("the per-session log lines", lambda: gate.log_text().count('"chat session"') >= 2)
        lines = [l for l in gate.log_text().splitlines() if '"chat session"' in l]
        assert all('"messages":3' in l and '"answers":3' in l for l in lines), lines
        return f"{sent} messages, {sent} first tokens, {sent} answers timed, in progress back to 0"
    finally:
        for c in clients:
            c.close()
        gate.stop()


def test_rate_limit_refuses_with_a_notice_and_the_chat_goes_on(binary, backend_port):
    gate = Gate(binary, backend_port, "--chat-rate-limit", "2/minute")
    c = ChatClient(gate.url, ["websocket"])
    try:
        c.connect()
        c.round_trip("first")
        c.round_trip("second")
        start = c.send_user_message("third is one too many")
        toast = wait_for("the refusal notice", lambda: events_after(c, start, "toast"))
        assert "too fast" in toast[0]["message"], toast
        time.sleep(1.5)  # an answer would have started by now (replies take ~0.1 s)
        assert not events_after(c, start, "stream_start"), "the refused message was answered"
        assert not events_after(c, start, "task_start"), "the refused message reached Chainlit"
        refused = gate.metric("chatgate_chat_refused_total", '{reason="rate"}')
        assert refused == 1, f"refused counter {refused}"
        # The chat itself keeps working: other events pass, the connection stays.
        assert c.sio.connected and not c.disconnects, "the refusal cost the connection"
        assert "chat message refused" in gate.log_text(), "no log line for the refusal"
        return "third message in a minute: toast shown, not answered, counted, chat still open"
    finally:
        c.close()
        gate.stop()


def test_drain_lets_the_answer_finish(binary, backend_port):
    gate = Gate(binary, backend_port, "--shutdown-grace", "15")
    c = ChatClient(gate.url, ["websocket"])
    try:
        c.connect()
        text = "slow one two three four five six seven eight"
        start = c.send_user_message(text)
        wait_for("the first token", lambda: events_after(c, start, "stream_token"))
        sigterm_at = time.monotonic()
        gate.proc.send_signal(signal.SIGTERM)
        # A message sent during the drain gets the notice instead of being lost.
        time.sleep(0.3)
        during = c.send_user_message("are you still there")
        streamed, tokens, final = c.wait_for_streamed_reply(start, timeout=20)
        want = expected_reply(text)
        assert final == want, f"answer cut by the drain: {final!r} != {want!r}"
        toast = wait_for("the drain notice", lambda: events_after(c, during, "toast"))
        assert "restarting" in toast[0]["message"], toast
        with c.cond:
            c.cond.wait_for(lambda: c.disconnects > 0, timeout=10)
        assert c.disconnects, "not closed after the answer"
        code = gate.proc.wait(timeout=20)
        took = time.monotonic() - sigterm_at
        assert code == 0, f"chatgate exited with {code}"
        assert took < 15, f"chatgate took {took:.1f}s, past its grace period"
        return f"answer whole ({tokens} tokens) after SIGTERM, notice for the late message, exit 0 in {took:.1f}s"
    finally:
        c.close()
        gate.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chatgate", required=True)
    ap.add_argument("--backend-port", type=int, required=True)
    ap.add_argument("--only", action="append")
    args = ap.parse_args()
    tests = {
        "chat_metrics_count_messages_and_time_answers": test_metrics_count_messages_and_time_answers,
        "chat_rate_limit_refuses_with_a_notice_and_the_chat_goes_on": test_rate_limit_refuses_with_a_notice_and_the_chat_goes_on,
        "chat_drain_lets_the_answer_finish": test_drain_lets_the_answer_finish,
    }
    failed = 0
    for name, fn in tests.items():
        if args.only and name not in args.only:
            continue
        try:
            detail = fn(args.chatgate, args.backend_port)
            print(f"PASS {name}" + (f" ({detail})" if detail else ""), flush=True)
        except Exception as e:
            failed += 1
            print(f"FAIL {name}: {str(e) or e.__class__.__name__}", flush=True)
            traceback.print_exc(file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
