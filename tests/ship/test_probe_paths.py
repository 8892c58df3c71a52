"""The probe paths in probes.yaml, against a real chatgate and the stand-in backend."""

from __future__ import annotations

from conftest import free_port, http_get, port_open, standin_cmd, wait_until

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
