"""The stand-in provider replays real LLMs' recorded answers (the shared data pack), through the gateway
and litellm exactly as a real provider would be driven."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from standin.data import RecordedAnswers, deterministic_answer
from tests.harness import API_KEY, BIN, Gateway, Service, data_file, free_port, standin

# USD per million tokens (in, out), as the source of zellinger_mmlu priced its models (its MANIFEST.md).
MMLU_PRICES = {
    "llama3.2-1b": (0.10, 0.10), "llama3.2-3b": (0.10, 0.10), "llama3.1-8b": (0.20, 0.20),
    "llama3.1-70b": (0.90, 0.90), "llama3.1-405b": (3.00, 3.00), "gpt-4o-mini": (0.15, 0.60),
    "qwen2.5-32b-coder-instruct": (0.90, 0.90), "qwen2.5-72b-instruct": (0.90, 0.90), "gpt-4o": (2.50, 10.00),
}


def rows(path: Path, queries: int) -> list[dict]:
    """Every model's row for the first `queries` test queries of a data file."""
    out: list[dict] = []
    seen: list[str] = []
    with gzip.open(path, "rt") as handle:
        for line in handle:
            row = json.loads(line)
            if row["split"] != "test":
                continue
            if row["query_id"] not in seen:
                if len(seen) == queries:
                    break
                seen.append(row["query_id"])
            out.append(row)
    return out


def messages_for(query: str) -> list[dict[str, str]]:
    """The chat the source sent: `System: ...\\n\\nUser: ...` as two messages, else one user message."""
    if query.startswith("System: ") and "\n\nUser: " in query:
        system, user = query[len("System: "):].split("\n\nUser: ", 1)
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return [{"role": "user", "content": query}]


@pytest.fixture(scope="module")
def pack() -> dict[str, Path]:
    return {"mmlu": data_file("zellinger_mmlu.jsonl.gz"), "mbpp": data_file("routerbench_mbpp.jsonl.gz")}


@pytest.fixture(scope="module")
def recorded(pack: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Gateway]]:
    tmp = tmp_path_factory.mktemp("recorded")
    server = standin(tmp, list(pack.values()))
    models = []
    mbpp_models = sorted({r["model"] for r in rows(pack["mbpp"], 1)})
    for name, (price_in, price_out) in MMLU_PRICES.items():
        models.append({"name": name, "backend": f"openai/{name}", "api_base": server.url + "/v1",
                       "api_key_env": "STANDIN_API_KEY", "transport": "litellm", "input_cost_per_token": price_in / 1e6,
                       "output_cost_per_token": price_out / 1e6})
    for name in mbpp_models:  # names such as "WizardLM/WizardLM-13B-V1.2" keep their slash upstream
        models.append({"name": name, "backend": f"openai/{name}", "api_base": server.url + "/v1",
                       "api_key_env": "STANDIN_API_KEY", "transport": "litellm"})
    gateway = Gateway(tmp, {"models": models})
    gateway.start()
    yield server, gateway
    gateway.stop()
    server.stop()


def test_recorded_answers_tokens_and_costs_come_back_through_the_gateway(
        recorded: tuple[Service, Gateway], pack: dict[str, Path]) -> None:
    _, gateway = recorded
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0)
    sample = rows(pack["mmlu"], 4)
    assert len(sample) == 4 * len(MMLU_PRICES)
    for row in sample:
        raw = client.chat.completions.with_raw_response.create(
            model=row["model"], messages=messages_for(row["query"]), temperature=0, logprobs=True)
        response = raw.parse()
        assert response.choices[0].message.content == row["answer"]
        assert response.usage.prompt_tokens == row["input_tokens"]
        assert response.usage.completion_tokens == row["output_tokens"]
        # Our configured prices reproduce the cost the source recorded for the same call.
        assert float(raw.headers["x-frugal-cost-usd"]) == pytest.approx(row["cost_usd"], rel=1e-6)
        # The recorded answer-token log-prob comes back as the answer's log-probs.
        logprob = sum(t.logprob for t in response.choices[0].logprobs.content)
        assert logprob == pytest.approx(row["confidence"], abs=1e-6)


def test_long_recorded_answers_stream_back_exactly(recorded: tuple[Service, Gateway], pack: dict[str, Path]) -> None:
    _, gateway = recorded
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0)
    for row in rows(pack["mbpp"], 2):
        stream = client.chat.completions.create(model=row["model"], messages=messages_for(row["query"]),
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == row["answer"]
        assert chunks[-1].usage.completion_tokens > 0


def test_unrecorded_prompts_get_a_deterministic_answer(recorded: tuple[Service, Gateway]) -> None:
    server, _ = recorded
    ask = lambda model, text: httpx.post(server.url + "/v1/chat/completions", json={  # noqa: E731
        "model": model, "messages": [{"role": "user", "content": text}]}).json()["choices"][0]["message"]["content"]
    first = ask("gpt-4o", "Is this prompt in the data?")
    assert first == ask("gpt-4o", "Is this prompt in the data?")
    assert first == deterministic_answer("gpt-4o", "Is this prompt in the data?")
    assert first != ask("llama3.2-1b", "Is this prompt in the data?")


def test_stand_in_lists_recorded_models(recorded: tuple[Service, Gateway]) -> None:
    server, _ = recorded
    ids = {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert set(MMLU_PRICES) <= ids and "WizardLM/WizardLM-13B-V1.2" in ids


def test_recorded_answers_index(tmp_path: Path) -> None:
    from tests.harness import TINY_ROWS, write_dataset

    answers = RecordedAnswers.load([write_dataset(tmp_path / "t.jsonl.gz", TINY_ROWS)])
    assert len(answers) == 2 and answers.models == {"alpha", "beta"}
    assert answers.find("alpha", ["nope", "What is the capital of France?"]).answer == "Paris."
    assert answers.find("gamma", ["What is the capital of France?"]) is None


def test_injected_error_rate_and_status(tiny_data: Path, tmp_path: Path) -> None:
    server = standin(tmp_path, [tiny_data], ["--error-rate", "1", "--error-status", "503"])
    try:
        response = httpx.post(server.url + "/v1/chat/completions",
                              json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 503 and response.json()["error"]["type"] == "server_error"
    finally:
        server.stop()


def test_required_api_key(tiny_data: Path, tmp_path: Path) -> None:
    server = standin(tmp_path, [tiny_data], ["--api-key", "sk-upstream"])
    try:
        body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(server.url + "/v1/chat/completions", json=body).status_code == 401
        ok = httpx.post(server.url + "/v1/chat/completions", json=body,
                        headers={"authorization": "Bearer sk-upstream"})
        assert ok.status_code == 200
    finally:
        server.stop()


def test_stand_in_refuses_to_listen_beyond_loopback(tiny_data: Path) -> None:
    import subprocess

    done = subprocess.run([str(BIN / "frugal"), "stand-in", "--data", str(tiny_data), "--host", "0.0.0.0",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "loopback" in done.stderr
