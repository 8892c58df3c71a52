"""deploy.ps1 without PowerShell: it parses, and every az command it runs uses flags that exist.

The allowed flags were read off the Azure CLI reference (az acr build, az acr show,
az containerapp show/update, az containerapp ingress update/enable,
az containerapp ingress sticky-sessions set) and the CLI's own argument definitions.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import tree_sitter_powershell
from tree_sitter import Language, Parser

from conftest import HERE, REPO

DEPLOY = REPO / "deploy.ps1"
GLOBAL = {"--output", "--query", "--only-show-errors", "--debug", "--verbose", "--subscription"}
AZ_FLAGS = {
    ("acr", "show"): {"--name", "--resource-group"},
    ("acr", "build"): {"--registry", "--image", "--file", "--target", "--build-arg", "--platform"},
    ("containerapp", "show"): {"--name", "--resource-group"},
    ("containerapp", "update"): {"--name", "--resource-group", "--yaml"},
    ("containerapp", "ingress", "update"): {
        "--name", "--resource-group", "--target-port", "--transport", "--type", "--allow-insecure",
    },
    ("containerapp", "ingress", "enable"): {
        "--name", "--resource-group", "--target-port", "--transport", "--type", "--allow-insecure",
    },
    ("containerapp", "ingress", "sticky-sessions", "set"): {"--name", "--resource-group", "--affinity"},
}


def az_calls() -> list[list[str]]:
    """The argument lists passed to Invoke-Az: `Invoke-Az [-Capture] @('a', 'b', $x, ...)`."""
    source = DEPLOY.read_text()
    calls = []
    for match in re.finditer(r"Invoke-Az(?:\s+-Capture)?\s+@\(", source):
        depth, index = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(source[index], 0)
            index += 1
        body = source[match.end() : index - 1]
        calls.append(re.findall(r"'([^']*)'|\"([^\"]*)\"|(\$\w+)", body))
    return [[next(part for part in token if part) for token in call] for call in calls]


def test_deploy_ps1_parses_without_error_or_missing_nodes() -> None:
    result = subprocess.run(
        [sys.executable, str(HERE / "check_ps1.py"), str(DEPLOY)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_parse_check_rejects_broken_powershell(tmp_path) -> None:
    broken = tmp_path / "broken.ps1"
    broken.write_text("function f {\n  if ($x { 'unclosed'\n")
    result = subprocess.run(
        [sys.executable, str(HERE / "check_ps1.py"), str(broken)], capture_output=True, text=True
    )
    assert result.returncode == 1 and "ERROR" in result.stdout


def test_every_az_command_uses_only_flags_that_exist() -> None:
    calls = az_calls()
    seen = set()
    for args in calls:
        words = tuple(arg for arg in args if not arg.startswith("-") and not arg.startswith("$"))
        command = next((key for key in sorted(AZ_FLAGS, key=len, reverse=True) if words[: len(key)] == key), None)
        assert command, f"unexpected az command: {args}"
        seen.add(command)
        flags = {arg for arg in args if arg.startswith("--")}
        unknown = flags - AZ_FLAGS[command] - GLOBAL
        assert not unknown, f"az {' '.join(command)}: unknown flags {unknown}"
    assert seen == set(AZ_FLAGS), f"missing steps: {set(AZ_FLAGS) - seen}"
    assert "--enable-websocket" not in DEPLOY.read_text()


def test_ingress_points_at_chatgate_over_http_and_affinity_is_sticky() -> None:
    calls = {tuple(call[:4]): call for call in az_calls()}
    update = calls[("containerapp", "ingress", "update", "--name")]
    assert update[update.index("--target-port") + 1] == "8000"
    assert update[update.index("--transport") + 1] == "http"
    sticky = next(call for call in az_calls() if "sticky-sessions" in call)
    assert sticky[sticky.index("--affinity") + 1] == "sticky"


def test_script_has_help_dry_run_and_what_if() -> None:
    source = DEPLOY.read_text()
    tree = Parser(Language(tree_sitter_powershell.language())).parse(source.encode())
    assert not tree.root_node.has_error
    for needle in (".SYNOPSIS", ".PARAMETER DryRun", ".EXAMPLE", "SupportsShouldProcess"):
        assert needle in source, needle
    params = source[source.index("param(") : source.index("Set-StrictMode")]
    for name in ("$ResourceGroup", "$AppName", "$Registry", "$ImageTag", "$DryRun"):
        assert name in params, name
    # -WhatIf must behave like -DryRun: no az command runs.
    assert "$DryRun = [bool]($DryRun -or $WhatIfPreference)" in source


@pytest.mark.parametrize("path", ["/monitor/health", "/ws/socket.io/?EIO=4&transport=websocket"])
def test_verification_goes_through_the_public_url(path: str) -> None:
    source = DEPLOY.read_text()
    assert f"https://$Fqdn{path}" in source or f"wss://$Fqdn{path}" in source
    assert "VERDICT: PASS" in source and "VERDICT: FAIL" in source
