"""Fixtures for the ship tests: free loopback ports, the stand-in backend, chatgate, and the
real entrypoint.sh, each started here and stopped by PID at the end of its test.

The chatgate under test is target/debug/chatgate (run.sh builds it), or CHATGATE_UNDER_TEST
(e.g. target/release/chatgate).
Every process a test starts carries SHIP_TEST_TOKEN=<unique> in its environment, which its
children inherit: that is how the tests find leftovers (orphans) after the script is gone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ENTRYPOINT = REPO / "entrypoint.sh"
STANDIN = HERE / "standin_backend.py"

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# A suite started in the background by a non-interactive shell (`cmd &`) inherits SIGINT
# ignored, and every child inherits that through exec: entrypoint.sh could then not trap
# the SIGINT its test sends (a non-interactive shell cannot trap a signal ignored on entry)
# and the test would wait out its timeout. A handler set here is reset to the default in
# each child at exec, so every child starts with SIGINT deliverable, as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Status and body; (0, b"") when nothing answers. No redirects followed, no proxy."""
    try:
        with NO_PROXY.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def pids_with_token(token: str) -> list[int]:
    """Live processes whose environment carries SHIP_TEST_TOKEN=token (zombies excluded)."""
    needle = f"SHIP_TEST_TOKEN={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def standin_cmd(port: int, *extra: str) -> list[str]:
    return [sys.executable, str(STANDIN), "--port", str(port), *extra]


@dataclass
class Events:
    """Reads the stand-in backend's event file: `<unix time> <event ...>` per line."""

    path: Path

    def all(self) -> list[tuple[float, str]]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            stamp, _, event = line.partition(" ")
            rows.append((float(stamp), event))
        return rows

    def first(self, prefix: str) -> float | None:
        for stamp, event in self.all():
            if event.startswith(prefix):
                return stamp
        return None


@dataclass
class Started:
    proc: subprocess.Popen
    token: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Launcher:
    """Starts processes for one test and, at teardown, kills whatever of them is left, by PID."""

    tmp: Path
    started: list[Started] = field(default_factory=list)

    def start(self, argv: list[str], env: dict[str, str], name: str) -> Started:
        token = uuid.uuid4().hex
        log = self.tmp / f"{name}.log"
        # chatgate's admin (metrics) listener defaults to the fixed 0.0.0.0:9100: give each
        # run a free loopback port so parallel runs and other suites can't collide on it.
        full_env = {
            **os.environ,
            "CHATGATE_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
            **env,
            "SHIP_TEST_TOKEN": token,
        }
        with open(log, "wb") as sink:
            proc = subprocess.Popen(
                argv,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
                start_new_session=True,
            )
        started = Started(proc, token, log)
        self.started.append(started)
        return started

    def cleanup(self) -> None:
        for started in self.started:
            if started.proc.poll() is None:
                started.proc.kill()
                started.proc.wait(timeout=5)
            for pid in pids_with_token(started.token):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launch = Launcher(tmp_path)
    yield launch
    launch.cleanup()


def chatgate_path() -> str:
    return os.environ.get("CHATGATE_UNDER_TEST") or str(REPO / "target" / "debug" / "chatgate")


@pytest.fixture(scope="session")
def chatgate_bin(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The chatgate binary, once it is known to serve /monitor/live; fails the test otherwise."""
    path = chatgate_path()
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} missing: run `cargo build` (tests/ship/run.sh does)")
    port, backend = free_port(), free_port()
    log = tmp_path_factory.mktemp("chatgate-smoke") / "chatgate.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [path, "--listen", f"127.0.0.1:{port}", "--backend", f"http://127.0.0.1:{backend}"],
            env={**os.environ, "CHATGATE_ADMIN_LISTEN": f"127.0.0.1:{free_port()}"},
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        serves = wait_until(lambda: http_get(f"http://127.0.0.1:{port}/monitor/live")[0] == 200, 10)
    finally:
        proc.kill()
        proc.wait(timeout=5)
    if not serves:
        pytest.fail(
            f"{path} does not answer GET /monitor/live within 10 s (exit {proc.returncode}); "
            f"log:\n{log.read_text(errors='replace')[-2000:]}"
        )
    return path
