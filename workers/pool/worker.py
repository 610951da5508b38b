"""A pool worker process (`frugal worker`): Celery on the threads pool over one engine per local model.

Why threads: a worker must let many requests share one engine, so that the engine's batching and prefix
cache see all of them; the engine decodes in its own thread and releases the GIL in ONNX Runtime, so a task
thread only waits for its steps and writes them to Redis. Prefork would give each child its own copy of the
model (no shared batch) and must never fork after CUDA is initialised; one worker process per GPU instead
(`--device cuda:K`). The engines are loaded once, before the worker takes its first task (Celery's
`worker_process_init` fires in prefork children only; the threads pool has none).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis
from celery import signals
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from workers.local.backend import LocalBackend
from workers.local.metrics import LocalEngineCollector
from workers.pool import protocol
from workers.pool.app import celery_app
from workers.pool.runner import PoolRunner

log = logging.getLogger("frugal.worker")


@dataclass(frozen=True)
class PooledModel:
    """A local model this worker serves: its queue, its name (metrics), and how to load it."""

    queue: str
    name: str
    load: Callable[[], LocalBackend]


@dataclass(frozen=True)
class WorkerOptions:
    broker_url: str
    state_url: str
    concurrency: int = 16
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 9101
    loglevel: str = "INFO"
    #: Celery's node name (default: frugal-<models>@<host>).
    node_name: str | None = None


class WorkerCollector:
    """The worker's own metrics: requests by outcome, requests running, the queues' depth and measured wait."""

    def __init__(self, runner: PoolRunner, broker: redis.Redis, queues: list[str], ready: threading.Event) -> None:
        self._runner = runner
        self._broker = broker
        self._queues = queues
        self._ready = ready

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        runner = self._runner
        counts = dict(runner.counts)
        tasks = CounterMetricFamily("frugal_worker_requests", "Requests taken by this worker, by outcome (ok, "
                                    "error, cancelled, duplicate, expired)", labels=["outcome"])
        for outcome in ("ok", "error", "cancelled", "duplicate", "expired"):
            tasks.add_metric([outcome], counts.get(outcome, 0))
        yield tasks
        yield GaugeMetricFamily("frugal_worker_running_requests", "Requests this worker is answering now",
                                value=runner.running)
        yield GaugeMetricFamily("frugal_worker_ready", "1 once the worker consumes its queues",
                                value=1.0 if self._ready.is_set() else 0.0)
        depth = GaugeMetricFamily("frugal_worker_queue_depth", "Tasks waiting in the queue (read from the broker "
                                  "at scrape time; -1 when the broker cannot be read)", labels=["queue"])
        wait = GaugeMetricFamily("frugal_worker_queue_wait_seconds", "Moving average of the wait from enqueue to "
                                 "start of this worker's requests", labels=["queue"])
        for queue in self._queues:
            try:
                depth.add_metric([queue], float(self._broker.llen(queue)))
            except redis.RedisError:
                depth.add_metric([queue], -1.0)
            wait.add_metric([queue], runner.wait_seconds.get(queue, 0.0))
        yield depth
        yield wait


def _heartbeat(client: redis.Redis, worker_id: str, stop: threading.Event) -> None:
    key = protocol.worker_key(worker_id)
    while not stop.is_set():
        try:
            client.set(key, "1", px=int(protocol.HEARTBEAT_TTL_S * 1000))
        except redis.RedisError:
            log.warning("heartbeat to the state Redis failed; retrying")
        stop.wait(protocol.HEARTBEAT_TTL_S / 3)


def run_worker(models: list[PooledModel], options: WorkerOptions) -> None:
    """Load every model, then consume their queues until stopped (SIGTERM: finish the running requests)."""
    queues = [m.queue for m in models]
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    backends: Mapping[str, LocalBackend] = {m.queue: m.load() for m in models}
    state = redis.Redis.from_url(options.state_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    broker = redis.Redis.from_url(options.broker_url, socket_timeout=1.0, socket_connect_timeout=1.0)
    runner = PoolRunner(backends, state, worker_id)
    ready = threading.Event()
    if options.metrics_port is not None:
        registry = CollectorRegistry(auto_describe=True)
        registry.register(LocalEngineCollector({m.name: backends[m.queue].stats for m in models}))
        registry.register(WorkerCollector(runner, broker, queues, ready))
        start_http_server(options.metrics_port, options.metrics_host, registry=registry)
        log.info("worker metrics on http://%s:%d/metrics", options.metrics_host, options.metrics_port)

    app = celery_app(options.broker_url)

    @app.task(name=protocol.TASK, ignore_result=True)
    def generate(request_id: str, queue: str, mode: str, request: dict[str, Any], enqueued_at: float) -> str:
        return runner.run(request_id, queue, mode, request, enqueued_at)

    def on_revoked(sender: Any = None, request: Any = None, expired: bool = False, **_: Any) -> None:
        if expired and request is not None and getattr(request, "id", None):
            runner.expired(request.id)  # the task id is the request id

    def on_ready(sender: Any = None, **_: Any) -> None:
        ready.set()
        log.info("worker %s ready: queues %s, %d threads", worker_id, ", ".join(queues), options.concurrency)

    signals.task_revoked.connect(on_revoked, weak=False)
    signals.worker_ready.connect(on_ready, weak=False)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(state, worker_id, stop), name="heartbeat", daemon=True)
    beat.start()
    runner.start()
    node = options.node_name or f"frugal-{'-'.join(m.name for m in models)}@{socket.gethostname()}"
    try:
        app.worker_main(["worker", "--pool=threads", f"--concurrency={options.concurrency}", "-Q", ",".join(queues),
                         f"--loglevel={options.loglevel}", "--without-gossip", "--without-mingle",
                         "--without-heartbeat", "-n", node])
    finally:
        stop.set()
        runner.stop()
        state.delete(protocol.worker_key(worker_id))
        for backend in backends.values():
            backend.generator.close()
