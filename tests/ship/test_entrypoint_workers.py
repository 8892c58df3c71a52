"""entrypoint.sh with several workers (CHATGATE_WORKERS other than 1): chatgate starts and
supervises the stand-in backends itself, the script supervises chatgate alone.

Each test checks the script's exit status, what it says, and that nothing it started (chatgate,
the workers) is left running afterwards.
"""

from __future__ import annotations

import json
import shlex
import signal
import socket
from pathlib import Path

import pytest

from conftest import ENTRYPOINT, Events, free_port, http_get, pids_with_token, standin_cmd, wait_until


def free_port_pair() -> int:
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two consecutive free ports")


class Workers:
    """One run of entrypoint.sh in workers mode."""

    def __init__(self, launcher, chatgate_bin: str, tmp_path: Path) -> None:
        self.launcher = launcher
        self.port = free_port()
        self.base = free_port_pair()
        self.events = Events(tmp_path / "worker-events.txt")
        app = tmp_path / "app"
        app.mkdir()
        argv = standin_cmd(0, "--events", str(self.events.path))
        argv[argv.index("--port") + 1] = "{port}"
        self.env = {
            "CHATGATE_BIN": chatgate_bin,
            "CHATGATE_LISTEN": f"127.0.0.1:{self.port}",
            "CHATGATE_SHUTDOWN_GRACE": "3",
            "CHATGATE_SHUTDOWN_DELAY": "0",
            "CHATGATE_HEALTH_INTERVAL": "0.5",
            "CHATGATE_WORKERS": "2",
            "CHATGATE_WORKER_PORT_BASE": str(self.base),
            "CHATGATE_WORKER_APP_DIR": str(app),
            "CHATGATE_WORKER_STOP_TIMEOUT": "3",
            "WORKER_CMD": shlex.join(argv),
            "RUST_LOG": "info",
        }
        self.started = None

    def run(self, **env: str):
        self.started = self.launcher.start(["bash", str(ENTRYPOINT)], {**self.env, **env}, "entrypoint")
        return self.started

    def output(self) -> str:
        return self.started.output()

    def health(self) -> dict:
        status, body = http_get(f"http://127.0.0.1:{self.port}/monitor/health")
        return json.loads(body) if status in (200, 503) and body else {}

    def both_up(self) -> bool:
        return self.health().get("backend", {}).get("workers_up") == 2

    def wait(self, timeout: float) -> int:
        return self.started.proc.wait(timeout=timeout)

    def assert_nothing_left(self) -> None:
        assert wait_until(lambda: not pids_with_token(self.started.token), 3), (
            f"left running: {pids_with_token(self.started.token)}\n{self.output()}"
        )


@pytest.fixture
def workers(launcher, chatgate_bin, tmp_path) -> Workers:
    return Workers(launcher, chatgate_bin, tmp_path)


def test_chatgate_starts_the_workers_and_sigterm_stops_everything(workers: Workers) -> None:
    workers.run()
    assert wait_until(workers.both_up, 20), workers.output()
    pids = [w["pid"] for w in workers.health()["workers"]]
    assert all(pids), workers.health()
    ports = sorted(int(w["url"].rsplit(":", 1)[1]) for w in workers.health()["workers"])
    assert ports == [workers.base, workers.base + 1]
    out = workers.output()
    assert "starting chatgate with CHATGATE_WORKERS=2" in out, out
    assert "starting backend" not in out, "the script starts no backend of its own"

    workers.started.proc.send_signal(signal.SIGTERM)
    assert workers.wait(30) == 0, workers.output()
    assert len([t for t, e in workers.events.all() if e == "sigterm"]) == 2, workers.events.all()
    assert '"workers stopped"' in workers.output() or "workers stopped" in workers.output()
    workers.assert_nothing_left()


def test_a_worker_that_dies_is_restarted_by_chatgate_not_the_script(workers: Workers) -> None:
    workers.run()
    assert wait_until(workers.both_up, 20), workers.output()
    victim = workers.health()["workers"][0]["pid"]
    import os

    os.kill(victim, signal.SIGKILL)
    assert wait_until(
        lambda: (w := workers.health().get("workers", [{}])[0]).get("restarts") == 1
        and w.get("reachable") is True,
        20,
    ), workers.output()
    assert workers.started.proc.poll() is None, "the script keeps running"
    workers.started.proc.send_signal(signal.SIGTERM)
    assert workers.wait(30) == 0, workers.output()
    workers.assert_nothing_left()


def test_an_invalid_worker_count_is_rejected_before_anything_starts(workers: Workers) -> None:
    workers.run(CHATGATE_WORKERS="many")
    assert workers.wait(10) == 2
    assert "CHATGATE_WORKERS must be a positive number or auto" in workers.output()
    assert workers.events.first("listening") is None
    workers.assert_nothing_left()
