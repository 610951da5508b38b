"""`frugal/auto` as a local-first judged cascade, through real processes: the embedded default with no
provider keys, stand-in tiers above the local model, `on_unaccepted: error`, a prompt too long for the local
model, streaming, and `n`/`logprobs` on a cascade route.

The two pack questions below were chosen from the packaged judge's measured scores (`frugal judge show`,
and the outcomes `frugal judge build` caches): one it accepts by a wide margin, one it rejects by a wide
margin, so the tests hold while the judge is rebuilt from the same outcomes."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from scorer.fit.outcomes import messages_of
from scorer.judge import LocalJudge, packaged_judge
from scorer.signals import FEATURE_NAMES
from tests.harness import API_KEY, BIN, Gateway, Service, data_file, free_port, standin, write_dataset

pytestmark = pytest.mark.timeout(900)

LOCAL = "local/smollm2-135m-instruct"
#: (dataset, query id): a question the packaged judge accepts, and one it rejects (measured scores).
ACCEPTED = ("overruling", "overruling-1128")
REJECTED = ("zellinger_mmlu", "mmlu-train-0206")
LONG_PROMPT = "Summarise this. " + "The quick brown fox jumps over the lazy dog. " * 40


def pack_query(dataset: str, query_id: str) -> str:
    with gzip.open(data_file(f"{dataset}.jsonl.gz"), "rt") as handle:
        for line in handle:
            row = json.loads(line)
            if row["query_id"] == query_id:
                return str(row["query"])
    raise AssertionError(f"{query_id} is not in {dataset}")


@pytest.fixture(scope="module")
def questions() -> dict[str, str]:
    return {"accepted": pack_query(*ACCEPTED), "rejected": pack_query(*REJECTED)}


@pytest.fixture(scope="module")
def top_tier(tmp_path_factory: pytest.TempPathFactory, questions: dict[str, str]) -> Iterator[Service]:
    """The stand-in as the top tier: it answers the two questions (and anything else deterministically)."""
    folder = tmp_path_factory.mktemp("auto-standin")
    rows = [{"dataset": "auto", "split": "test", "query_id": name, "query": query, "model": "top",
             "answer": "No" if name == "accepted" else "B", "correct": 1.0} for name, query in questions.items()]
    service = standin(folder, [write_dataset(folder / "auto.jsonl.gz", rows)])
    yield service
    service.stop()


def local_entry(built: Callable[..., Path], **extra: Any) -> dict[str, Any]:
    return {"name": LOCAL, "backend": LOCAL, "model_dir": str(built("int8")), "threads": 2, "max_retries": 0, **extra}


def top_entry(url: str, **extra: Any) -> dict[str, Any]:
    return {"name": "top", "backend": "openai/top", "api_base": f"{url}/v1", "transport": "http",
            "api_key_env": "STANDIN_API_KEY", "input_cost_per_token": 2.5e-6, "output_cost_per_token": 1e-5, **extra}


def ask(gateway: Gateway, model: str, query: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": messages_of(query), "temperature": 0, "max_tokens": 64, **extra}
    return gateway.post("/v1/chat/completions", body)


@pytest.fixture(scope="module")
def cascade_gateway(built: Callable[..., Path], top_tier: Service,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = Gateway(tmp_path_factory.mktemp("auto-gw"), {
        "models": [local_entry(built), top_entry(top_tier.url),
                   {**top_entry(top_tier.url), "name": "keyless", "api_key_env": "NOWHERE_API_KEY"}],
        "routes": [{"name": "auto", "kind": "cascade", "models": ["top", LOCAL]},
                   {"name": "strict", "kind": "cascade", "models": [LOCAL, "keyless"], "on_unaccepted": "error"}],
        "cache": {"exact": {"enabled": False}}})
    gateway.start()
    yield gateway
    gateway.stop()


def test_an_answer_the_judge_accepts_stays_local(cascade_gateway: Gateway, questions: dict[str, str]) -> None:
    reply = ask(cascade_gateway, "auto", questions["accepted"])
    assert reply.status_code == 200, reply.text
    h = reply.headers
    assert h["x-frugal-model"] == LOCAL and h["x-frugal-accepted"] == "true"
    assert h["x-frugal-tiers"] == LOCAL and h["x-frugal-tier-outcomes"] == "accepted"  # price order: local first
    assert float(h["x-frugal-scores"]) >= float(h["x-frugal-thresholds"])
    assert h["x-frugal-escalations"] == "-"
    row = cascade_gateway.ledger_row(h["x-request-id"])
    assert row["trace"]["accepted"] is True and row["trace"]["tiers"][0]["score"] == pytest.approx(
        float(h["x-frugal-scores"]), abs=1e-4)
    # what retraining reads back (docs/learning.md): the judge's version and the features it scored
    tier = row["trace"]["tiers"][0]
    judge = LocalJudge(packaged_judge(LOCAL))  # type: ignore[arg-type]
    assert tier["judge"] == judge.version and len(tier["features"]) == len(FEATURE_NAMES)
    assert judge.score_features(np.array([tier["features"]]))[0] == pytest.approx(tier["score"], abs=1e-3)
    assert row["route_version"] == h["x-frugal-route-version"] and row["route_version"].startswith("config-")


def test_an_answer_the_judge_rejects_climbs_with_its_reason(cascade_gateway: Gateway,
                                                            questions: dict[str, str]) -> None:
    reply = ask(cascade_gateway, "auto", questions["rejected"])
    assert reply.status_code == 200, reply.text
    h = reply.headers
    assert h["x-frugal-model"] == "top" and h["x-frugal-accepted"] == "true"
    assert h["x-frugal-tiers"] == f"{LOCAL},top" and h["x-frugal-tier-outcomes"] == "rejected,accepted"
    assert h["x-frugal-escalations"] == "score,-"
    assert float(h["x-frugal-scores"].split(",")[0]) < float(h["x-frugal-thresholds"].split(",")[0])
    assert reply.json()["choices"][0]["message"]["content"] == "B"
    metrics = httpx.get(cascade_gateway.url + "/metrics").text
    assert f'frugal_cascade_escalations_total{{model="{LOCAL}",reason="score",route="auto"}}' in metrics


def test_on_unaccepted_error_is_a_503_naming_the_missing_tiers(cascade_gateway: Gateway,
                                                                questions: dict[str, str]) -> None:
    reply = ask(cascade_gateway, "strict", questions["rejected"])
    assert reply.status_code == 503, reply.text
    error = reply.json()["error"]
    assert error["code"] == "no_accepted_answer" and "keyless (no_key)" in error["message"]
    assert cascade_gateway.ledger_row(reply.headers["x-request-id"])["status"] == 503
    accepted = ask(cascade_gateway, "strict", questions["accepted"])  # an accepted answer needs no higher tier
    assert accepted.status_code == 200 and accepted.headers["x-frugal-accepted"] == "true"


def test_a_streamed_request_streams_the_accepted_tier(cascade_gateway: Gateway, questions: dict[str, str]) -> None:
    body = {"model": "auto", "messages": messages_of(questions["rejected"]), "temperature": 0, "max_tokens": 64,
            "stream": True}
    with httpx.stream("POST", cascade_gateway.url + "/v1/chat/completions", json=body,
                      headers=cascade_gateway.headers(), timeout=120) as reply:
        assert reply.status_code == 200
        assert reply.headers["x-frugal-tier-outcomes"] == "rejected,accepted"
        chunks = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "B"


def test_n_and_logprobs_keep_working_on_a_cascade_route(cascade_gateway: Gateway, questions: dict[str, str]) -> None:
    reply = ask(cascade_gateway, "auto", questions["accepted"], n=2, logprobs=True, top_logprobs=2)
    assert reply.status_code == 200, reply.text
    choices = reply.json()["choices"]
    assert len(choices) == 2 and reply.headers["x-frugal-model"] == LOCAL
    tokens = choices[0]["logprobs"]["content"]
    assert tokens and all(len(t["top_logprobs"]) == 2 for t in tokens)  # the judge's 5 alternatives trimmed
    plain = ask(cascade_gateway, "auto", questions["accepted"])
    assert plain.json()["choices"][0].get("logprobs") is None


def test_a_prompt_longer_than_the_local_context_escalates(built: Callable[..., Path], top_tier: Service,
                                                          make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway({
        "models": [local_entry(built, serving={"max_context": 128}), top_entry(top_tier.url)],
        "routes": [{"name": "auto", "kind": "cascade", "models": [LOCAL, "top"]}]})
    reply = gateway.post("/v1/chat/completions",
                         {"model": "auto", "messages": [{"role": "user", "content": LONG_PROMPT}]})
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-frugal-model"] == "top"
    assert reply.headers["x-frugal-escalations"] == "context_length,-"
    row = gateway.ledger_row(reply.headers["x-request-id"])
    assert [t["reason"] for t in row["trace"]["tiers"]] == ["context_length", None]
    again = gateway.post("/v1/chat/completions", {"model": LOCAL, "max_tokens": 4,
                                                  "messages": [{"role": "user", "content": "Hi"}]})
    assert again.status_code == 200  # a prompt too long never puts the local model in cooldown


def test_the_embedded_default_with_no_keys_answers_frugal_auto(built: Callable[..., Path], models_root: Path,
                                                               tmp_path: Path, questions: dict[str, str]) -> None:
    built("int8")  # the default config resolves the local model from FRUGAL_MODELS_DIR
    env = {"FRUGAL_API_KEY": API_KEY, "FRUGAL_MODELS_DIR": str(models_root)}
    port = free_port()
    server = Service("default", [str(BIN / "frugal"), "serve", "--port", str(port)], port, tmp_path, env=env,
                     ready_path="/readyz", cwd=tmp_path,
                     unset=["FRUGAL_CONFIG", *(k for k in os.environ if k.endswith("_API_KEY"))])
    server.start(timeout_s=300)
    try:
        headers = {"authorization": f"Bearer {API_KEY}"}
        replies = {name: httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=300,
                                    json={"model": "frugal/auto", "messages": messages_of(query), "temperature": 0,
                                          "max_tokens": 64}) for name, query in questions.items()}
        for reply in replies.values():
            assert reply.status_code == 200, reply.text
            assert reply.headers["x-frugal-model"] == LOCAL
        assert replies["accepted"].headers["x-frugal-accepted"] == "true"
        rejected = replies["rejected"].headers
        assert rejected["x-frugal-accepted"] == "false"
        assert rejected["x-frugal-tiers"] == f"{LOCAL},gpt-4o-mini,claude-3-5-haiku,gpt-4o"
        assert rejected["x-frugal-tier-outcomes"] == "fallback_accepted,skipped,skipped,skipped"
        assert rejected["x-frugal-escalations"] == "score,no_key,no_key,no_key"
        metrics = httpx.get(server.url + "/metrics").text
        assert 'frugal_cascade_answers_total{accepted="false",route="frugal/auto"} 1.0' in metrics
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "OPENAI_API_KEY is not set" in log and "judge >=" in log


def test_samples_share_the_prompt_and_stay_out_of_the_answer(built: Callable[..., Path]) -> None:
    """Self-consistency samples: drawn beside the answer from the prompt's cached keys and values, seeded
    (the same request gets the same samples), counted apart from the client's usage, and never streamed."""
    import asyncio

    from router.judge import judge_request
    from scorer.signals import JudgeSettings
    from workers.backend import GenerationRequest
    from workers.local.backend import LocalBackend

    backend = LocalBackend(LOCAL, built("int8"), threads=2)
    question = [{"role": "user", "content": "Name a primary colour. " + "Answer in one word. " * 8}]
    plain = GenerationRequest("chat", question, params={"temperature": 0, "max_tokens": 8})
    judged = judge_request(plain, JudgeSettings(samples=3, top_logprobs=4))

    async def run() -> tuple[Any, Any, Any, list[str]]:
        alone = await backend.generate(plain)
        cached_before = backend.engine.stats["cached_tokens"]
        first = await backend.generate(judged)
        reused = backend.engine.stats["cached_tokens"] - cached_before
        again = await backend.generate(judged)
        streamed = [chunk.text async for chunk in backend.stream(judged)]
        return alone, first, (again, reused), streamed

    try:
        alone, first, (again, reused), streamed = asyncio.run(run())
    finally:
        asyncio.run(backend.aclose())
    assert len(first.samples) == 3 and first.samples == again.samples and first.sample_tokens > 0
    assert first.text == alone.text and len(first.choices) == 1  # the answer is the greedy one, alone
    assert first.usage.completion_tokens == alone.usage.completion_tokens  # samples are not the client's tokens
    assert all(len(lp.top) == 4 for lp in first.choices[0].logprobs)
    assert reused >= 3 * 32  # each sample (and the answer, after the plain run) found the prompt's blocks cached
    assert "".join(streamed) == alone.text
