"""docker-compose.yml and deploy/: validated against the Compose Specification (no Docker engine here),
and checked for consistency with the code (files exist, configs parse, dashboards query real metrics)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from compose_spec import PyCompose

from gateway.estimates import LiveEstimates
from gateway.metrics import GatewayMetrics
from gateway.settings import parse_config
from tests.harness import REPO

COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_follows_the_specification() -> None:
    spec = PyCompose.from_yaml(COMPOSE.read_text()).to_spec()
    assert set(spec.services) == {"gateway", "postgres", "redis", "prometheus", "grafana"}


def test_the_specification_check_is_not_a_rubber_stamp() -> None:
    with pytest.raises(ValueError):
        PyCompose.from_yaml(COMPOSE.read_text().replace("restart: unless-stopped", "restart_policy: sometimes", 1))


def test_services_refer_to_things_that_exist(compose: dict) -> None:
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on", [])
        for other in depends if isinstance(depends, list) else depends.keys():
            assert other in services, f"{name} depends on unknown service {other}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose.get("volumes", {}), f"{name} mounts undeclared volume {source}"
        build = service.get("build")
        if build:
            assert (REPO / build["context"] / build["dockerfile"]).is_file()


def test_dockerfile_copies_every_package() -> None:
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    for package in ("gateway", "router", "scorer", "workers", "standin"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert "-c constraints.txt" in dockerfile


def test_deployed_gateway_config_is_valid() -> None:
    config = parse_config((REPO / "deploy" / "frugal.yaml").read_text(), "deploy/frugal.yaml")
    assert config.server.host == "0.0.0.0" and config.routes


def test_prometheus_scrapes_the_gateway(compose: dict) -> None:
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    job = prometheus["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    host, port = job["static_configs"][0]["targets"][0].split(":")
    assert host in compose["services"] and port == "8080"


def test_dashboard_queries_metrics_the_gateway_exports() -> None:
    exported = set()
    metrics = GatewayMetrics()
    metrics.watch_local_engines({"local/model": dict})  # what a gateway with a local model also exports
    live = LiveEstimates()  # what a gateway with a cascade exports once it has audited an answer
    live.request("r", {"tiers": [{"model": "m", "outcome": "accepted"}]})
    live.label("r", "m", "audit", "bad", accepted=True)
    metrics.watch(live)
    for family in metrics.registry.collect():
        exported.add(family.name)
        exported.update(sample.name for sample in family.samples)
        if family.type == "counter":
            exported.add(family.name + "_total")
        if family.type == "histogram":
            exported.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    dashboard = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "frugal.json").read_text())
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used = set(re.findall(r"\bfrugal_[a-z_]+", target["expr"]))
            assert used and used <= exported, f"panel {panel['title']!r} queries {used - exported}"


def test_grafana_provisioning_points_at_the_dashboards(compose: dict) -> None:
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/frugal.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == path
    assert Path(REPO / "deploy/grafana/dashboards/frugal.json").is_file()


def test_gateway_caches_in_the_composed_redis(compose: dict) -> None:
    url = compose["services"]["gateway"]["environment"]["REDIS_URL"]
    host = url.split("//", 1)[1].split(":", 1)[0]
    assert host in compose["services"] and "redis" in compose["services"]["gateway"]["depends_on"]
    assert "allkeys-lru" in compose["services"][host]["command"]  # bounded: a cache, not a store
