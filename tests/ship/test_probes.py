"""probes.yaml: ACA's probe schema and limits, and the values deploy.ps1 relies on."""

from __future__ import annotations

import ipaddress

import pytest
import yaml

from conftest import REPO

LIMITS = {
    "initialDelaySeconds": (1, 60),
    "periodSeconds": (1, 240),
    "timeoutSeconds": (1, 240),
    "failureThreshold": (1, 10),
}
SUCCESS_LIMITS = {"Liveness": (1, 1), "Startup": (1, 1), "Readiness": (1, 10)}
EXPECTED_PATHS = {
    "Liveness": "/monitor/live",
    "Readiness": "/monitor/health",
    "Startup": "/monitor/health",
}
# entrypoint.sh's default backend wait: BACKEND_WAIT_ATTEMPTS x BACKEND_WAIT_INTERVAL.
ENTRYPOINT_BACKEND_WAIT = 60 * 1


@pytest.fixture(scope="module")
def container() -> dict:
    template = yaml.safe_load((REPO / "probes.yaml").read_text())
    containers = template["properties"]["template"]["containers"]
    assert len(containers) == 1, "deploy.ps1 merges exactly one container"
    return containers[0]


@pytest.fixture(scope="module")
def probes(container: dict) -> dict[str, dict]:
    by_type = {probe["type"]: probe for probe in container["probes"]}
    assert len(by_type) == len(container["probes"]), "one probe per type"
    return by_type


def test_container_names_chatgate_with_an_image_placeholder_and_resources(container: dict) -> None:
    assert container["name"] == "chatgate"
    assert container["image"].endswith(":TAG")
    assert container["resources"] == {"cpu": 0.5, "memory": "1.0Gi"}


def test_every_probe_type_is_present_once_on_port_8000_with_its_path(probes: dict) -> None:
    assert set(probes) == {"Liveness", "Readiness", "Startup"}
    for kind, probe in probes.items():
        assert set(probe) <= {"type", "httpGet", *LIMITS, "successThreshold"}, kind
        assert probe["httpGet"] == {"path": EXPECTED_PATHS[kind], "port": 8000}, kind


@pytest.mark.parametrize("kind", ["Liveness", "Readiness", "Startup"])
def test_probe_values_are_within_aca_limits(probes: dict, kind: str) -> None:
    probe = probes[kind]
    for key, (low, high) in {**LIMITS, "successThreshold": SUCCESS_LIMITS[kind]}.items():
        value = probe[key]
        assert isinstance(value, int) and not isinstance(value, bool), (kind, key, value)
        assert low <= value <= high, f"{kind}.{key}={value} outside {low}..{high}"
    assert probe["timeoutSeconds"] <= probe["periodSeconds"], kind


def test_startup_budget_covers_chainlit_cold_start_and_the_entrypoint_wait(probes: dict) -> None:
    startup = probes["Startup"]
    budget = startup["initialDelaySeconds"] + startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 30, "Chainlit's cold start takes 10-30 s"
    assert budget > ENTRYPOINT_BACKEND_WAIT, "a slow backend should fail in entrypoint.sh first"


def test_trusted_proxies_cover_private_and_shared_address_space(container: dict) -> None:
    env = {item["name"]: item["value"] for item in container["env"]}
    networks = [ipaddress.ip_network(cidr) for cidr in env["CHATGATE_TRUSTED_PROXIES"].split(",")]
    for address in ("10.0.0.4", "172.16.5.6", "192.168.1.1", "100.100.0.10"):
        assert any(ipaddress.ip_address(address) in net for net in networks), address
    assert not any(ipaddress.ip_address("20.1.2.3") in net for net in networks)


def test_shutdown_budget_fits_acas_30_second_grace(container: dict) -> None:
    env = {item["name"]: item["value"] for item in container["env"]}
    chatgate_stop = int(env["CHATGATE_SHUTDOWN_DELAY"]) + int(env["CHATGATE_SHUTDOWN_GRACE"]) + 2
    backend_stop = 5  # entrypoint.sh's BACKEND_STOP_TIMEOUT default
    assert chatgate_stop + backend_stop < 30
