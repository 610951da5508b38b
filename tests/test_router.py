"""Retries, backoff, fallback and cooldown."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
import pytest

from router.cooldown import Cooldown
from router.pool import RetryPolicy
from tests.harness import Clock, Gateway, Service, model_entry

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]



def test_cooldown_after_repeated_failures_within_the_window() -> None:
    clock = Clock()
    cooldown = Cooldown(failures=2, window_s=10, cooldown_s=30, clock=clock)
    assert not cooldown.failed("m")
    clock.now += 11  # the first failure has left the window
    assert not cooldown.failed("m")
    assert cooldown.remaining("m") == 0
    clock.now += 1
    assert cooldown.failed("m")
    assert cooldown.remaining("m") == pytest.approx(30)
    assert cooldown.cooling() == {"m": pytest.approx(30)}
    clock.now += 30
    assert cooldown.remaining("m") == 0 and cooldown.cooling() == {}


def test_success_clears_the_failure_count() -> None:
    cooldown = Cooldown(failures=2, window_s=10, cooldown_s=30, clock=Clock())
    cooldown.failed("m")
    cooldown.succeeded("m")
    assert not cooldown.failed("m")


def test_backoff_grows_is_capped_and_honours_retry_after() -> None:
    policy = RetryPolicy(backoff_base_s=0.5, backoff_max_s=4.0)
    assert [policy.delay(r, None, rand=lambda: 1.0) for r in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert policy.delay(0, None, rand=lambda: 0.0) == 0.0  # full jitter
    assert policy.delay(0, 3.0, rand=lambda: 0.0) == 3.0  # the provider's Retry-After wins …
    assert policy.delay(0, 60.0, rand=lambda: 0.0) == 4.0  # … up to the cap


def calls(standin: Service, model: str) -> int:
    return httpx.get(standin.url + "/_standin/stats").json()["requests"].get(model, 0)


def test_retry_succeeds_after_transient_failures(make_gateway: Callable[..., Gateway],
                                                 standin_server: Service) -> None:
    flaky = f"flaky-{uuid.uuid4().hex[:8]}"
    httpx.post(standin_server.url + "/_standin/faults", json={"model": flaky, "status": 503, "count": 2})
    gw = make_gateway({"models": [model_entry("flaky", flaky, standin_server.url, "litellm", max_retries=2)],
                       "retry": {"backoff_base_s": 0.01, "backoff_max_s": 0.02}})
    response = gw.post("/v1/chat/completions", {"model": "flaky", "messages": QUESTION})
    assert response.status_code == 200
    assert calls(standin_server, flaky) == 3
    row = gw.ledger_row(response.headers["x-request-id"])
    assert [a["outcome"] for a in row["trace"]["attempts"]] == ["server_error", "server_error", "ok"]


def test_a_failing_model_cools_down_and_is_skipped(make_gateway: Callable[..., Gateway],
                                                   standin_server: Service) -> None:
    sick = f"sick-{uuid.uuid4().hex[:8]}"
    httpx.post(standin_server.url + "/_standin/faults", json={"model": sick, "status": 500})
    url = standin_server.url
    gw = make_gateway({
        "models": [model_entry("sick", sick, url, "http", max_retries=0), model_entry("alpha", "alpha", url, "http")],
        "routes": [{"name": "frugal/auto", "models": ["sick", "alpha"]}],
        "cooldown": {"failures": 2, "window_s": 60, "cooldown_s": 120},
    })
    for _ in range(2):
        response = gw.post("/v1/chat/completions", {"model": "frugal/auto", "messages": QUESTION})
        assert response.headers["x-frugal-models-tried"] == "sick,alpha"
    assert calls(standin_server, sick) == 2
    response = gw.post("/v1/chat/completions", {"model": "frugal/auto", "messages": QUESTION})
    assert response.status_code == 200
    assert response.headers["x-frugal-models-tried"] == "alpha"
    assert calls(standin_server, sick) == 2  # not called while cooling down
    row = gw.ledger_row(response.headers["x-request-id"])
    assert [a["outcome"] for a in row["trace"]["attempts"]] == ["skipped_cooldown", "ok"]
    direct = gw.post("/v1/chat/completions", {"model": "sick", "messages": QUESTION})
    assert direct.status_code == 503
    assert direct.json()["error"]["code"] == "models_cooling_down"
    assert 100 <= int(direct.headers["retry-after"]) <= 120
    assert httpx.get(gw.url + "/readyz").json()["models_in_cooldown"] == ["sick"]
    assert "frugal_models_in_cooldown 1.0" in httpx.get(gw.url + "/metrics").text
