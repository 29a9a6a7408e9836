"""The deployment files (docker/), checked with the real tools that need no Docker engine, cluster or GPU.

- the Compose files pass the real Compose CLI's `config` and name every piece make up promises;
- both Dockerfiles pass hadolint at warning level;
- the Prometheus config and rules pass promtool (Debian's package, fetched by tools.deploy_checks);
- every metric the Grafana dashboard and the rules query is exported by a live server (GPU series aside);
- the image's Python requirements resolve for Python 3.12 on manylinux x86_64 with pip's resolver;
- the container's entry point passes the GPU config to tritonserver unless DEVICE=cpu.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from client import AdapterClient, GenerateRequest
from tests.conftest import ROOT
from tools.deploy_checks import promtool, venv_tool

DOCKER = ROOT / "docker"
COMPOSE_FILES = {"gpu": ["docker-compose.yml", "docker-compose.gpu.yml"], "cpu": ["docker-compose.yml"]}
# Triton exports these only where it finds a GPU (through NVML / DCGM); a CPU server has none.
GPU_ONLY_METRICS = {"nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes"}
MIN_IMAGE = (26, 7)  # NGC Triton releases with the 2025-2026 security fixes (issue 12)


def compose_config(device: str) -> dict:
    files = [arg for name in COMPOSE_FILES[device] for arg in ("-f", str(DOCKER / name))]
    result = subprocess.run(
        [str(venv_tool("docker-compose")), *files, "config", "--format", "json"],
        capture_output=True,
        text=True,
        env={**os.environ, "DEVICE": device},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    quiet = subprocess.run(
        [str(venv_tool("docker-compose")), *files, "config", "-q"], capture_output=True, text=True, timeout=60
    )
    assert quiet.returncode == 0 and not quiet.stdout, quiet.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_compose_names_every_piece(device):
    config = compose_config(device)
    services = config["services"]
    assert set(services) == {"triton", "prometheus", "grafana", "locust-master", "locust-worker"}
    triton = services["triton"]
    assert triton["environment"]["DEVICE"] == device
    assert int(triton["shm_size"]) >= 1 << 30
    assert triton["ulimits"]["memlock"] == -1 or triton["ulimits"]["memlock"] == {"soft": -1, "hard": -1}
    assert triton["ulimits"]["stack"] in (67108864, {"soft": 67108864, "hard": 67108864})
    assert "client health" in " ".join(triton["healthcheck"]["test"])  # a real inference, not readiness
    mounts = {v["target"]: v for v in triton["volumes"]}
    assert mounts["/adapters"]["read_only"] and mounts["/adapters"]["type"] == "bind"
    assert {p["target"] for p in triton["ports"]} == {8000, 8001, 8002}
    devices = triton.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if device == "gpu":
        assert devices and devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    else:
        assert not devices
    assert any(v["target"] == "/etc/prometheus/prometheus.yml" for v in services["prometheus"]["volumes"])
    grafana = {v["target"] for v in services["grafana"]["volumes"]}
    assert {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards"} <= grafana
    assert services["locust-master"]["depends_on"]["triton"]["condition"] == "service_healthy"
    assert "--master" in services["locust-master"]["command"]
    assert "--worker" in services["locust-worker"]["command"]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.loadtest"])
def test_dockerfiles_pass_hadolint(dockerfile):
    result = subprocess.run(
        [str(venv_tool("hadolint")), "--failure-threshold", "warning", str(DOCKER / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_server_image_is_a_patched_ngc_release_run_as_its_user():
    text = (DOCKER / "Dockerfile").read_text()
    (tag,) = re.findall(r"^FROM nvcr\.io/nvidia/tritonserver:(\d+)\.(\d+)-py3$", text, re.MULTILINE)
    assert (int(tag[0]), int(tag[1])) >= MIN_IMAGE
    assert re.search(r"^USER 1000:1000$", text, re.MULTILINE)  # never root
    assert "MULTIADAPTER_TRITON_HOME=/opt/tritonserver" in text
    assert "COPY docker/requirements-image.txt" in text


@pytest.fixture(scope="module")
def promtool_path() -> Path:
    return promtool()


@pytest.mark.parametrize("check", [["check", "config", "prometheus.yml"], ["check", "rules", "rules.yml"]])
def test_prometheus_files_pass_promtool(promtool_path, check):
    result = subprocess.run(
        [str(promtool_path), *check], cwd=DOCKER / "prometheus", capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def queried_metrics() -> dict[str, set[str]]:
    """Metric names in the dashboard's and the rules' queries."""
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "multiadapter.json").read_text())
    exprs = {
        "dashboard": [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])],
        "rules": re.findall(r"expr: (.+(?:\n {10,}.+)*)", (DOCKER / "prometheus" / "rules.yml").read_text()),
    }
    return {
        source: set(re.findall(r"\b((?:nv|multiadapter)_[a-z_]+)\b", " ".join(texts)))
        for source, texts in exprs.items()
    }


def is_exported(name: str, exported: set[str]) -> bool:
    """`name` is on /metrics: as itself, or as a series of a histogram (_bucket, _count, _sum)."""
    return name in exported or re.sub(r"_(bucket|count|sum)$", "", name) in exported


def test_dashboard_and_rules_query_only_what_a_live_server_exports(triton_server):
    with AdapterClient(triton_server.http_url, protocol="http", timeout_s=60) as client:
        client.generate(GenerateRequest("hello", "", max_tokens=2))  # per-adapter series exist once used
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 10
    while True:
        with opener.open(f"http://{triton_server.metrics_url}/metrics", timeout=10) as response:
            exported = set(re.findall(r"^# TYPE (\S+) ", response.read().decode(), re.MULTILINE))
        queried = queried_metrics()
        missing = {
            s: {n for n in q - GPU_ONLY_METRICS if not is_exported(n, exported)} for s, q in queried.items()
        }
        if not any(missing.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not any(missing.values()), missing
    assert len(queried["dashboard"]) >= 15  # the dashboard really queries the series of the README


def test_image_requirements_resolve_for_python_312():
    """pip's resolver, binary wheels for CPython 3.12 on manylinux x86_64 (NGC's Ubuntu 24.04, glibc 2.39)."""
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    report = ROOT / "build" / "deploy" / "image-requirements-report.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed"]
    command += ["--target", str(report.parent / "never-written"), "--report", str(report)]
    command += ["--python-version", "3.12", "--only-binary=:all:"]
    command += [arg for platform in platforms for arg in ("--platform", platform)]
    command += ["-r", str(DOCKER / "requirements-image.txt")]
    env = {**os.environ, "PIP_CONSTRAINT": ""}  # this machine's pip caps torch for its own Python only
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    installed = {
        i["metadata"]["name"].lower(): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    assert installed["torch"] == "2.13.0"
    assert any(name.startswith("nvidia-") and "cu13" in name for name in installed)  # the CUDA 13 build
    # The pins the image shares with the development environment are the same versions.
    pins = dict(
        line.split("==")
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for name in ("torch", "transformers", "safetensors", "numpy"):
        assert installed[name] == pins[name], name


@pytest.mark.parametrize(("device", "expected"), [("gpu", "--model-config-name=gpu"), ("cpu", None)])
def test_entrypoint_puts_the_engine_on_the_gpu_unless_cpu(tmp_path, device, expected):
    fake = tmp_path / "python3"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "DEVICE": device}
    result = subprocess.run(
        [str(DOCKER / "entrypoint.sh"), "--pin", "upper"], capture_output=True, text=True, env=env, timeout=30
    )
    assert result.returncode == 0, result.stderr
    args = result.stdout.split()
    assert args[:4] == ["-m", "server", "--address", "0.0.0.0"] and "--pin" in args
    if expected:
        assert args[-2:] == ["--", expected]
    else:
        assert "--" not in args
    bad = subprocess.run(
        [str(DOCKER / "entrypoint.sh")],
        capture_output=True,
        text=True,
        env={**env, "DEVICE": "tpu"},
        timeout=30,
    )
    assert bad.returncode == 2 and "DEVICE must be gpu or cpu" in bad.stderr


def test_the_example_tenant_policy_is_valid_for_the_demo_adapters():
    from multiadapter.tenants import TenantPolicy

    policy = TenantPolicy.read(DOCKER / "config" / "tenants.example.json")
    demo = {p.name for p in (ROOT / "models" / "demo" / "adapters").iterdir() if p.is_dir()}
    assert policy.tenants and all(t.default in t.allow and t.allow <= demo for t in policy.tenants.values())


def render(overlay: str) -> list[dict]:
    import yaml

    result = subprocess.run(
        [str(venv_tool("kubectl")), "kustomize", str(DOCKER / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_kubernetes_overlays_render_and_pass_strict_validation(overlay, tmp_path):
    docs = render(overlay)
    rendered = tmp_path / f"{overlay}.yaml"
    import yaml

    rendered.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run(
        [str(venv_tool("kubernetes-validate")), "--strict", str(rendered)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {doc["kind"]: doc for doc in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Ingress"} <= set(
        kinds
    )
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    triton, canary = pod["containers"]
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "health" in canary["readinessProbe"]["exec"]["command"]  # the canary gates readiness
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 1000
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["adapters"]["persistentVolumeClaim"]["readOnly"]
    gpus = triton["resources"]["limits"].get("nvidia.com/gpu")
    env = {e["name"]: e["value"] for e in triton["env"]}
    assert (gpus, env["DEVICE"]) == ((1, "gpu") if overlay == "gpu" else (None, "cpu"))
    # The autoscaler's metric is the one the prometheus-adapter rule serves.
    (metric,) = [m["pods"]["metric"]["name"] for m in kinds["HorizontalPodAutoscaler"]["spec"]["metrics"]]
    rules = yaml.safe_load(kinds["ConfigMap"]["data"]["config.yaml"])["rules"]
    assert metric in {rule["name"]["as"] for rule in rules}
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= (
        kinds["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    )
    ingresses = [doc for doc in docs if doc["kind"] == "Ingress"]
    assert len(ingresses) == 2  # HTTP and gRPC, both hashed on the adapter
    for ingress in ingresses:
        assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == (
            "$http_x_adapter_id"
        )
