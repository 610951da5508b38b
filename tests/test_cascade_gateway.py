"""Cascade routes in the running gateway, against the stand-in provider answering with recorded answers:
the decision in headers, ledger and metrics; failed tiers; streaming; configuration errors; and a data
pack test split driven through the gateway reproducing `frugal cascade eval`."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.settings import ConfigError, parse_config
from scorer.fit.dataset import Grid, load_grid
from tests.cascade_data import MODELS
from tests.harness import BIN, Gateway, Service, data_file, model_entry, standin


def _models(url: str) -> list[dict[str, Any]]:
    return [model_entry(name, name, url, transport="http", max_retries=0, input_cost_per_token=price / 40,
                        output_cost_per_token=price / 40) for name, _, price in MODELS]


def _ask(gateway: Gateway, grid: Grid, q: int, model: str = "frugal/auto", **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": grid.queries[q]}],
            "user": grid.query_ids[q], **extra}
    return gateway.post("/v1/chat/completions", body)


def _recorded(grid: Grid, q: int, model: str) -> str:
    return grid.answers[q][grid.models.index(model)]


def test_fitted_cascade_answers_and_explains(make_gateway: Callable[..., Gateway], synthetic,
                                             synthetic_standin) -> None:
    _, grid, cascade = synthetic
    gateway = make_gateway({"models": _models(synthetic_standin.url),
                            "routes": [{"name": "frugal/auto", "kind": "cascade", "cascade": str(cascade)}]})
    chosen = [t["model"] for t in yaml.safe_load(cascade.read_text())["chosen"]["tiers"]]
    seen_tiers = set()
    for q in range(0, 40, 3):
        reply = _ask(gateway, grid, q)
        assert reply.status_code == 200, reply.text
        h = reply.headers
        tiers = h["x-frugal-tiers"].split(",")
        assert tiers == chosen[:len(tiers)]
        accepted = int(h["x-frugal-tier-accepted"])
        seen_tiers.add(accepted)
        assert h["x-frugal-model"] == tiers[accepted - 1]
        assert reply.json()["choices"][0]["message"]["content"] == _recorded(grid, q, h["x-frugal-model"])
        outcomes = h["x-frugal-tier-outcomes"].split(",")
        assert outcomes[accepted - 1] == "accepted" and set(outcomes[:accepted - 1]) <= {"rejected"}
        scores = h["x-frugal-scores"].split(",")
        thresholds = h["x-frugal-thresholds"].split(",")
        for k in range(accepted - 1):
            assert float(scores[k]) < float(thresholds[k])
        if accepted < len(chosen):
            assert float(scores[accepted - 1]) >= float(thresholds[accepted - 1])
        costs = [float(c) for c in h["x-frugal-tier-costs-usd"].split(",")]
        assert sum(costs) == pytest.approx(float(h["x-frugal-cost-usd"]))
        row = gateway.ledger_row(h["x-request-id"])
        assert row["trace"]["accepted_tier"] == accepted
        assert [t["model"] for t in row["trace"]["tiers"]] == tiers
        assert row["trace"]["saved_usd"] == pytest.approx(float(h["x-frugal-saved-usd"]))
        assert row["cost_usd"] == pytest.approx(float(h["x-frugal-cost-usd"]))
    assert len(seen_tiers) > 1, "the scorer should accept some first-tier answers and reject others"
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'frugal_cascade_depth_count{route="frugal/auto"} 14.0' in metrics
    assert "frugal_cascade_accepted_total{" in metrics and "frugal_cascade_saved_usd{" in metrics


def _inline(url: str, synthetic, threshold: float) -> dict[str, Any]:
    scorer = synthetic[2].with_name("cascade.scorer")
    return {"models": _models(url),
            "routes": [{"name": "two", "kind": "cascade", "scorer": str(scorer),
                        "tiers": [{"model": "cheap", "threshold": threshold}, {"model": "big"}]}]}


def test_thresholds_decide(make_gateway: Callable[..., Gateway], synthetic, synthetic_standin) -> None:
    grid = synthetic[1]
    always = make_gateway(_inline(synthetic_standin.url, synthetic, 0.0))
    never = make_gateway(_inline(synthetic_standin.url, synthetic, 1.0))
    reply = _ask(always, grid, 5, "two")
    assert reply.headers["x-frugal-tier-accepted"] == "1" and reply.headers["x-frugal-models-tried"] == "cheap"
    assert reply.json()["choices"][0]["message"]["content"] == _recorded(grid, 5, "cheap")
    assert float(reply.headers["x-frugal-saved-usd"]) > 0
    reply = _ask(never, grid, 5, "two")
    assert reply.headers["x-frugal-tier-accepted"] == "2" and reply.headers["x-frugal-models-tried"] == "cheap,big"
    assert reply.json()["choices"][0]["message"]["content"] == _recorded(grid, 5, "big")
    assert float(reply.headers["x-frugal-saved-usd"]) < 0  # both tiers paid: more than big alone


def test_failed_tiers_are_passed_over(make_gateway: Callable[..., Gateway], synthetic, synthetic_standin) -> None:
    grid = synthetic[1]
    gateway = make_gateway(_inline(synthetic_standin.url, synthetic, 1.0))
    faults = synthetic_standin.url + "/_standin/faults"
    try:
        httpx.post(faults, json={"model": "big", "status": 503})
        reply = _ask(gateway, grid, 7, "two")
        assert reply.status_code == 200
        assert reply.headers["x-frugal-tier-outcomes"] == "fallback_accepted,failed"
        assert reply.json()["choices"][0]["message"]["content"] == _recorded(grid, 7, "cheap")
        httpx.delete(faults)
        httpx.post(faults, json={"model": "cheap", "status": 503})
        reply = _ask(gateway, grid, 7, "two")
        assert reply.status_code == 200
        assert reply.headers["x-frugal-tier-outcomes"] == "failed,accepted"
        assert reply.json()["choices"][0]["message"]["content"] == _recorded(grid, 7, "big")
        httpx.post(faults, json={"model": "big", "status": 503})
        reply = _ask(gateway, grid, 7, "two")
        assert reply.status_code == 502 and reply.json()["error"]["code"] == "upstream_error"
        assert gateway.ledger_row(reply.headers["x-request-id"])["status"] == 502
    finally:
        httpx.delete(faults)


def test_a_tier_that_cannot_take_the_request_is_skipped(make_gateway: Callable[..., Gateway], synthetic,
                                                       synthetic_standin) -> None:
    """A request with tools skips a text-only tier (reason `capability`) and is answered by a later one; the
    same tier judges requests it can take."""
    grid = synthetic[1]
    config = _inline(synthetic_standin.url, synthetic, 0.0)
    config["models"][0]["capabilities"] = []  # "cheap" takes text only
    gateway = make_gateway(config)
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}}, "required": ["query"]}}}
    reply = _ask(gateway, grid, 5, "two", tools=[tool])
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup"
    assert reply.headers["x-frugal-tier-outcomes"] == "skipped,accepted"
    assert reply.headers["x-frugal-models-tried"] == "big" and reply.headers["x-frugal-tier-accepted"] == "2"
    tiers = gateway.ledger_row(reply.headers["x-request-id"])["trace"]["tiers"]
    assert [(t["model"], t["outcome"], t["reason"]) for t in tiers] == [("cheap", "skipped", "capability"),
                                                                       ("big", "accepted", None)]
    plain = _ask(gateway, grid, 5, "two")
    assert plain.headers["x-frugal-tier-accepted"] == "1" and plain.headers["x-frugal-models-tried"] == "cheap"
    # the same through the openai SDK, streamed: the call arrives in deltas from the tier that could take it
    stream = gateway.client().chat.completions.create(
        model="two", messages=[{"role": "user", "content": grid.queries[5]}], tools=[tool], stream=True)
    deltas = [d for chunk in stream for c in chunk.choices for d in c.delta.tool_calls or []]
    assert [d.function.name for d in deltas if d.function and d.function.name] == ["lookup"]
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"query": grid.queries[5]}


def _stream(gateway: Gateway, grid: Grid, q: int) -> tuple[httpx.Headers, str, dict[str, Any]]:
    body = {"model": "two", "messages": [{"role": "user", "content": grid.queries[q]}], "stream": True,
            "stream_options": {"include_usage": True}, "user": grid.query_ids[q]}
    text, usage = "", {}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, headers=gateway.headers(),
                      timeout=60) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if event["choices"]:
                    text += event["choices"][0]["delta"].get("content") or ""
                usage = event.get("usage") or usage
        return reply.headers, text, usage


def test_streaming_sends_the_accepted_answer(make_gateway: Callable[..., Gateway], synthetic,
                                             synthetic_standin) -> None:
    grid = synthetic[1]
    for threshold, tier, model in ((0.0, "1", "cheap"), (1.0, "2", "big")):
        gateway = make_gateway(_inline(synthetic_standin.url, synthetic, threshold))
        headers, text, usage = _stream(gateway, grid, 9)
        assert headers["x-frugal-tier-accepted"] == tier
        assert text == _recorded(grid, 9, model)
        assert usage["completion_tokens"] >= 1
        row = gateway.ledger_row(headers["x-request-id"])
        assert row["status"] == 200 and row["model"] == model and row["stream"]
        assert [t["model"] for t in row["trace"]["tiers"]] == ["cheap", "big"][:int(tier)]
        assert row["trace"]["saved_usd"] is not None
        assert row["cost_usd"] == pytest.approx(sum(t["cost_usd"] for t in row["trace"]["tiers"]))


def test_cascade_configuration_errors(tmp_path: Path, synthetic) -> None:
    base = {"models": [{"name": n, "backend": f"openai/{n}"} for n, _, _ in MODELS]}

    def check(route: dict[str, Any], message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            parse_config(yaml.safe_dump({**base, "routes": [route]}), "c.yaml", tmp_path)

    check({"name": "r", "kind": "cascade", "scorer": "s", "tiers": [{"model": "cheap", "threshold": 0.5},
                                                                    {"model": "nope"}]}, "unknown models: nope")
    check({"name": "r", "kind": "cascade"}, "exactly one of")
    check({"name": "r", "kind": "cascade", "models": ["cheap"], "tiers": [{"model": "big"}]}, "exactly one of")
    check({"name": "r", "kind": "cascade", "cascade": "missing.yaml"}, "cannot read cascade file")
    check({"name": "r", "models": ["cheap"], "scorer": "s"}, "belong to routes of kind cascade")
    check({"name": "r", "kind": "cascade", "scorer": "s", "tiers": [{"model": "cheap", "threshold": 1.5},
                                                                    {"model": "big"}]}, "less than or equal to 1")
    fitted = parse_config(yaml.safe_dump({**base, "routes": [{"name": "r", "kind": "cascade",
                                                              "cascade": synthetic[2].name}]}),
                          "c.yaml", synthetic[2].parent)
    assert fitted.routes[0].scorer == str(synthetic[2].with_name("cascade.scorer"))
    assert fitted.routes[0].tiers[-1].threshold is None
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**base, "routes": [{"name": "r", "kind": "cascade", "scorer": "nowhere",
                                                          "tiers": [{"model": "cheap", "threshold": 0.5},
                                                                    {"model": "big"}]}]}))
    done = subprocess.run([str(BIN / "frugal"), "serve", "--config", str(config)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "cannot read scorer manifest" in done.stderr
    # a tier the scorer judges needs a threshold; a tier nothing judges may not have one (checked at start-up)
    scorer_dir = synthetic[2].with_name("cascade.scorer")
    for scorer, message in ((str(scorer_dir), "needs a threshold"), (None, "neither a judge nor")):
        tiers = [{"model": "cheap"} if scorer else {"model": "cheap", "threshold": 0.5}, {"model": "big"}]
        route = {"name": "r", "kind": "cascade", "tiers": tiers, **({"scorer": scorer} if scorer else {})}
        config.write_text(yaml.safe_dump({**base, "routes": [route]}))
        done = subprocess.run([str(BIN / "frugal"), "serve", "--config", str(config)], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


# --- a data pack test split through the gateway ---------------------------------------------------

MMLU_MODELS = ("llama3.2-3b", "gpt-4o-mini", "llama3.1-70b", "llama3.1-405b")


def _split_query(query: str) -> list[dict[str, str]]:
    system, user = query.removeprefix("System: ").split("\n\nUser: ", 1)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


@pytest.mark.timeout(600)  # fits a cascade, evaluates it and sends 1,531 queries: ~75 s on a busy 2-core machine
def test_gateway_reproduces_cascade_eval_on_a_test_split(tmp_path: Path,
                                                         make_gateway: Callable[..., Gateway]) -> None:
    data = data_file("zellinger_mmlu.jsonl.gz")
    cascade = tmp_path / "mmlu.yaml"
    frugal = str(BIN / "frugal")
    done = subprocess.run([frugal, "cascade", "fit", "--data", str(data), "--out", str(cascade), "--models",
                           ",".join(MMLU_MODELS), "--folds", "3"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([frugal, "cascade", "eval", "--data", str(data), "--cascade", str(cascade), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    expected = json.loads(done.stdout)["chosen"]
    assert len(expected["tiers"]) >= 2
    prices = yaml.safe_load((Path(__file__).parents[1] / "examples" / "prices" / "zellinger.yaml").read_text())
    provider: Service = standin(tmp_path, [data])
    try:
        models = [model_entry(m, m, provider.url, transport="http", max_retries=0,
                              input_cost_per_token=prices[m][0] / 1e6, output_cost_per_token=prices[m][1] / 1e6)
                  for m in MMLU_MODELS]
        gateway = make_gateway({"models": models,
                                "routes": [{"name": "frugal/auto", "kind": "cascade", "cascade": str(cascade)}]})
        test = load_grid(data).split("test")
        client = httpx.Client(base_url=gateway.url, headers=gateway.headers(), timeout=60)

        def ask(q: int) -> tuple[int, str, float, int]:
            body = {"model": "frugal/auto", "messages": _split_query(test.queries[q]), "user": test.query_ids[q]}
            reply = client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            model = reply.headers["x-frugal-model"]
            assert reply.json()["choices"][0]["message"]["content"] == test.answers[q][test.models.index(model)]
            return q, model, float(reply.headers["x-frugal-cost-usd"]), int(reply.headers["x-frugal-tier-accepted"])

        try:
            ask(0)  # the first request pays the stand-in's tokenizer start-up
            with ThreadPoolExecutor(8) as pool:
                results = list(pool.map(ask, range(len(test))))
        finally:
            client.close()
    finally:
        provider.stop()
    accuracy = sum(test.correct[q, test.models.index(m)] for q, m, _, _ in results) / len(test)
    cost = sum(c for _, _, c, _ in results) / len(test)
    shares = [sum(1 for r in results if r[3] == k + 1) / len(test) for k in range(len(expected["tiers"]))]
    assert accuracy == pytest.approx(expected["accuracy"], abs=1e-6)
    assert cost == pytest.approx(expected["cost_usd"], rel=0.02)
    assert shares == pytest.approx(expected["shares"], abs=1e-6)
