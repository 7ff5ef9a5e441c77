"""The deployment files: Kubernetes manifests, docker compose, the Dockerfile, and the configs they mount.

Nothing here needs a cluster or a Docker engine. The Kubernetes manifests are validated against the
Kubernetes OpenAPI schemas shipped inside the `kubernetes-validate` package (offline), after a small
emulation of the kustomization (resources + configMap/secret generators; `kubectl kustomize` output is
validated too where kubectl exists); every ConfigMap, Secret, volume, port and file a manifest names must
exist. The compose file must parse and mount only files that exist; the Envoy configs they mount pass
`envoy --mode validate`; the nexus-authz configs pass `nexus-authz check-config` with the demo secrets.
"""

from __future__ import annotations

import importlib.util
import posixpath
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from nexus_authz import cli
from nexus_authz.demo import procs
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
COMPOSE_FILE = REPO / "docker-compose.yml"
DEMO_KEY = "nx-demo-docker-compose-and-kubernetes-key"
K8S_VERSIONS = ("1.30", "1.37")

Doc = dict[str, Any]


# -- generated Envoy configs ---------------------------------------------------------------------------


def _render_module() -> Any:
    spec = importlib.util.spec_from_file_location("deploy_render", REPO / "deploy" / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_envoy_configs_are_fresh() -> None:
    for path, text in _render_module().rendered().items():
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale: run `python deploy/render.py`"


@pytest.mark.parametrize("name", ["deploy/compose/envoy.yaml", "deploy/kubernetes/envoy.yaml"])
def test_deploy_envoy_configs_validate(name: str) -> None:
    result = subprocess.run(
        [procs.find_envoy(), "--mode", "validate", "-c", str(REPO / name), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # nexus-authz is reached only over the Unix sockets of the shared volume: the fast path and token
    # accounting's access log (HTTP/2, adapters/als_h2.py) on authz.sock, nothing else there.
    config = yaml.safe_load((REPO / name).read_text())
    pipes = {}
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"].startswith("nexus_"):
            endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            pipes[cluster["name"]] = endpoint["address"]["pipe"]["path"]
    assert pipes == {"nexus_authz": "/run/nexus-authz/authz.sock", "nexus_als": "/run/nexus-authz/authz.sock"}


# -- nexus-authz configs -------------------------------------------------------------------------------


def _compose() -> Doc:
    doc: Doc = yaml.safe_load(COMPOSE_FILE.read_text())
    return doc


def _nexus_configs() -> list[Any]:
    """(config, environment) as the deployment provides them: the demo secrets, the key file's path."""
    env = _compose()["services"]["nexus-authz"]["environment"]
    compose = {k: str(v) for k, v in env.items()}
    kubernetes = {
        "NEXUS_KEY_PEPPER": (K8S / "secrets" / "pepper").read_text(),
        "OPENAI_API_KEY": (K8S / "secrets" / "openai-api-key").read_text(),
        # mounted at /etc/nexus-authz/keys/keys.yaml in the pod (test_manifests_reference_only_what_exists)
        "NEXUS_KEYS_FILE": str(K8S / "secrets" / "keys.yaml"),
    }
    return [
        pytest.param(REPO / "deploy" / "compose" / "nexus.yaml", compose, id="compose"),
        pytest.param(K8S / "nexus.yaml", kubernetes, id="kubernetes"),
    ]


@pytest.mark.parametrize(("path", "env"), _nexus_configs())
def test_nexus_configs_pass_check_config(
    path: Path,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for var in (
        "NEXUS_CONFIG",
        "NEXUS_HTTP_SOCKET",
        "NEXUS_HTTP_TCP",
        "NEXUS_GRPC_LISTEN",
        "NEXUS_ADMIN_LISTEN",
    ):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    settings = load_settings(str(path))
    assert settings.counters.backend == "redis" and settings.counters.redis is not None  # distributed mode
    assert cli.main(["check-config", "-c", str(path)]) == 0, capsys.readouterr().err
    engine = Engine.from_settings(settings)
    demo = engine.snapshot.lookup(DEMO_KEY)
    assert demo is not None and demo.key_id == "demo"


# -- docker compose and the Dockerfile -----------------------------------------------------------------


def test_compose_file_parses_and_mounts_only_existing_files() -> None:
    compose = _compose()
    services: dict[str, Doc] = compose["services"]
    assert set(services) == {"envoy", "nexus-authz", "redis", "mock-upstream"}
    named_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            context = (
                REPO / service["build"]
                if isinstance(service["build"], str)
                else REPO / service["build"]["context"]
            )
            assert (context / "Dockerfile").is_file()
        for dep in service.get("depends_on") or {}:
            assert dep in services, f"{name} depends on unknown service {dep}"
        for env_file in service.get("env_file") or []:
            assert (REPO / env_file).is_file(), env_file
        for volume in service.get("volumes") or []:
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in named_volumes, f"{name} uses undeclared volume {source}"
            assert target.startswith("/")
    # Only Envoy is published; Envoy mounts a validated config and shares the socket volume with nexus.
    assert [n for n, s in services.items() if s.get("ports")] == ["envoy"]
    envoy = services["envoy"]
    assert "./deploy/compose/envoy.yaml:/etc/envoy/envoy.yaml:ro" in envoy["volumes"]
    assert envoy["image"].startswith("envoyproxy/envoy:v1.40")
    sockets = {v.split(":")[0] for v in envoy["volumes"]} & {
        v.split(":")[0] for v in services["nexus-authz"]["volumes"]
    }
    assert sockets == {"nexus-run"}
    # The config nexus-authz is told to read is one of its mounts.
    command = services["nexus-authz"]["command"]
    config_target = command[command.index("-c") + 1]
    assert any(v.split(":")[1] == config_target for v in services["nexus-authz"]["volumes"])
    nexus_config = yaml.safe_load((REPO / "deploy" / "compose" / "nexus.yaml").read_text())
    assert nexus_config["counters"]["redis"]["url"] == "redis://redis:6379/0"


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Go's filepath.Match sees it (`*` stays within a segment), plus `**`."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins, `!` re-includes, excluding a directory excludes
    everything in it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _dockerignore_regex((raw[1:] if negate else raw).strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_dockerfile_copies_only_what_the_context_holds() -> None:
    text = (REPO / "Dockerfile").read_text()
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    instructions = [
        line for line in re.sub(r"\\\n", " ", text).splitlines() if line and not line.startswith("#")
    ]
    froms = [line.split()[1] for line in instructions if line.startswith("FROM ")]
    assert froms and all(f == "python:3.11-slim" for f in froms)
    copies = [line.split()[1:] for line in instructions if line.startswith("COPY ")]
    assert copies
    for args in copies:
        if any(a.startswith("--from=") for a in args):
            continue
        for source in args[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: no such file"
            assert not _dockerignore_excludes(posixpath.normpath(source), patterns), (
                f"COPY {source} is dockerignored"
            )
    assert _dockerignore_excludes(".venv", patterns) and _dockerignore_excludes(
        "tests/test_deploy.py", patterns
    )
    assert _dockerignore_excludes("nexus_authz/core/__pycache__/keys.pyc", patterns)
    assert not _dockerignore_excludes("nexus_authz/core/keys.py", patterns)
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and not users[-1].startswith(("0", "root"))
    assert any(line.startswith("HEALTHCHECK") and "healthz" in text for line in instructions)


# -- Kubernetes ----------------------------------------------------------------------------------------


def _kustomize() -> tuple[Doc, list[Doc]]:
    """The kustomization and the objects it produces (generated names without kustomize's hash suffix)."""
    kustomization: Doc = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objects: list[Doc] = []
    for resource in kustomization["resources"]:
        path = K8S / resource
        assert path.is_file(), f"kustomization resource {resource} does not exist"
        objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for kind, section in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for gen in kustomization.get(section) or []:
            data: dict[str, str] = {}
            for entry in gen["files"]:
                key, _, source = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
                path = K8S / source
                assert path.is_file(), f"{section} {gen['name']}: {source} does not exist"
                data[key] = path.read_text()
            field = "stringData" if kind == "Secret" else "data"
            obj: Doc = {"apiVersion": "v1", "kind": kind, "metadata": {"name": gen["name"]}, field: data}
            if kind == "Secret":
                obj["type"] = "Opaque"
            objects.append(obj)
    return kustomization, objects


def _validate(doc: Doc) -> None:
    kv = pytest.importorskip("kubernetes_validate.utils", reason="pip install kubernetes-validate")
    for version in K8S_VERSIONS:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            raise AssertionError(
                f"{doc['kind']}/{doc['metadata']['name']} ({version}): {where}: {exc.message}"
            ) from None


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    _, objects = _kustomize()
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        ["Deployment", "Deployment", "Service", "Service", "PodDisruptionBudget"]
        + ["NetworkPolicy", "NetworkPolicy"]
        + ["ConfigMap", "ConfigMap", "Secret"]
    )
    for obj in objects:
        _validate(obj)


def test_schema_validation_catches_mistakes() -> None:
    _, objects = _kustomize()
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # a typo: `resources`
    with pytest.raises(AssertionError, match="resource"):
        _validate(broken)


def test_kubectl_kustomize_output_validates() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (the emulated kustomization is validated above)")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    objects = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(objects) == 10
    for obj in objects:
        _validate(obj)


def _mount_for(container: Doc, path: str) -> Doc:
    """The volumeMount a container path lives under (the longest mountPath that contains it)."""
    mounts = [
        m for m in container.get("volumeMounts") or [] if path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{container['name']}: nothing mounted at {path}"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def test_manifests_reference_only_what_exists() -> None:
    _, objects = _kustomize()
    by_kind: dict[str, dict[str, Doc]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj

    def data_of(kind: str, name: str) -> dict[str, str]:
        assert name in by_kind.get(kind, {}), f"{kind} {name} is not in the kustomization"
        obj = by_kind[kind][name]
        return dict(obj.get("data") or obj.get("stringData") or {})

    for deployment in by_kind["Deployment"].values():
        template = deployment["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        for volume in volumes.values():
            if "configMap" in volume:
                data = data_of("ConfigMap", volume["configMap"]["name"])
                assert all(item["key"] in data for item in volume["configMap"].get("items") or [])
            if "secret" in volume:
                data = data_of("Secret", volume["secret"]["secretName"])
                assert all(item["key"] in data for item in volume["secret"].get("items") or [])
        for container in pod["containers"]:
            ports = {p["name"] for p in container.get("ports") or []}
            for mount in container.get("volumeMounts") or []:
                assert mount["name"] in volumes, f"{container['name']} mounts unknown volume {mount['name']}"
            for env in container.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in data_of("Secret", ref["name"]), f"{env['name']}: no key {ref['key']}"
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                spec = container.get(probe) or {}
                for action in ("httpGet", "tcpSocket"):
                    port = (spec.get(action) or {}).get("port")
                    if isinstance(port, str):
                        assert port in ports, f"{container['name']} {probe} uses unknown port {port}"
        # Services and budgets select this pod; Service target ports exist on it.
        pod_ports = {p["name"] for c in pod["containers"] for p in c.get("ports") or []}
        name = deployment["metadata"]["name"]
        service = by_kind["Service"][name]
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= pod_ports

    gateway = by_kind["Deployment"]["llm-gateway"]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in gateway["containers"]}
    assert set(containers) == {"app", "envoy", "nexus-authz"}
    volumes = {v["name"]: v for v in gateway["volumes"]}

    def file_in_pod(container: str, path: str) -> str:
        """The text a container sees at `path`, from the ConfigMap/Secret volume mounted there."""
        mount = _mount_for(containers[container], path)
        volume = volumes[mount["name"]]
        relative = path[len(mount["mountPath"].rstrip("/")) + 1 :]
        if "configMap" in volume:
            source, kind, name = volume["configMap"], "ConfigMap", volume["configMap"]["name"]
        else:
            source, kind, name = volume["secret"], "Secret", volume["secret"]["secretName"]
        items = {i["path"]: i["key"] for i in source.get("items") or []}
        key = items.get(relative, relative if not items else None)
        data = data_of(kind, name)
        assert key in data, f"{container}: {path} is not provided by {kind} {name}"
        return data[key]

    # Envoy reads its config from the ConfigMap; nexus-authz its config, and the key file that config names.
    envoy_args = containers["envoy"]["args"]
    envoy_config = file_in_pod("envoy", envoy_args[envoy_args.index("-c") + 1])
    assert envoy_config == (K8S / "envoy.yaml").read_text()
    command = containers["nexus-authz"]["command"]
    nexus_config = yaml.safe_load(file_in_pod("nexus-authz", command[command.index("-c") + 1]))
    assert "keys:" in file_in_pod("nexus-authz", nexus_config["keys"]["file"])
    # Envoy and nexus-authz share the socket directory the configs name; the app does not get it.
    socket_dir = posixpath.dirname(nexus_config["listen"]["http_socket"])
    for name in ("envoy", "nexus-authz"):
        assert _mount_for(containers[name], nexus_config["listen"]["http_socket"])["mountPath"] == socket_dir
    assert nexus_config["listen"]["grpc"] == f"unix:{socket_dir}/grpc.sock"
    assert not any(m["mountPath"] == socket_dir for m in containers["app"].get("volumeMounts") or [])
    # Probes on nexus-authz's admin port, which its config listens on.
    admin_port = int(nexus_config["listen"]["admin"].rpartition(":")[2])
    nexus = containers["nexus-authz"]
    assert {p["containerPort"] for p in nexus["ports"] if p["name"] == "admin"} == {admin_port}
    assert nexus["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert nexus["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for container in containers.values():
        assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    # Distributed mode: the Redis Service the config names exists.
    assert nexus_config["counters"]["redis"]["url"].startswith("redis://redis:6379")
    assert by_kind["Service"]["redis"]["spec"]["ports"][0]["port"] == 6379
    budget = next(iter(by_kind["PodDisruptionBudget"].values()))
    assert (
        budget["spec"]["selector"]["matchLabels"].items()
        <= by_kind["Deployment"]["llm-gateway"]["spec"]["template"]["metadata"]["labels"].items()
    )


def _listens_privately(address: str | None) -> bool:
    """A Unix socket or a loopback address (the listeners that answer checks with the credential)."""
    if not address:
        return True
    if address.startswith("unix:") or address.startswith("/"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    return host in ("127.0.0.1", "::1", "localhost")


@pytest.mark.parametrize("path", [REPO / "deploy" / "compose" / "nexus.yaml", K8S / "nexus.yaml"])
def test_deployed_check_listeners_are_private(path: Path) -> None:
    # Issue 13.1: every listener that answers checks (and so hands out the provider credential) is a Unix
    # socket on the volume Envoy shares, or loopback; only the admin listener may face the pod network.
    listen = yaml.safe_load(path.read_text())["listen"]
    assert listen["http_socket"].startswith("/run/nexus-authz/")
    assert _listens_privately(listen.get("http_tcp")) and _listens_privately(listen.get("grpc"))
    if path.parent.name == "compose":  # nothing scrapes metrics there: the HEALTHCHECK runs in-container
        assert _listens_privately(listen["admin"])


def test_only_the_gateway_port_is_exposed_and_a_network_policy_guards_the_pods() -> None:
    _, objects = _kustomize()
    gateway = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "llm-gateway")
    pod = gateway["spec"]["template"]
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    admin = {(p["name"], p["containerPort"]) for p in containers["nexus-authz"]["ports"]}
    assert admin == {("admin", 9090)}
    envoy_ports = {p["name"] for p in containers["envoy"]["ports"]}
    # No Service publishes the admin port (by name or number), nor anything but Envoy's port of the gateway.
    for service in (o for o in objects if o["kind"] == "Service"):
        for port in service["spec"]["ports"]:
            assert port["targetPort"] not in ("admin", 9090), service["metadata"]["name"]
            assert port["port"] != 9090
        if service["metadata"]["name"] == "llm-gateway":
            assert {p["targetPort"] for p in service["spec"]["ports"]} <= envoy_ports
    # A NetworkPolicy selects the gateway pods: Envoy's port, and the admin port from monitoring only.
    (policy,) = [
        o
        for o in objects
        if o["kind"] == "NetworkPolicy"
        and o["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    by_port = {port["port"]: rule for rule in rules for port in rule["ports"]}
    assert set(by_port) == {"http", "admin"} and all(len(rule["ports"]) == 1 for rule in rules)
    (source,) = by_port["admin"]["from"]
    assert set(source) == {"namespaceSelector"} and source["namespaceSelector"]["matchLabels"]
    # Prometheus scrapes the pod IP on the admin port, where the probes go too.
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9090" and annotations["prometheus.io/path"] == "/metrics"
