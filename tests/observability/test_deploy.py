"""deploy/ and grafana/ checked without a container engine: files parse, references resolve,
example configs pass ``vtc-gateway check-config``."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import main
from gateway.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
GRAFANA = ROOT / "grafana"
K8S = DEPLOY / "k8s"
YAML_FILES = sorted(
    p for d in (DEPLOY, GRAFANA) for p in d.rglob("*") if p.suffix in (".yaml", ".yml")
)
EXAMPLE_CONFIGS = [DEPLOY / "gateway.yaml", DEPLOY / "gateway.compose.yaml", K8S / "gateway.yaml"]


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def _k8s_objects() -> list[dict[str, Any]]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [obj for res in kust["resources"] for obj in _docs(K8S / res)]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses(path: Path) -> None:
    assert _docs(path), f"{path} is empty"


def test_yaml_files_are_found() -> None:
    names = {str(p.relative_to(ROOT)) for p in YAML_FILES}
    assert {
        "deploy/docker-compose.yml",
        "deploy/prometheus.yml",
        "deploy/k8s/kustomization.yaml",
        "grafana/provisioning/datasources/prometheus.yaml",
        "grafana/provisioning/dashboards/vtc-gateway.yaml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_configs_pass_check_config(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "-example" not in printed  # keys are redacted


def test_dashboards_are_valid_json_with_unique_uids() -> None:
    boards = [json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))]
    assert len(boards) >= 2
    assert len({b["uid"] for b in boards}) == len(boards)
    for b in boards:
        assert b["title"] and b["panels"]


def test_compose_references_exist() -> None:
    compose = _compose()
    services = compose["services"]
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context.is_dir(), name
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
            else:
                assert source in compose["volumes"], f"{name}: named volume {source}"
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on {dep}"


def test_compose_services_profiles_and_gpu() -> None:
    services = _compose()["services"]
    assert {"vllm", "sim", "gateway", "prometheus", "grafana"} <= set(services)
    vllm, sim, gateway = services["vllm"], services["sim"], services["gateway"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    assert vllm["profiles"] == ["gpu"]
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    assert sim["profiles"] == ["cpu"]
    assert sim["image"] == gateway["image"]
    assert sim["command"] == [
        "python", "-m", "backends.sim", "--host", "0.0.0.0", "--port", "8000"
    ]  # fmt: skip
    assert "vllm" in sim["networks"]["default"]["aliases"]  # the name the config uses
    mounted = {v.split(":")[1]: v.split(":")[0] for v in gateway["volumes"]}
    config = load_config(DEPLOY / mounted["/etc/vtc-gateway/gateway.yaml"])
    assert config.backends[0].url == "http://vllm:8000"
    assert "profiles" not in gateway


def test_prometheus_and_grafana_wiring() -> None:
    compose = _compose()
    services = compose["services"]
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {
        t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    assert targets == {"gateway:8080", "vllm:8000"}
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    url = ds["datasources"][0]["url"]
    assert re.match(r"http://prometheus:9090/?$", url)
    assert "prometheus" in services
    prov = yaml.safe_load((GRAFANA / "provisioning/dashboards/vtc-gateway.yaml").read_text())
    path = prov["providers"][0]["options"]["path"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    assert (DEPLOY / mounts[path]).resolve() == (GRAFANA / "dashboards").resolve()
    assert (DEPLOY / mounts["/etc/grafana/provisioning"]).resolve() == (
        GRAFANA / "provisioning"
    ).resolve()


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), part
    assert re.search(r"^RUN pip install \.", text, re.M)
    user = re.search(r"^USER (\S+)$", text, re.M)
    assert user and not user.group(1).startswith(("root", "0"))
    assert re.search(r"^EXPOSE 8080$", text, re.M)
    cmd = re.search(r"^CMD (.+)$", text, re.M)
    assert cmd and json.loads(cmd.group(1)) == [
        "vtc-gateway", "serve", "--config", "/etc/vtc-gateway/gateway.yaml"
    ]  # fmt: skip


def test_k8s_references_resolve() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res
    generated = {g["name"] for g in kust["configMapGenerator"]}
    for g in kust["configMapGenerator"]:
        for f in g["files"]:
            assert (K8S / f.split("=")[-1]).is_file(), f
    objects = _k8s_objects()
    for obj in objects:
        assert obj["apiVersion"] and obj["kind"] and obj["metadata"]["name"]
    secrets = {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"}
    (deploy,) = [o for o in objects if o["kind"] == "Deployment"]
    pod = deploy["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spec = pod["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    assert containers["vllm"]["image"].startswith("vllm/vllm-openai:")
    assert containers["vllm"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert containers["gateway"]["args"][-1] == "/etc/vtc-gateway/gateway.yaml"
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in spec["containers"]:
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, m
            assert "subPath" not in m  # subPath mounts never see ConfigMap updates
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] in secrets or ref.get("optional"), ref
    for v in volumes.values():
        if "configMap" in v:
            assert v["configMap"]["name"] in generated
        if "secret" in v:
            assert v["secret"]["secretName"] in secrets
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8080"
    ports = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
    services = [o for o in objects if o["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} >= {"vtc-gateway"}
    for svc in services:
        assert svc["spec"]["selector"].items() <= labels.items()
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports


def test_k8s_config_holds_only_digests_of_the_secret_keys() -> None:
    config = load_config(K8S / "gateway.yaml")
    assert config.backends[0].url == "http://127.0.0.1:8000"  # vLLM in the same pod
    (secret,) = [o for o in _k8s_objects() if o["kind"] == "Secret"]
    keys: dict[str, str] = secret["stringData"]
    for t in config.tenants:
        assert all(k.startswith("sha256:") for k in t.api_keys), t.name
        assert t.key_digests() == (hashlib.sha256(keys[t.name].encode()).digest(),)
    assert {t.name for t in config.tenants} == set(keys)


def test_scaleout_overlays_share_one_redis(capsys: pytest.CaptureFixture[str]) -> None:
    """compose and k8s scale-out: Redis is there, every replica's config points at it and
    passes check-config, and the overlay names objects that exist."""
    over = yaml.safe_load((DEPLOY / "docker-compose.scaleout.yml").read_text())
    base = _compose()["services"]
    assert {"redis", "gateway", "gateway-2"} <= set(over["services"])
    assert "gateway" in base  # the override extends the base service
    for name in ("gateway", "gateway-2"):
        (mount,) = over["services"][name]["volumes"]
        assert mount.startswith("./gateway.scaleout.yaml:")
    compose_cfg = load_config(DEPLOY / "gateway.scaleout.yaml")
    assert compose_cfg.cluster is not None and compose_cfg.cluster.url.startswith("redis://redis:")
    # Prometheus scrapes every replica (each /metrics describes that replica only)
    (prom_mount,) = over["services"]["prometheus"]["volumes"]
    source, target = prom_mount.split(":")[:2]
    assert target == "/etc/prometheus/prometheus.yml"
    prom = yaml.safe_load((DEPLOY / source.removeprefix("./")).read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "vtc-gateway"]
    scraped = {t.split(":")[0] for c in job["static_configs"] for t in c["targets"]}
    assert scraped == {name for name in over["services"] if name.startswith("gateway")}

    overlay = K8S / "scaleout"
    kust = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    objects = _k8s_objects() + [o for r in kust["resources"][1:] for o in _docs(overlay / r)]
    deployments = {o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"}
    assert {r["name"] for r in kust["replicas"]} <= deployments
    services = {o["metadata"]["name"] for o in objects if o["kind"] == "Service"}
    k8s_cfg = load_config(overlay / "gateway.yaml")
    assert k8s_cfg.cluster is not None
    assert k8s_cfg.cluster.url.split("//")[1].split(":")[0] in services
    for path in (DEPLOY / "gateway.scaleout.yaml", overlay / "gateway.yaml"):
        assert main(["check-config", str(path)]) == 0
    capsys.readouterr()
