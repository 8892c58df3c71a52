"""deploy/kubernetes: schemas, kustomize builds, and the facts it must share with the rest.

- Every Kubernetes object (base and both overlays, as kustomize renders them) validates in strict
  mode (unknown fields rejected) against the Kubernetes JSON schemas that the PyPI package
  kubernetes-validate ships, for each version in SUPPORTED.
- The HTTPRoute (a CRD, in none of those schemas) validates against @kubernetes-models/gateway-api
  (npm; schemas compiled from Gateway API's Go types, experimental fields included) through
  validate_httproute.mjs, its field names are checked against that package's type declarations,
  and its session persistence uses only the fields that Gateway API v1.1-v1.6's experimental
  CRDs share.
- kustomize itself renders each entry point (`kustomize build`, or `kubectl kustomize`).
- Probes, ports, user, image, entrypoint, drain budget, body limit and cookie settings are read
  from probes.yaml, the Dockerfile, entrypoint.sh and the chatgate under test, and compared.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import ENTRYPOINT, REPO, free_port, http_get, port_open, standin_cmd, wait_until

K8S = REPO / "deploy" / "kubernetes"
ENTRY_POINTS = {
    "default": K8S,
    "ingress-nginx": K8S / "overlays" / "ingress-nginx",
    "gateway-api": K8S / "overlays" / "gateway-api",
}
BASE_KINDS = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
INGRESS_KIND = {"ingress-nginx": "Ingress", "gateway-api": "HTTPRoute"}
# Kubernetes minor versions the manifests support (PDB unhealthyPodEvictionPolicy is on by default
# from 1.27, the oldest release still under any vendor's extended support is about 1.29);
# kubernetes-validate 1.37.0 ships schemas for 1.25-1.37.
SUPPORTED = [f"1.{minor}" for minor in range(29, 38)]
NODE_MODULES = REPO / "target" / "ship-node" / "node_modules"
GATEWAY_MODELS = NODE_MODULES / "@kubernetes-models" / "gateway-api" / "gateway.networking.k8s.io" / "v1"
SHIP_TOOLS_KUBECTL = REPO / "target" / "ship-tools" / "bin" / "kubectl"
# Rule fields that Gateway API's experimental HTTPRoute CRD has from v1.1.0 on, and the
# sessionPersistence fields that v1.1.0 through v1.6.x all have (idleTimeout went in v1.6.0;
# v1.7 replaces sessionName/cookieConfig with `cookie`). Read off the CRDs of those releases.
RULE_FIELDS_SINCE_V1_1 = {"matches", "filters", "backendRefs", "timeouts", "sessionPersistence"}
SESSION_PERSISTENCE_V1_1_TO_V1_6 = {"sessionName", "type", "absoluteTimeout", "cookieConfig"}
# Every ingress-nginx annotation the Ingress may use (its annotations reference). The controller
# ignores a name it doesn't know, so a typo would silently drop the setting.
INGRESS_NGINX_ANNOTATIONS = {
    "affinity",
    "affinity-mode",
    "session-cookie-name",
    "session-cookie-path",
    "session-cookie-max-age",
    "session-cookie-expires",
    "session-cookie-samesite",
    "session-cookie-secure",
    "session-cookie-change-on-failure",
    "proxy-read-timeout",
    "proxy-send-timeout",
    "proxy-body-size",
    "proxy-request-buffering",
}
# What tini, the kubelet and process exit may take beyond entrypoint.sh's own bounded waits.
STOP_SLACK = 3


# ---- reading the files -----------------------------------------------------------------------


def load_yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomize_command() -> list[str]:
    """kustomize itself: a `kustomize` binary, else kubectl's built-in copy (run.sh provides one)."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    for kubectl in (shutil.which("kubectl"), str(SHIP_TOOLS_KUBECTL)):
        if kubectl and os.access(kubectl, os.X_OK):
            return [kubectl, "kustomize"]
    pytest.fail("no kustomize or kubectl found: run tests/ship/run.sh, which installs one")


