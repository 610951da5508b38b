"""The semantic cache through the running gateway: a paraphrase in the same context is served the cached
answer, anything else is not; replicas share questions through Redis. Real MiniLM ONNX encoder."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.cache.verifier import lookup_floor
from tests.harness import Gateway, Service, free_port, model_entry
from workers.local.catalog import build

QUESTION = "What is the capital of France?"
PARAPHRASE = "What's the capital of France?"  # cosine 0.99 with QUESTION
NEAR_MISS = "What is the capital of Spain?"  # cosine 0.68
LOOSER = "Which city is the capital of France?"  # cosine 0.94: a candidate the verifier does not accept (0.79)


@pytest.fixture(scope="module")
def models_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The gateway's FRUGAL_MODELS_DIR, with the MiniLM encoder built in it once."""
    explicit = os.environ.get("FRUGAL_TEST_MODELS_DIR")
    root = Path(explicit) if explicit else tmp_path_factory.mktemp("models")
    build("minilm-l6-v2", root=root)
    return {"FRUGAL_MODELS_DIR": str(root)}


def config(standin: Service, upstream: str) -> dict[str, Any]:
    return {"models": [model_entry("alpha", upstream, standin.url, "http")],
            "cache": {"semantic": {"enabled": True}}}


def ask(gw: Gateway, question: str, system: str | None = None) -> httpx.Response:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    response = gw.post("/v1/chat/completions", {"model": "alpha", "messages": messages, "temperature": 0})
    assert response.status_code == 200, response.text
    return response


def upstream_calls(standin: Service, model: str) -> int:
    return httpx.get(standin.url + "/_standin/stats").json()["requests"].get(model, 0)


def test_a_paraphrase_gets_the_cached_answer_and_nothing_else_does(
        make_gateway: Callable[..., Gateway], standin_server: Service, models_env: dict[str, str]) -> None:
    upstream = f"alpha-{uuid.uuid4().hex[:8]}"
    gw = make_gateway(config(standin_server, upstream), env=models_env)
    first = ask(gw, QUESTION)
    assert first.headers["x-frugal-cache"] == "miss"
    answer = first.json()["choices"][0]["message"]["content"]

    hit = ask(gw, PARAPHRASE)
    assert hit.headers["x-frugal-cache"] == "semantic-hit"
    assert float(hit.headers["x-frugal-cache-similarity"]) >= lookup_floor()
    assert hit.json()["choices"][0]["message"]["content"] == answer
    assert float(hit.headers["x-frugal-cost-usd"]) == 0.0
    assert float(hit.headers["x-frugal-saved-usd"]) == pytest.approx(float(first.headers["x-frugal-cost-usd"]))
    assert upstream_calls(standin_server, upstream) == 1
    row = gw.ledger_row(hit.headers["x-request-id"])
    assert row["cache"] == "semantic-hit" and row["cost_usd"] == 0.0
    assert row["trace"]["cache"]["similarity"] >= lookup_floor()

    for other in (NEAR_MISS, LOOSER):
        assert ask(gw, other).headers["x-frugal-cache"] == "miss"
    # the same question in another context (system prompt) is another partition: never a candidate
    assert ask(gw, PARAPHRASE, system="Answer in French.").headers["x-frugal-cache"] == "miss"
    assert upstream_calls(standin_server, upstream) == 4
    # what missed was stored: its exact repeat and its paraphrase now hit
    assert ask(gw, NEAR_MISS).headers["x-frugal-cache"] == "hit"
    assert ask(gw, "What's the capital of Spain?").headers["x-frugal-cache"] == "semantic-hit"
    assert upstream_calls(standin_server, upstream) == 4


def test_replicas_share_semantic_entries_through_redis(
        make_gateway: Callable[..., Gateway], standin_server: Service, models_env: dict[str, str],
        redis_url: str) -> None:
    upstream = f"alpha-{uuid.uuid4().hex[:8]}"
    env = {**models_env, "REDIS_URL": redis_url}
    one = make_gateway(config(standin_server, upstream), env=env)
    two = make_gateway(config(standin_server, upstream), env=env)
    assert ask(one, QUESTION).headers["x-frugal-cache"] == "miss"
    hit = ask(two, PARAPHRASE)
    assert hit.headers["x-frugal-cache"] == "semantic-hit"
    assert upstream_calls(standin_server, upstream) == 1


def test_the_default_verifier_refuses_a_word_swap_that_cosine_alone_serves(
        make_gateway: Callable[..., Gateway], standin_server: Service, models_env: dict[str, str]) -> None:
    question = "How do I get from Chennai to Tirupur by train?"
    swapped = "How do I get from Tirupur to Chennai by train?"  # cosine 0.994: another question
    restated = "How do I get from Chennai to Tirupur by train ?"
    plain_upstream, verified_upstream = (f"alpha-{uuid.uuid4().hex[:8]}" for _ in range(2))
    plain_config = config(standin_server, plain_upstream)
    plain_config["cache"]["semantic"]["verifier"] = False
    plain = make_gateway(plain_config, env=models_env)
    verified = make_gateway(config(standin_server, verified_upstream), env=models_env)  # the default
    for gw in (plain, verified):
        assert ask(gw, question).headers["x-frugal-cache"] == "miss"
    assert ask(plain, swapped).headers["x-frugal-cache"] == "semantic-hit"  # the false hit cosine makes
    assert ask(verified, swapped).headers["x-frugal-cache"] == "miss"
    assert ask(verified, restated).headers["x-frugal-cache"] == "semantic-hit"
    assert upstream_calls(standin_server, verified_upstream) == 2


def test_an_unreachable_redis_makes_semantic_lookups_miss_not_fail(
        make_gateway: Callable[..., Gateway], standin_server: Service, models_env: dict[str, str]) -> None:
    upstream = f"alpha-{uuid.uuid4().hex[:8]}"
    gw = make_gateway(config(standin_server, upstream),
                      env={**models_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    for question in (QUESTION, PARAPHRASE):
        assert ask(gw, question).headers["x-frugal-cache"] == "miss"
    assert upstream_calls(standin_server, upstream) == 2
