"""The worker pool with real parts: a redis-server of the tests' own, `frugal worker` processes (Celery on the
threads pool over the real SmolLM2 engine), `frugal serve` gateways and the stand-in provider as the remote
tier. What a user of the distributed mode relies on: pooled answers in full and streamed, cancellation
reaching the worker, backpressure and failures turned into escalations, a worker killed mid-stream, and Redis
going away and coming back."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from sqlalchemy import select

from gateway.ledger import requests_table
from tests.harness import API_KEY, Gateway, PoolWorker, Service, TempRedis, model_entry, wait_until
from workers.backend import GenerationRequest
from workers.pool import protocol

POOLED = "pooled-smol"
IDLE = "pooled-idle"  # a pooled model whose queue no worker consumes
QUEUE = "frugal.local.smollm2-135m-instruct"
IDLE_QUEUE = "frugal.test.idle"


def pool_config(model_dir: Path, standin_url: str, **pool: Any) -> dict[str, Any]:
    pooled = {"name": POOLED, "backend": "local/smollm2-135m-instruct", "model_dir": str(model_dir),
              "max_retries": 0, "timeout_s": 30, "pool": {"worker_timeout_s": 1.5, "enqueue_timeout_s": 0.5, **pool}}
    idle = {"name": IDLE, "backend": "local/smollm2-135m-instruct", "model_dir": str(model_dir), "max_retries": 0,
            "timeout_s": 30, "pool": {"queue": IDLE_QUEUE, "max_queue_depth": 0}}
    return {
        "models": [pooled, idle, model_entry("remote", "beta", standin_url, transport="http", max_retries=0)],
        "routes": [
            {"name": "local-first", "kind": "cascade", "tiers": [{"model": POOLED, "judge": "none"},
                                                                 {"model": "remote"}]},
            {"name": "idle-first", "kind": "cascade", "tiers": [{"model": IDLE, "judge": "none"},
                                                                {"model": "remote"}]},
        ],
        # failures never put the pooled model in cooldown here: each test sees the mechanism it checks
        "cooldown": {"failures": 100},
        "cache": {"exact": {"enabled": False}},  # every request reaches the models
    }


class Pool:
    """A redis-server, a config, a worker, and gateways made on demand (all stopped at the end)."""

    def __init__(self, tmp: Path, model_dir: Path, standin_url: str, **pool: Any) -> None:
        self.tmp = tmp
        self.redis = TempRedis(tmp)
        self.redis.start()
        self.env = {"REDIS_URL": self.redis.url, "FRUGAL_TEST_KEY": API_KEY, "STANDIN_API_KEY": "sk-standin"}
        self.config = pool_config(model_dir, standin_url, **pool)
        self.config_path = tmp / "pool.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.services: list[Service] = []
        self.worker = self.start_worker()

    def start_worker(self) -> PoolWorker:
        worker = PoolWorker(self.tmp, self.config_path, POOLED, self.env)
        self.services.append(worker.start(timeout_s=120))
        return worker

    def gateway(self, **overrides: Any) -> Gateway:
        gateway = Gateway(self.tmp, {**self.config, **overrides}, self.env)
        self.services.append(gateway.start())
        return gateway

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url)

    def stop(self) -> None:
        for service in self.services:
            service.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, smollm2_int8: Path, standin_server: Service) -> Iterator[Pool]:
    started = Pool(tmp_path_factory.mktemp("pool"), smollm2_int8, standin_server.url)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def gateway(pool: Pool) -> Gateway:
    return pool.gateway()


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": POOLED, "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


def stream_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def ledger_row(gateway: Gateway, request_id: str) -> Any:
    def row() -> Any:
        with gateway.engine.connect() as connection:
            return connection.execute(select(requests_table).where(requests_table.c.id == request_id)).first()

    return wait_until(row, 10, f"ledger row {request_id}")


def test_a_pooled_model_answers_in_full_and_streamed(pool: Pool, gateway: Gateway) -> None:
    body = chat("Name a primary colour.", max_tokens=12)
    reply = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=gateway.headers(), timeout=60)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    text = answer["choices"][0]["message"]["content"]
    assert text and answer["model"] == POOLED and answer["usage"]["completion_tokens"] > 0
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers=gateway.headers(), timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as streamed:
        assert streamed.status_code == 200
        request_id = streamed.headers["x-request-id"]
        events = list(stream_events(streamed))
    pieces = [e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]]
    assert len([p for p in pieces if p]) > 1  # token by token, not one block
    assert "".join(pieces) == text  # temperature 0: the same answer either way
    assert events[-1]["usage"]["completion_tokens"] == answer["usage"]["completion_tokens"]
    row = ledger_row(gateway, request_id)
    assert row.model == POOLED and row.status == 200 and row.completion_tokens > 0
    metrics = pool.worker.metrics()
    assert metrics['frugal_worker_requests_total{outcome="ok"}'] >= 2
    assert metrics['frugal_local_generated_tokens_total{model="pooled-smol"}'] >= 2 * answer["usage"][
        "completion_tokens"]


def test_the_cascade_calls_a_pooled_tier_like_any_other(gateway: Gateway) -> None:
    reply = httpx.post(gateway.url + "/v1/chat/completions", headers=gateway.headers(), timeout=60,
                       json={**chat("Say hello.", max_tokens=8), "model": "local-first"})
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-frugal-model"] == POOLED


def test_a_cancelled_stream_frees_the_workers_sequence(pool: Pool, gateway: Gateway) -> None:
    before = pool.worker.metrics()
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers=gateway.headers(), timeout=60,
                      json={**chat("Write a long story about the sea.", max_tokens=400), "stream": True,
                            "temperature": 0.8}) as streamed:
        for event in stream_events(streamed):
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                break  # the first token: the client goes away mid-answer
    cancelled = 'frugal_local_finished_cancelled_total{model="pooled-smol"}'

    def freed() -> bool:
        now = pool.worker.metrics()
        return (now[cancelled] > before[cancelled] and now["frugal_worker_running_requests"] == 0
                and now['frugal_local_batch_size{model="pooled-smol"}'] == 0)

    wait_until(freed, 20, "the worker to cancel the sequence")
    after = pool.worker.metrics()
    assert after['frugal_worker_requests_total{outcome="cancelled"}'] > before[
        'frugal_worker_requests_total{outcome="cancelled"}']
    # far fewer than the 400 tokens asked for were generated
    generated = 'frugal_local_generated_tokens_total{model="pooled-smol"}'
    assert after[generated] - before[generated] < 300


def test_a_busy_pool_is_skipped_with_reason_capacity(pool: Pool, gateway: Gateway) -> None:
    client = pool.client()
    client.lpush(IDLE_QUEUE, b"a task no worker takes")  # depth 1 > max_queue_depth 0
    try:
        def escalated() -> httpx.Response | None:
            reply = httpx.post(gateway.url + "/v1/chat/completions", headers=gateway.headers(), timeout=60,
                               json={**chat("What is the capital of France?"), "model": "idle-first"})
            return reply if reply.headers.get("x-frugal-model") == "remote" else None

        # the gateway reads the queue's depth every probe_interval_s: the first requests may still see it empty
        reply = wait_until(escalated, 20, "the cascade to see the queue's depth")
    finally:
        client.delete(IDLE_QUEUE)
    assert reply.status_code == 200
    row = ledger_row(gateway, reply.headers["x-request-id"])
    tiers = row.trace["tiers"]
    assert tiers[0]["model"] == IDLE and tiers[0]["reason"] == "capacity"
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'frugal_cascade_escalations_total{model="pooled-idle",reason="capacity",route="idle-first"}' in metrics


def test_a_drained_backlog_does_not_keep_an_idle_pool_refused(pool: Pool) -> None:
    """The workers publish their recent wait when a task starts; once the queue is empty that reading is stale
    and must not refuse requests (it did: refused requests start no task, so the reading never improved)."""
    client = pool.client()
    client.set(protocol.wait_key(QUEUE), "5.0", ex=30)  # a backlog's wait (> max_wait_s 2 s); nothing queued
    try:
        gateway = pool.gateway()  # its first pooled request waits for a reading of the queue and the wait
        reply = httpx.post(gateway.url + "/v1/chat/completions", headers=gateway.headers(), timeout=60,
                           json=chat("What is the capital of France?", max_tokens=4))
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-frugal-model"] == POOLED
    finally:
        client.delete(protocol.wait_key(QUEUE))


def test_a_request_runs_once_even_if_delivered_twice(pool: Pool) -> None:
    """Celery may deliver a task twice (a redelivered unacknowledged message): the claim key lets one run."""
    from celery import Celery

    app = Celery("dup", broker=pool.redis.url, set_as_current=False)
    app.conf.update(task_serializer="json", task_ignore_result=True)
    request = protocol.request_to_dict(GenerationRequest(kind="chat", messages=[{"role": "user", "content": "Hi"}],
                                                         params={"max_tokens": 4, "temperature": 0}))
    before = pool.worker.metrics()
    for _ in range(2):
        app.send_task(protocol.TASK, args=["dup-request-1", QUEUE, "generate", request, time.time()],
                      task_id="dup-request-1", queue=QUEUE, retry=False)

    def both_taken() -> dict[str, float] | None:
        now = pool.worker.metrics()
        done = lambda outcome: now[f'frugal_worker_requests_total{{outcome="{outcome}"}}'] - before[  # noqa: E731
            f'frugal_worker_requests_total{{outcome="{outcome}"}}']
        return now if done("ok") + done("duplicate") >= 2 else None

    wait_until(both_taken, 30, "both deliveries to be taken")
    after = pool.worker.metrics()
    assert after['frugal_worker_requests_total{outcome="duplicate"}'] == before[
        'frugal_worker_requests_total{outcome="duplicate"}'] + 1
    events = pool.client().xrange(protocol.stream_key("dup-request-1"))
    assert [fields[b"e"] for _, fields in events].count(b"result") == 1


def test_a_worker_killed_mid_stream_gives_a_clean_error_and_a_ledger_row(
        tmp_path: Path, smollm2_int8: Path, standin_server: Service) -> None:
    pool = Pool(tmp_path, smollm2_int8, standin_server.url)
    try:
        gateway = pool.gateway()
        started = time.monotonic()
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers=gateway.headers(), timeout=60,
                          json={**chat("Write a long story about the sea.", max_tokens=400), "stream": True,
                                "temperature": 0.8}) as streamed:
            request_id = streamed.headers["x-request-id"]
            events = stream_events(streamed)
            for event in events:
                if event["choices"] and event["choices"][0]["delta"].get("content"):
                    pool.worker.kill()
                    started = time.monotonic()
                    break
            rest = list(events)
        waited = time.monotonic() - started
        errors = [e for e in rest if "error" in e]
        assert errors and errors[0]["error"]["type"] and "stopped answering" in errors[0]["error"]["message"]
        assert waited < 15  # the heartbeat (1.5 s here) ended it, not the model's 30 s timeout
        row = ledger_row(gateway, request_id)
        assert row.status >= 500 and row.model == POOLED and row.completion_tokens > 0  # what was sent is billed
    finally:
        pool.stop()


def test_redis_down_remote_routes_answer_pooled_escalates_then_recovers(
        tmp_path: Path, smollm2_int8: Path, standin_server: Service) -> None:
    pool = Pool(tmp_path, smollm2_int8, standin_server.url)
    try:
        gateway = pool.gateway(limits={"requests_per_minute": 1000})

        def ask(model: str) -> httpx.Response:
            return httpx.post(gateway.url + "/v1/chat/completions", headers=gateway.headers(), timeout=60,
                              json={**chat("What is the capital of France?", max_tokens=6), "model": model})

        assert ask("local-first").headers["x-frugal-model"] == POOLED
        pool.redis.stop()
        remote = ask("remote")
        assert remote.status_code == 200  # rate limits fail open; the remote model needs no Redis
        started = time.monotonic()
        escalated = ask("local-first")
        elapsed = time.monotonic() - started
        assert escalated.status_code == 200 and escalated.headers["x-frugal-model"] == "remote"
        assert elapsed < 10  # failed fast (enqueue_timeout_s 0.5), not after the model's 30 s timeout
        tiers = ledger_row(gateway, escalated.headers["x-request-id"]).trace["tiers"]
        assert tiers[0]["model"] == POOLED and tiers[0]["reason"] == "error"
        metrics = httpx.get(gateway.url + "/metrics").text
        assert 'frugal_state_errors_total{mechanism="rate_limits",policy="open"}' in metrics

        pool.redis.start()  # same port, empty: no restart of the gateway or the worker
        wait_until(lambda: ask("local-first").headers["x-frugal-model"] == POOLED, 90,
                   "the pooled tier to answer again")
    finally:
        pool.stop()


def ask_remote(gateway: Gateway) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/chat/completions", headers=gateway.headers(), timeout=30,
                      json={"model": "remote", "messages": [{"role": "user", "content": "Hi"}]})


def test_two_replicas_enforce_one_request_rate(pool: Pool) -> None:
    limits = {"limits": {"requests_per_minute": 4}}
    one, two = pool.gateway(**limits), pool.gateway(**limits)

    statuses = [ask_remote(g).status_code for g in (one, two, one, two)]
    assert statuses == [200, 200, 200, 200]
    refused = ask_remote(one)
    assert refused.status_code == 429 and "4 requests per minute" in refused.json()["error"]["message"]
    assert float(refused.headers["retry-after"]) > 0
    assert ask_remote(two).status_code == 429


def test_two_replicas_share_one_token_budget_per_minute(pool: Pool) -> None:
    limits = {"limits": {"tokens_per_minute": 30}}
    one, two = pool.gateway(**limits), pool.gateway(**limits)

    client = pool.client()
    bucket = "frugal:rl:{test-key}:tokens"
    used = 0
    while True:  # spend the minute's 30 tokens on the first replica
        reply = ask_remote(one)
        assert reply.status_code == 200
        used += reply.json()["usage"]["total_tokens"]
        # taken after the answer, asynchronously; the bucket refills by half a token a second meanwhile
        wait_until(lambda used=used: client.hget(bucket, "n") is not None
                   and float(client.hget(bucket, "n")) < 31 - used, 10, "the tokens to be taken")
        if used >= 30:
            break
    refused = ask_remote(two)
    assert refused.status_code == 429 and "30 tokens per minute" in refused.json()["error"]["message"]


def _concurrently(calls: list[Callable[[], Any]]) -> list[Any]:
    results: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        results[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_concurrent_pooled_requests_share_one_engine(pool: Pool, gateway: Gateway) -> None:
    """Eight requests at once are decoded together by the worker's one engine (continuous batching)."""
    before = pool.worker.metrics()

    def ask() -> int:
        return httpx.post(gateway.url + "/v1/chat/completions", headers=gateway.headers(), timeout=60,
                          json=chat("Count from one to twenty.", max_tokens=48, temperature=0.7)).status_code

    assert _concurrently([ask] * 8) == [200] * 8
    after = pool.worker.metrics()
    steps = after['frugal_local_decode_steps_total{model="pooled-smol"}'] - before[
        'frugal_local_decode_steps_total{model="pooled-smol"}']
    rows = after['frugal_local_decode_rows_total{model="pooled-smol"}'] - before[
        'frugal_local_decode_rows_total{model="pooled-smol"}']
    assert rows / steps > 2  # several sequences per decode step