@functools.cache
def build(entry: str) -> tuple[dict, ...]:
    result = subprocess.run(
        [*kustomize_command(), str(ENTRY_POINTS[entry])], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kustomize build {entry} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc is not None)


def one(docs, kind: str) -> dict:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def deployment() -> dict:
    return one(build("default"), "Deployment")


def pod_spec() -> dict:
    return deployment()["spec"]["template"]["spec"]


def main_container() -> dict:
    containers = pod_spec()["containers"]
    assert len(containers) == 1, "chatgate and Chainlit share one container, as in the image"
    return containers[0]


def container_env() -> dict[str, str]:
    env = main_container()["env"]
    assert all(set(item) == {"name", "value"} for item in env), "plain values only"
    return {item["name"]: item["value"] for item in env}


def container_port(name_or_number) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    ports = {port["name"]: port["containerPort"] for port in main_container()["ports"]}
    return ports[name_or_number]


def aca_container() -> dict:
    return yaml.safe_load((REPO / "probes.yaml").read_text())["properties"]["template"]["containers"][0]


def dockerfile_app_stage() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    steps, current = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            current = rest.split(" AS ")[-1].strip()
        elif current == "app":
            steps.append((keyword.upper(), rest.strip()))
    assert steps, "no `app` stage in the Dockerfile"
    return steps


def app_stage(keyword: str) -> list[str]:
    return [rest for key, rest in dockerfile_app_stage() if key == keyword]


def seconds(value: str) -> float:
    """chatgate's check-config durations: `20s`, `1.5s`, `off`."""
    return 0.0 if value == "off" else float(value.rstrip("s"))


