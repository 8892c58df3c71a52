"""Dockerfile invariants hadolint does not know about (no Docker engine here to build it)."""

from __future__ import annotations

import re

import pytest

from conftest import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    rows = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            rows.append((keyword.upper(), rest.strip()))
    return rows


def stages() -> dict[str, list[tuple[str, str]]]:
    by_name, current = {}, None
    for keyword, rest in instructions():
        if keyword == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            by_name[current] = []
        if current:
            by_name[current].append((keyword, rest))
    return by_name


def arg_defaults() -> dict[str, str]:
    return dict(
        rest.split("=", 1) for keyword, rest in instructions() if keyword == "ARG" and "=" in rest
    )


def test_build_and_runtime_images_are_on_the_same_debian_release() -> None:
    args = arg_defaults()
    assert args["RUST_IMAGE"].endswith("-bookworm")
    assert args["PYTHON_IMAGE"].endswith("-slim-bookworm")
    assert args["DISTROLESS_IMAGE"].startswith("gcr.io/distroless/cc-debian12")


def test_stages_and_default_target() -> None:
    names = list(stages())
    assert {"builder", "chatgate", "app"} <= set(names)
    assert names[-1] == "app", "a plain `docker build .` gives chatgate + Chainlit"


@pytest.mark.parametrize("stage", ["chatgate", "app"])
def test_runtime_stages_run_as_a_numeric_non_root_user_with_healthcheck(stage: str) -> None:
    steps = stages()[stage]
    users = [rest for keyword, rest in steps if keyword == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), users
    assert ("EXPOSE", "8000") in steps
    health = [rest for keyword, rest in steps if keyword == "HEALTHCHECK"]
    assert health and re.search(r'CMD \["(/usr/local/bin/)?chatgate", "healthcheck"\]', health[0])


def test_app_stage_uses_tini_without_group_kill_and_the_entrypoint() -> None:
    steps = stages()["app"]
    entrypoint = [rest for keyword, rest in steps if keyword == "ENTRYPOINT"][-1]
    assert entrypoint.startswith('["/usr/bin/tini", "--"')
    assert '"-g"' not in entrypoint
    assert "entrypoint.sh" in entrypoint


def test_app_stage_installs_no_curl_or_netcat_and_prepares_chainlit_paths() -> None:
    runs = " ".join(rest for keyword, rest in stages()["app"] if keyword == "RUN")
    assert not re.search(r"\b(curl|wget|netcat|ncat)\b", runs)
    assert "/app/.chainlit" in runs and "/app/.files" in runs and "chown app:app" in runs
    env = " ".join(rest for keyword, rest in stages()["app"] if keyword == "ENV")
    assert "HOME=/home/app" in env


def test_app_dir_is_a_build_arg_defaulting_to_the_example() -> None:
    assert arg_defaults()["APP_DIR"] == "examples/chainlit"
    dockerignore = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert "target" in dockerignore and ".git" in dockerignore
    assert "Dockerfile" not in dockerignore, "az acr build needs it in the uploaded context"
