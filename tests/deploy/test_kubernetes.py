"""deploy/kubernetes: every manifest is valid Kubernetes, and the set works as a whole.

Validity is checked offline against the Kubernetes JSON schemas that the ``kubernetes-validate``
package ships (strict: an unknown or misspelt field fails), for the oldest Kubernetes version
the manifests promise and the newest the package knows. The rest is what a user would meet
after ``kubectl apply``: corral's own loader accepts the ConfigMap's corral.toml, the probes hit
/readyz and /healthz on the port corral listens on, the grace period outlasts the drain, each
Ollama pod gets one GPU, and discovery's DNS name is the headless Service that fronts them.
"""

from __future__ import annotations

import shlex
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate.utils
import pytest
import yaml

from corral.config import load_config
from tests.helpers import REPO_ROOT

KUBE_DIR = REPO_ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests are written for (nothing newer is used).
OLDEST = "1.29"


@cache
def manifests() -> dict[str, list[dict[str, Any]]]:
    """Every YAML document, by file."""
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted(KUBE_DIR.glob("*.yaml"))
    }


def objects() -> list[dict[str, Any]]:
    return [doc for docs in manifests().values() for doc in docs]


def one(kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def corral_toml() -> str:
    text: str = one("ConfigMap", "corral-config")["data"]["corral.toml"]
    return text


def corral_settings(tmp_path: Path, env: dict[str, str] | None = None) -> Any:
    path = tmp_path / "corral.toml"
    path.write_text(corral_toml())
    return load_config(path, env=env or {})


def named_port(c: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return int(number)


def test_the_files_are_the_ones_kustomize_applies() -> None:
    """`kubectl apply -k` and `kubectl apply -f deploy/kubernetes/` apply the same set: the
    Kustomization lists every manifest, and its name keeps it out of `-f`'s *.yaml."""
    kustomization = yaml.safe_load((KUBE_DIR / "Kustomization").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(manifests())
    assert not [p for p in KUBE_DIR.iterdir() if p.suffix in (".yml", ".json")]
    for doc in objects():
        assert "namespace" not in doc["metadata"], f"{doc['kind']} pins a namespace"


@pytest.mark.parametrize("version", [OLDEST, "latest"])
def test_every_manifest_is_valid_kubernetes(version: str) -> None:
    """Strict schema validation of every document, offline."""
    utils = kubernetes_validate.utils
    wanted = utils.latest_version() if version == "latest" else version
    kinds = set()
    for name, docs in manifests().items():
        for doc in docs:
            try:
                utils.validate(doc, wanted, strict=True)
            except utils.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {where}: {exc}")
            kinds.add(doc["kind"])
    assert kinds == {
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "StatefulSet",
    }


def test_the_config_map_is_a_config_corral_accepts(tmp_path: Path) -> None:
    """corral's own loader reads the ConfigMap's corral.toml: on every interface, one DNS
    discovery entry, the replicas sharing state through the Redis Service."""
    settings = corral_settings(tmp_path)
    assert settings.server.host == "0.0.0.0"
    assert settings.server.port == 11434
    [discovery] = settings.discovery
    assert settings.cluster.redis_url is not None
    assert settings.cluster.redis_url.get_secret_value().startswith("redis://redis:")
    assert discovery.interval_s <= 30


def test_the_secret_is_placeholders_that_corral_accepts(tmp_path: Path) -> None:
    """The keys are empty placeholders marked REPLACE (no published key is usable); as the
    container gets them (envFrom) corral starts, and with real values filled in too."""
    secret = one("Secret", "corral-keys")
    values = secret["stringData"]
    assert set(values) == {"CORRAL_ADMIN_KEY", "CORRAL_CLIENT_KEYS"}
    assert all(value == "" for value in values.values())
    text = (KUBE_DIR / "corral-secret.yaml").read_text()
    assert text.count("# REPLACE") == 2
    env = container(one("Deployment", "corral"), "corral")["envFrom"]
    assert env == [{"secretRef": {"name": "corral-keys"}}]
    settings = corral_settings(tmp_path, env=values)
    assert settings.resolved_admin_key() is None
    assert settings.resolved_client_keys() == {}
    filled = {"CORRAL_ADMIN_KEY": "a" * 64, "CORRAL_CLIENT_KEYS": "k" * 48 + " name=app"}
    assert corral_settings(tmp_path, env=filled).resolved_client_keys()


def test_probes_hit_readyz_and_healthz_on_the_port_corral_listens_on(tmp_path: Path) -> None:
    settings = corral_settings(tmp_path)
    c = container(one("Deployment", "corral"), "corral")
    ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    assert ready["path"] == "/readyz"
    assert live["path"] == "/healthz"
    for probe in (ready, live):
        assert named_port(c, probe["port"]) == settings.server.port
    service = one("Service", "corral")
    [port] = service["spec"]["ports"]
    assert named_port(c, port["targetPort"]) == settings.server.port


def test_the_grace_period_covers_the_drain(tmp_path: Path) -> None:
    """Kubernetes kills the pod after terminationGracePeriodSeconds, counted from the preStop
    hook: the pause plus server.drain_timeout_s must fit, with room to close."""
    settings = corral_settings(tmp_path)
    spec = one("Deployment", "corral")["spec"]["template"]["spec"]
    c = container(one("Deployment", "corral"), "corral")
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = float(command[1])
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > settings.server.drain_timeout_s
    assert grace >= pause + settings.server.drain_timeout_s + 5


def test_corral_runs_locked_down_on_its_config() -> None:
    """Non-root, read-only root file system, no privilege escalation, requests set; the command
    reads the config where the ConfigMap is mounted; 2 replicas."""
    deployment = one("Deployment", "corral")
    spec = deployment["spec"]["template"]["spec"]
    c = container(deployment, "corral")
    assert deployment["spec"]["replicas"] == 2
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    args = c["command"]
    config = Path(args[args.index("--config") + 1])
    [mount] = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == config.parent]
    assert mount["readOnly"] is True
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "corral-config"
    assert config.name in one("ConfigMap", "corral-config")["data"]


def test_every_ollama_pod_asks_for_exactly_one_gpu() -> None:
    """One GPU per pod, so that one discovered backend is one GPU."""
    ollama = one("StatefulSet", "ollama")
    containers = ollama["spec"]["template"]["spec"]["containers"]
    gpus = [c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") for c in containers]
    assert gpus == [1]
    for c in containers:
        requested = c["resources"].get("requests", {}).get("nvidia.com/gpu")
        assert requested in (None, 1)  # requests default to the limit for extended resources
    env = {e["name"]: e["value"] for e in container(ollama, "ollama")["env"]}
    assert env["OLLAMA_HOST"] == "0.0.0.0:11434"
    [claim] = ollama["spec"]["volumeClaimTemplates"]
    [mount] = container(ollama, "ollama")["volumeMounts"]
    assert (mount["name"], mount["mountPath"]) == (claim["metadata"]["name"], "/root/.ollama")


def test_discovery_names_the_headless_service_of_the_ollama_pods(tmp_path: Path) -> None:
    """dns = "<service>:<port>": that Service is headless (one A record per pod), selects the
    StatefulSet's pods, is its serviceName, and the port is the one Ollama listens on."""
    [discovery] = corral_settings(tmp_path).discovery
    host, _, port = discovery.dns.partition(":")
    service = one("Service", host.split(".")[0])
    ollama = one("StatefulSet", "ollama")
    assert service["spec"]["clusterIP"] == "None"
    assert ollama["spec"]["serviceName"] == service["metadata"]["name"]
    labels = ollama["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    [service_port] = service["spec"]["ports"]
    assert int(port) == service_port["port"]
    c = container(ollama, "ollama")
    assert named_port(c, service_port["targetPort"]) == int(port)
    assert c["env"][0] == {"name": "OLLAMA_HOST", "value": f"0.0.0.0:{port}"}


def test_slots_fit_what_each_ollama_runs_at_once(tmp_path: Path) -> None:
    """The replicas share their slots through Redis: max_concurrent is Ollama's
    OLLAMA_NUM_PARALLEL (not divided by the replicas); max_loaded_models is Ollama's
    OLLAMA_MAX_LOADED_MODELS."""
    settings = corral_settings(tmp_path)
    [discovery] = settings.discovery
    assert settings.cluster.redis_url is not None
    env = {e["name"]: e["value"] for e in container(one("StatefulSet", "ollama"), "ollama")["env"]}
    assert discovery.max_concurrent == int(env["OLLAMA_NUM_PARALLEL"])
    assert discovery.max_loaded_models == int(env["OLLAMA_MAX_LOADED_MODELS"])


def test_images_are_pinned_and_corrals_is_a_marked_placeholder() -> None:
    images = {
        c["name"]: c["image"]
        for o in objects()
        if o["kind"] in ("Deployment", "StatefulSet")
        for c in o["spec"]["template"]["spec"]["containers"]
    }
    assert images["corral"] == "corral:latest"
    assert "PLACEHOLDER" in (KUBE_DIR / "corral.yaml").read_text()
    for name in ("ollama", "redis"):
        _repo, _, tag = images[name].partition(":")
        assert tag, f"{name} is not pinned"
        assert tag[0].isdigit(), f"{name}: {tag!r} is not a version"
    assert images["ollama"].startswith("ollama/ollama:")


def test_every_reference_points_at_an_object_in_the_set() -> None:
    """ConfigMaps, Secrets and Services named by the workloads are in the set, and each
    Service selects some workload's pods."""
    names = {(o["kind"], o["metadata"]["name"]) for o in objects()}
    workloads = [o for o in objects() if o["kind"] in ("Deployment", "StatefulSet")]
    for workload in workloads:
        spec = workload["spec"]["template"]["spec"]
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names
        for c in spec["containers"]:
            for source in c.get("envFrom", []):
                assert ("Secret", source["secretRef"]["name"]) in names
    for service in (o for o in objects() if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        assert any(
            selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
            for w in workloads
        ), service["metadata"]["name"]
    # redis_url names the Redis Service and its port.
    line = next(x for x in corral_toml().splitlines() if "redis_url" in x and "redis://" in x)
    url = shlex.split(line.partition("=")[2])[0]
    tomllib.loads(f'redis_url = "{url}"')
    redis_port = one("Service", "redis")["spec"]["ports"][0]["port"]
    assert url.startswith(f"redis://redis:{redis_port}/")