def duration_seconds(value: str) -> int:
    """A Gateway API Duration (GEP-2257): `12h`, `1h30m`, `500ms`."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, value
    return int(sum(int(n) * units[u] for n, u in parts))


def nginx_size_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", value).groups()
    return int(number) * 1024 ** {"": 0, "k": 1, "m": 2, "g": 3}[unit.lower()]


def quantity(value) -> float:
    """A Kubernetes resource quantity, e.g. 500m, 1, 1Gi, 1.0Gi, as a number."""
    number, suffix = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()
    scale = {"": 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    return float(number) * scale[suffix]


def clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CHATGATE_", "BACKEND_"))}
    return {**env, **extra}


def check_config(chatgate_bin: str, env: dict[str, str]) -> dict[str, str]:
    result = subprocess.run(
        [chatgate_bin, "check-config"], env=clean_env(**env), capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 0, f"chatgate rejects the Deployment's settings: {result.stderr}"
    return dict(line.split(" = ", 1) for line in result.stdout.splitlines() if " = " in line)


def help_defaults(chatgate_bin: str) -> dict[str, str]:
    """{CHATGATE_X: default} from `chatgate --help` (clap's `[env: X=] [default: Y]`)."""
    text = subprocess.run([chatgate_bin, "--help"], capture_output=True, text=True, timeout=10).stdout
    flat = " ".join(text.split())
    return dict(re.findall(r"\[env: (CHATGATE_[A-Z_]+)=[^\]]*\] \[default: ([^\]]*)\]", flat))


# ---- schemas ---------------------------------------------------------------------------------


def rendered_objects() -> list[dict]:
    """Every object of every entry point, once per (kind, name)."""
    unique = {}
    for entry in ENTRY_POINTS:
        for doc in build(entry):
            unique[(doc["kind"], doc["metadata"]["name"])] = doc
    return list(unique.values())


def test_kubernetes_validate_ships_every_supported_version() -> None:
    shipped = {kubernetes_validate.utils.major_minor(v) for v in kubernetes_validate.utils.all_versions()}
    assert set(SUPPORTED) <= shipped, sorted(set(SUPPORTED) - shipped)


@pytest.mark.parametrize("version", SUPPORTED)
def test_every_object_validates_strictly_against_the_kubernetes_schemas(version: str) -> None:
    objects = rendered_objects()
    assert {doc["kind"] for doc in objects} == BASE_KINDS | set(INGRESS_KIND.values())
    checked = []
    for doc in objects:
        if doc["apiVersion"].startswith("gateway.networking.k8s.io/"):
            continue  # a CRD: test_httproute_validates_against_the_gateway_api_schema
        try:
            validated = kubernetes_validate.validate(doc, f"{version}.0", strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {path}: {error.message}")
        assert validated == version, f"validated against {validated}, not {version}"
        checked.append(doc["kind"])
    assert set(checked) == BASE_KINDS | {"Ingress"}


def declared_fields(type_file: Path) -> dict[str, Path | None]:
    """A kubernetes-models class's fields: {name: the .d.ts of its type when that is a class}."""
    text = type_file.read_text()
    imports = {
        name: (type_file.parent / target).with_suffix(".d.ts")
        for name, target in re.findall(r'import \{ (\w+) \} from "(\./[\w]+)\.js";', text)
    }
    body = re.search(r"export declare class \w+ extends Model<\w+> implements \w+ \{\n(.*?)\n\}", text, re.S)
    assert body, f"no model class in {type_file}"
    fields = {}
    for name, type_expr in re.findall(r'^\s+"([^"]+)"\??: (.+);$', body.group(1), re.M):
        inner = re.fullmatch(r"(?:Array<)?(\w+)>?", type_expr)
        target = imports.get(inner.group(1)) if inner else None
        fields[name] = target if target and "export declare class" in target.read_text() else None
    return fields


def unknown_fields(value, type_file: Path, path: str) -> list[str]:
    if isinstance(value, list):
        return [bad for i, item in enumerate(value) for bad in unknown_fields(item, type_file, f"{path}[{i}]")]
    fields = declared_fields(type_file)
    problems = []
    for key, item in value.items():
        if key not in fields:
            problems.append(f"{path}.{key}")
        elif fields[key] is not None:
            problems += unknown_fields(item, fields[key], f"{path}.{key}")
    return problems


def httproute() -> dict:
    return one(build("gateway-api"), "HTTPRoute")


def test_httproute_validates_against_the_gateway_api_schema() -> None:
    node = shutil.which("node")
    assert node, "node missing: run tests/ship/run.sh"
    assert GATEWAY_MODELS.is_dir(), f"{GATEWAY_MODELS} missing: run tests/ship/run.sh"
    route = httproute()
    result = subprocess.run(
        [node, str(Path(__file__).with_name("validate_httproute.mjs")), str(NODE_MODULES)],
        input=json.dumps([route]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{"name": "chatgate", "errors": []}]
    # The schema allows unknown fields (an API server would prune them): check the names.
    assert set(route["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    assert unknown_fields(route["spec"], GATEWAY_MODELS / "HTTPRouteSpec.d.ts", "spec") == []


def test_the_gateway_api_schema_check_catches_mistakes() -> None:
    """The two checks above are not vacuous: they reject a bad enum and a misspelt field."""
    route = json.loads(json.dumps(httproute()))
    route["spec"]["rules"][0]["sessionPersistence"]["type"] = "Sticky"
    result = subprocess.run(
        ["node", str(Path(__file__).with_name("validate_httproute.mjs")), str(NODE_MODULES)],
        input=json.dumps([route]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "sessionPersistence/type" in json.loads(result.stdout)[0]["errors"][0]
    route["spec"]["rules"][0]["sessionPersistance"] = route["spec"]["rules"][0].pop("sessionPersistence")
    problems = unknown_fields(route["spec"], GATEWAY_MODELS / "HTTPRouteSpec.d.ts", "spec")
    assert problems == ["spec.rules[0].sessionPersistance"]


def test_httproute_uses_only_fields_of_gateway_api_v1_1_to_v1_6() -> None:
    for rule in httproute()["spec"]["rules"]:
        assert set(rule) <= RULE_FIELDS_SINCE_V1_1, set(rule) - RULE_FIELDS_SINCE_V1_1
        persistence = rule["sessionPersistence"]
        assert set(persistence) <= SESSION_PERSISTENCE_V1_1_TO_V1_6, set(persistence)
        # The CRD's CEL rules (the schema above can't express them).
        if persistence.get("cookieConfig", {}).get("lifetimeType") == "Permanent":
            assert "absoluteTimeout" in persistence
        assert "cookieConfig" not in persistence or persistence["type"] == "Cookie"


# ---- kustomize -------------------------------------------------------------------------------


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def test_kustomization_files_list_what_exists_and_leave_no_manifest_out() -> None:
    listed = set()
    for path in kustomizations():
        doc = yaml.safe_load(path.read_text())
        kind = doc["kind"]
        assert (doc["apiVersion"], kind) in {
            ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
            ("kustomize.config.k8s.io/v1alpha1", "Component"),
        }, path
        assert (kind == "Component") == (path.parent.parent.name == "components"), path
        assert set(doc) <= {"apiVersion", "kind", "resources", "components", "images"}, path
        for entry in doc.get("resources", []):
            target = (path.parent / entry).resolve()
            if target.is_dir():
                assert yaml.safe_load((target / "kustomization.yaml").read_text())["kind"] == "Kustomization"
            else:
                assert target.is_file(), f"{path}: {entry} missing"
                assert load_yaml_docs(target), f"{target} is empty"
                listed.add(target)
        for entry in doc.get("components", []):
            target = (path.parent / entry).resolve() / "kustomization.yaml"
            assert yaml.safe_load(target.read_text())["kind"] == "Component", f"{path}: {entry}"
    manifests = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert manifests == listed, f"not in any kustomization: {sorted(map(str, manifests - listed))}"


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_kustomize_builds_each_entry_point_with_one_ingress_at_most(entry: str) -> None:
    docs = build(entry)
    names = [(doc["kind"], doc["metadata"]["name"]) for doc in docs]
    assert len(names) == len(set(names)), f"duplicates: {names}"
    expected = BASE_KINDS | ({INGRESS_KIND[entry]} if entry in INGRESS_KIND else set())
    assert {kind for kind, _ in names} == expected
    # The images transformer reached every container, the init container included.
    image = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["images"][0]
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    for container in spec["initContainers"] + spec["containers"]:
        assert container["image"] == f"{image['newName']}:{image['newTag']}", container["name"]


# ---- agreement with the image, probes.yaml, entrypoint.sh and chatgate -----------------------


def test_image_is_the_dockerfiles_app_target_with_its_user_and_entrypoint() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    tag = re.search(r"docker build -t (\S+) \.\s", dockerfile).group(1)
    images = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["images"]
    assert [image["name"] for image in images] == [tag]
    raw = load_yaml_docs(K8S / "base" / "deployment.yaml")[0]["spec"]["template"]["spec"]
    assert {c["image"] for c in raw["initContainers"] + raw["containers"]} == {tag}
    # Same entrypoint: nothing overrides the image's ENTRYPOINT (tini -> entrypoint.sh).
    assert "entrypoint.sh" in app_stage("ENTRYPOINT")[-1]
    assert "command" not in main_container() and "args" not in main_container()
    # Same user: USER uid:gid of the app stage, enforced at pod and container level.
    uid, gid = (int(part) for part in app_stage("USER")[-1].split(":"))
    spec = pod_spec()
    assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]) == (uid, gid)
    for container in spec["initContainers"] + spec["containers"]:
        context = container["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid), container["name"]


def test_containers_meet_the_restricted_pod_security_profile() -> None:
    spec = pod_spec()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for container in spec["initContainers"] + spec["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]


def test_chainlits_writable_paths_are_emptydirs_seeded_from_the_image() -> None:
    spec = pod_spec()
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in main_container()["volumeMounts"]}
    workdir = app_stage("WORKDIR")[-1]
    # The app root as a whole (Chainlit writes chainlit.md there, .chainlit/ and .files/ in it)
    # and /tmp; nothing else is writable.
    assert set(mounts) == {workdir, "/tmp"}
    runs = " ".join(app_stage("RUN"))
    chainlit_dirs = re.findall(rf"{re.escape(workdir)}/\.[a-z]+", runs)
    assert {f"{workdir}/.chainlit", f"{workdir}/.files"} <= set(chainlit_dirs)
    for name in mounts.values():
        assert set(volumes[name]) == {"name", "emptyDir"}, name
        assert quantity(volumes[name]["emptyDir"]["sizeLimit"]) > 0, name
    # The init container copies the image's app root into the volume mounted over it.
    [seed] = spec["initContainers"]
    [seed_mount] = seed["volumeMounts"]
    assert seed_mount["name"] == mounts[workdir]
    assert seed["command"] == ["cp", "-R", f"{workdir}/.", f"{seed_mount['mountPath']}/"]


def test_container_port_matches_the_dockerfile_and_chatgates_listen_default(chatgate_bin) -> None:
    defaults = help_defaults(chatgate_bin)
    exposed = {int(port) for port in app_stage("EXPOSE")}
    listen = dict(re.findall(r"(CHATGATE_LISTEN)=(\S+)", " ".join(app_stage("ENV"))))
    http = container_port("http")
    assert exposed == {http}
    assert defaults["CHATGATE_LISTEN"].rsplit(":", 1)[1] == listen["CHATGATE_LISTEN"].rsplit(":", 1)[1] == str(http)
    assert "CHATGATE_LISTEN" not in container_env()
    # The admin port, outside the Service.
    assert container_port("metrics") == int(defaults["CHATGATE_ADMIN_LISTEN"].rsplit(":", 1)[1])
    service = one(build("default"), "Service")
    assert [container_port(port["targetPort"]) for port in service["spec"]["ports"]] == [http]


@pytest.mark.parametrize(
    "kind,field", [("Startup", "startupProbe"), ("Readiness", "readinessProbe"), ("Liveness", "livenessProbe")]
)
def test_probes_match_probes_yaml(kind: str, field: str) -> None:
    [aca] = [probe for probe in aca_container()["probes"] if probe["type"] == kind]
    probe = main_container()[field]
    assert probe["httpGet"]["path"] == aca["httpGet"]["path"]
    assert container_port(probe["httpGet"]["port"]) == aca["httpGet"]["port"]
    timings = {key: value for key, value in aca.items() if key not in ("type", "httpGet")}
    assert {key: value for key, value in probe.items() if key != "httpGet"} == timings


def test_probe_paths_answer_200_on_a_real_chatgate(launcher, chatgate_bin) -> None:
    port, backend_port = free_port(), free_port()
    launcher.start(standin_cmd(backend_port), env={}, name="backend")
    assert wait_until(lambda: port_open(backend_port), 10)
    env = {**container_env(), "CHATGATE_LISTEN": f"127.0.0.1:{port}"}
    env["CHATGATE_BACKEND"] = f"http://127.0.0.1:{backend_port}"
    started = launcher.start([chatgate_bin], env=clean_env(**env), name="chatgate")
    for field in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = main_container()[field]["httpGet"]
        assert container_port(probe["port"]) == 8000
        url = f"http://127.0.0.1:{port}{probe['path']}"
        assert wait_until(lambda: http_get(url)[0] == 200, 15), (field, http_get(url), started.output()[-2000:])


def test_chatgate_accepts_the_deployments_settings_and_workers_stay_one(chatgate_bin) -> None:
    env = container_env()
    assert env["CHATGATE_WORKERS"] == "1"
    effective = check_config(chatgate_bin, env)
    assert effective["trusted_proxies"] == env["CHATGATE_TRUSTED_PROXIES"]
    # One worker: chatgate supervises nothing and proxies to the one Chainlit entrypoint.sh
    # starts (check-config says so as "(--backend)"); a count would mean supervised workers.
    assert effective["workers"] == "(--backend)", effective.get("workers")


def entrypoint_stop_timeouts(env: dict[str, str]) -> tuple[int, int]:
    """entrypoint.sh's own CHATGATE_STOP_TIMEOUT and BACKEND_STOP_TIMEOUT for this environment."""
    script = ENTRYPOINT.read_text()
    assert script.rstrip().endswith('\nmain "$@"')
    probe = 'validate_settings; echo "$CHATGATE_STOP_TIMEOUT $BACKEND_STOP_TIMEOUT"'
    result = subprocess.run(
        ["bash", "-c", script.rstrip()[: -len('main "$@"')] + probe],
        env=clean_env(**env, CHATGATE_BIN="true"),
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 0, result.stderr
    chatgate_stop, backend_stop = result.stdout.split()
    return int(chatgate_stop), int(backend_stop)


def test_termination_grace_covers_chatgates_drain_and_the_backend_stop(chatgate_bin) -> None:
    env = container_env()
    effective = check_config(chatgate_bin, env)
    delay, grace = seconds(effective["shutdown_delay"]), seconds(effective["shutdown_grace"])
    chatgate_stop, backend_stop = entrypoint_stop_timeouts(env)
    # entrypoint.sh reads the same two settings chatgate does, and gives it its whole drain.
    assert chatgate_stop >= delay + grace
    hooks = main_container().get("lifecycle", {})
    pre_stop = hooks.get("preStop", {})
    sleep = pre_stop.get("sleep", {}).get("seconds", 0)
    assert set(pre_stop) <= {"sleep"}, "a preStop exec/http hook has no bounded duration here"
    # With no preStop sleep, chatgate itself must keep serving while endpoints are removed.
    assert sleep > 0 or delay > 0
    budget = sleep + chatgate_stop + backend_stop
    assert pod_spec()["terminationGracePeriodSeconds"] >= budget + STOP_SLACK, budget


def test_sigterm_keeps_serving_for_the_delay_then_stops_inside_the_grace_period(launcher, chatgate_bin) -> None:
    """entrypoint.sh with the Deployment's env: after SIGTERM readiness is 503 at once, requests
    still reach the backend for CHATGATE_SHUTDOWN_DELAY, and everything exits cleanly in time."""
    env = container_env()
    delay = float(env["CHATGATE_SHUTDOWN_DELAY"])
    port, backend_port = free_port(), free_port()
    env.update(
        CHATGATE_BIN=chatgate_bin,
        CHATGATE_LISTEN=f"127.0.0.1:{port}",
        CHATGATE_BACKEND=f"http://127.0.0.1:{backend_port}",
        BACKEND_CMD=shlex.join(standin_cmd(backend_port)),
        BACKEND_HEALTH_URL=f"http://127.0.0.1:{backend_port}/health",
        BACKEND_PORT=str(backend_port),
        BACKEND_WAIT_INTERVAL="0.2",
    )
    started = launcher.start(["bash", str(ENTRYPOINT)], env=clean_env(**env), name="entrypoint")
    health = f"http://127.0.0.1:{port}/monitor/health"
    assert wait_until(lambda: http_get(health)[0] == 200, 20), started.output()
    began = time.monotonic()
    started.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: http_get(health)[0] == 503, 2), started.output()
    # A fresh connection late in the delay still reaches the backend (its own 404 for /nowhere).
    while time.monotonic() - began < delay - 1.5:
        time.sleep(0.1)
    assert http_get(f"http://127.0.0.1:{port}/nowhere")[0] == 404, started.output()
    status = started.proc.wait(timeout=pod_spec()["terminationGracePeriodSeconds"])
    took = time.monotonic() - began
    assert status == 0, started.output()
    assert delay <= took < pod_spec()["terminationGracePeriodSeconds"], took


def test_service_links_are_off_because_the_service_shares_chatgates_prefix() -> None:
    service = one(build("default"), "Service")
    prefix = service["metadata"]["name"].upper().replace("-", "_") + "_"
    assert prefix == "CHATGATE_", "the reason for enableServiceLinks: false"
    assert pod_spec()["enableServiceLinks"] is False


def test_resources_match_probes_yaml() -> None:
    aca = aca_container()["resources"]
    resources = main_container()["resources"]
    assert quantity(resources["requests"]["cpu"]) == quantity(aca["cpu"])
    assert quantity(resources["requests"]["memory"]) == quantity(aca["memory"])
    assert resources["limits"]["memory"] == resources["requests"]["memory"]
    assert quantity(resources["limits"]["cpu"]) >= quantity(resources["requests"]["cpu"])
    [seed] = pod_spec()["initContainers"]
    assert set(seed["resources"]) == {"requests", "limits"}


def test_service_budget_and_autoscaler_select_the_deployment() -> None:
    docs = build("default")
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert deployment()["spec"]["selector"]["matchLabels"] == labels
    service = one(docs, "Service")
    assert service["spec"]["selector"] == labels
    budget = one(docs, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"] == labels
    autoscaler = one(docs, "HorizontalPodAutoscaler")
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "chatgate")
    # The autoscaler owns the replica count; a drain or rollout keeps one pod serving.
    assert "replicas" not in deployment()["spec"]
    assert autoscaler["spec"]["minReplicas"] - budget["spec"]["maxUnavailable"] >= 1
    assert deployment()["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    [metric] = autoscaler["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and "cpu" in main_container()["resources"]["requests"]


def test_ingress_nginx_pins_browsers_and_passes_websockets_and_uploads(chatgate_bin) -> None:
    docs = build("ingress-nginx")
    ingress, service, route = one(docs, "Ingress"), one(docs, "Service"), httproute()
    prefix = "nginx.ingress.kubernetes.io/"
    annotations = ingress["metadata"]["annotations"]
    assert all(key.startswith(prefix) for key in annotations)
    names = {key[len(prefix):] for key in annotations}
    assert names <= INGRESS_NGINX_ANNOTATIONS, names - INGRESS_NGINX_ANNOTATIONS
    get = lambda name: annotations[prefix + name]  # noqa: E731
    persistence = route["spec"]["rules"][0]["sessionPersistence"]
    assert get("affinity") == "cookie" and get("affinity-mode") == "persistent"
    # The same cookie and lifetime as the Gateway API variant.
    assert get("session-cookie-name") == persistence["sessionName"]
    assert int(get("session-cookie-max-age")) == duration_seconds(persistence["absoluteTimeout"])
    assert int(get("proxy-read-timeout")) >= 3600 and int(get("proxy-send-timeout")) >= 3600
    # chatgate's body limit (the Deployment's, else chatgate's default) decides, not nginx's.
    max_body = int(check_config(chatgate_bin, container_env())["max_body_bytes"])
    assert max_body == int(help_defaults(chatgate_bin)["CHATGATE_MAX_BODY_BYTES"])
    assert nginx_size_bytes(get("proxy-body-size")) == max_body
    [rule] = ingress["spec"]["rules"]
    [path] = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/", "Prefix")
    backend = path["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {port["name"] for port in service["spec"]["ports"]}


def test_httproute_routes_everything_to_the_service_with_cookie_persistence() -> None:
    service = one(build("gateway-api"), "Service")
    [rule] = httproute()["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    [backend] = rule["backendRefs"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"] in {port["port"] for port in service["spec"]["ports"]}
    assert rule["sessionPersistence"]["type"] == "Cookie"
    assert httproute()["spec"]["parentRefs"], "attach to a Gateway"


# ---- README ----------------------------------------------------------------------------------


def test_readme_has_a_kubernetes_section_after_azures_with_commands_that_match() -> None:
    readme = (REPO / "README.md").read_text()
    headings = re.findall(r"^## (.+)$", readme, re.M)
    assert headings[headings.index("Deploy to Azure Container Apps") + 1] == "Kubernetes"
    section = readme.split("\n## Kubernetes\n", 1)[1].split("\n## ", 1)[0]
    assert "docker build --target app" in section
    for command in re.findall(r"kubectl apply -k (\S+)", section):
        assert (REPO / command / "kustomization.yaml").is_file(), command
    assert "kubectl apply -k deploy/kubernetes\n" in section
    assert "kubectl port-forward" in section and "/monitor/health" in section
    assert "Upgrade: websocket" in section
    assert re.search(r"^\| `deploy/kubernetes/` \|", readme, re.M), "layout table row"
