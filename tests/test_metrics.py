"""`/metrics`: parsed with prometheus-client's own parser, and checked to move with traffic."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Gateway, Service, model_entry

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def scrape(gw: Gateway) -> dict[tuple[str, frozenset], float]:
    response = httpx.get(gw.url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def gateway(standin_server: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    broken = f"broken-{uuid.uuid4().hex[:8]}"
    httpx.post(standin_server.url + "/_standin/faults", json={"model": broken, "status": 503})
    url = standin_server.url
    gw = Gateway(tmp_path_factory.mktemp("metrics"), {
        "models": [model_entry("alpha", "alpha", url, "http"),
                   model_entry("beta", "beta", url, "litellm"),
                   model_entry("broken", broken, url, "http", max_retries=1)],
        "routes": [{"name": "frugal/auto", "models": ["broken", "alpha"]}],
        "retry": {"backoff_base_s": 0.01, "backoff_max_s": 0.02},
        "cooldown": {"failures": 1000},
    })
    gw.start()
    yield gw
    gw.stop()


def test_metrics_move_with_traffic(gateway: Gateway) -> None:
    before = scrape(gateway)
    assert gateway.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION}).status_code == 200
    assert gateway.post("/v1/chat/completions", {"model": "beta", "messages": QUESTION,
                                                 "stream": True}).status_code == 200
    assert gateway.post("/v1/chat/completions", {"model": "frugal/auto", "messages": QUESTION}).status_code == 200
    assert gateway.post("/v1/chat/completions", {"model": "nope", "messages": QUESTION}).status_code == 404
    after = scrape(gateway)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("frugal_requests_total", endpoint="chat", route="alpha", model="alpha", status="200") == 1
    assert delta("frugal_requests_total", endpoint="chat", route="frugal/auto", model="alpha", status="200") == 1
    assert delta("frugal_requests_total", endpoint="chat", route="unknown", model="none", status="404") == 1
    assert delta("frugal_tokens_total", model="alpha", direction="input") == 28
    assert delta("frugal_tokens_total", model="alpha", direction="output") == 4
    assert delta("frugal_cost_usd_total", model="alpha") == pytest.approx(2 * (14e-6 + 4e-6))
    assert delta("frugal_cost_usd_total", model="beta") > 0
    assert delta("frugal_upstream_errors_total", model="broken", kind="server_error") == 2
    assert delta("frugal_retries_total", model="broken") == 1
    assert delta("frugal_fallbacks_total", route="frugal/auto") == 1
    assert delta("frugal_request_duration_seconds_count", route="alpha", stream="false") == 1
    assert delta("frugal_time_to_first_token_seconds_count", route="beta") == 1
    assert value(after, "frugal_requests_in_flight") == 0  # every request that started has finished


def test_labels_stay_low_cardinality(gateway: Gateway) -> None:
    for i in range(5):
        gateway.post("/v1/chat/completions", {"model": f"made-up-{i}", "messages": QUESTION, "user": f"user-{i}"})
    text = httpx.get(gateway.url + "/metrics").text
    assert "made-up-" not in text and "user-" not in text and "test-key" not in text
