"""The probe paths and settings in probes.yaml, against a real chatgate and the stand-in backend."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time

import pytest
import yaml

from conftest import REPO, free_port, http_get, port_open, standin_cmd, wait_until

# chatgate probes its backend in the background (every 5 s by default): allow a few rounds.
PROBE_SETTLE = 15


def start_chatgate(launcher, chatgate_bin: str, port: int, backend_port: int):
    started = launcher.start(
        [chatgate_bin, "--listen", f"127.0.0.1:{port}", "--backend", f"http://127.0.0.1:{backend_port}"],
        env={"RUST_LOG": "info"},
        name="chatgate",
    )
    assert wait_until(lambda: port_open(port), 10), started.output()
    return started


def test_liveness_answers_200_while_the_backend_is_down(launcher, chatgate_bin) -> None:
    port, backend_port = free_port(), free_port()
    start_chatgate(launcher, chatgate_bin, port, backend_port)
    status, _ = http_get(f"http://127.0.0.1:{port}/monitor/live")
    assert status == 200


def test_readiness_is_503_while_the_backend_is_down(launcher, chatgate_bin) -> None:
    port, backend_port = free_port(), free_port()
    chatgate = start_chatgate(launcher, chatgate_bin, port, backend_port)
    url = f"http://127.0.0.1:{port}/monitor/health"
    # Give the background prober time to run at least once, then it must still say 503.
    wait_until(lambda: http_get(url)[0] == 503, PROBE_SETTLE)
    status, body = http_get(url)
    assert status == 503, (body, chatgate.output())


def test_readiness_turns_200_once_the_backend_answers(launcher, chatgate_bin) -> None:
    port, backend_port = free_port(), free_port()
    chatgate = start_chatgate(launcher, chatgate_bin, port, backend_port)
    url = f"http://127.0.0.1:{port}/monitor/health"
    assert http_get(url)[0] == 503

    launcher.start(standin_cmd(backend_port), env={}, name="backend")
    assert wait_until(lambda: port_open(backend_port), 10)
    assert wait_until(lambda: http_get(url)[0] == 200, PROBE_SETTLE), (
        http_get(url),
        chatgate.output()[-2000:],
    )
    # Liveness stays 200 throughout.
    assert http_get(f"http://127.0.0.1:{port}/monitor/live")[0] == 200


def test_chatgate_accepts_the_settings_shipped_in_probes_yaml_and_the_dockerfile(chatgate_bin) -> None:
    container = yaml.safe_load((REPO / "probes.yaml").read_text())["properties"]["template"]["containers"][0]
    env = {item["name"]: str(item["value"]) for item in container["env"]}
    dockerfile = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    env.update(re.findall(r"\b(CHATGATE_[A-Z_]+)=(\S+)", dockerfile))
    assert "CHATGATE_TRUSTED_PROXIES" in env and "CHATGATE_LISTEN" in env
    clean = {key: value for key, value in os.environ.items() if not key.startswith("CHATGATE_")}
    result = subprocess.run(
        [chatgate_bin, "check-config"], env={**clean, **env}, capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 0, result.stderr
    assert "100.64.0.0/10" in result.stdout, result.stdout


def test_sigterm_as_soon_as_chatgate_accepts_is_still_a_clean_stop(launcher, chatgate_bin) -> None:
    outcomes = []
    for _ in range(5):
        port = free_port()
        started = launcher.start(
            [chatgate_bin, "--listen", f"127.0.0.1:{port}", "--backend", f"http://127.0.0.1:{free_port()}"],
            env={},
            name="chatgate-early-term",
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.001)
        started.proc.send_signal(signal.SIGTERM)
        outcomes.append(started.proc.wait(timeout=30))
    assert outcomes == [0] * 5, f"exit statuses {outcomes} (-15: killed by SIGTERM, no drain)"
