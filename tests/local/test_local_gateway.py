"""`model: local/smollm2-135m-instruct` through the gateway with the official openai SDK, and the CLI."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.harness import BIN, Gateway, Service, model_entry, wait_until

# Model builds happen in fixtures, which count towards the first test's timeout.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def gateway(built: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("local-gw"), {"models": [
        {"name": "local/smollm2-135m-instruct", "backend": "local/smollm2-135m-instruct",
         "model_dir": str(built("int8")), "threads": 2},
        {"name": "local/priced", "backend": "local/smollm2-135m-instruct", "model_dir": str(built("int8")),
         "input_cost_per_token": 1e-8, "output_cost_per_token": 2e-8},
    ], "cache": {"exact": {"enabled": False}}})  # these tests ask the model the same greedy question again
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return gateway.client()


def test_local_model_answers_paris(client: openai.OpenAI, gateway: Gateway) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="local/smollm2-135m-instruct", temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    response = raw.parse()
    assert "Paris" in response.choices[0].message.content
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.prompt_tokens > 20 and response.usage.completion_tokens > 3
    row = gateway.ledger_row(raw.headers["x-request-id"])
    assert row["status"] == 200 and row["cost_usd"] == 0 and row["model"] == "local/smollm2-135m-instruct"


def test_local_model_streams(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="local/smollm2-135m-instruct", temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "What is the capital of France?"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    assert chunks[-1].usage.completion_tokens > 3


def test_local_logprobs_and_configured_price(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="local/priced", temperature=0, logprobs=True, top_logprobs=2, max_tokens=8,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    response = raw.parse()
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens and all(t.logprob <= 0 for t in content)
    expected = response.usage.prompt_tokens * 1e-8 + response.usage.completion_tokens * 2e-8
    assert float(raw.headers["x-frugal-cost-usd"]) == pytest.approx(expected)


def test_local_legacy_completion(client: openai.OpenAI) -> None:
    response = client.completions.create(model="local/smollm2-135m-instruct", prompt="The capital of France is",
                                         max_tokens=4, temperature=0)
    assert "Paris" in response.choices[0].text


def test_unsupported_parameter_for_local_models_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="local/smollm2-135m-instruct", response_format={"type": "json_object"},
                                       messages=[{"role": "user", "content": "hi"}])
    assert "response_format" in error.value.message


def test_models_list_json(built: Callable[..., Path], models_root: Path) -> None:
    built("int8")
    done = subprocess.run([str(BIN / "frugal"), "models", "list", "--json", "--out", str(models_root)],
                          capture_output=True, text=True, timeout=120)
    listed = json.loads(done.stdout)
    entry = next(m for m in listed if m["path"].endswith("smollm2-135m-instruct-int8"))
    assert entry["kind"] == "decoder" and entry["size_bytes"] > 50_000_000 and "int8" in entry["quant"]


def test_unsupported_architecture_is_refused_clearly(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "tiny-falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    done = subprocess.run([str(BIN / "frugal"), "models", "build", str(path), "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unsupported architecture 'falcon'" in done.stderr and "Traceback" not in done.stderr


def test_generate_command(built: Callable[..., Path], models_root: Path) -> None:
    import os

    built("int8")
    done = subprocess.run([str(BIN / "frugal"), "generate", "--prompt", "What is the capital of France?", "--json"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "FRUGAL_MODELS_DIR": str(models_root)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert "Paris" in result["text"] and result["finish_reason"] == "stop"
    assert result["usage"]["completion_tokens"] > 3 and result["decode_tokens_per_s"] > 0


def metric(gateway: Gateway, name: str, model: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(gateway.url + "/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("model") == model:
                return sample.value
    raise AssertionError(f"{name}{{model={model!r}}} is not exported")


def test_a_busy_local_model_answers_503_with_retry_after_or_overflows_along_a_route(
        built: Callable[..., Path], make_gateway: Callable[..., Gateway], standin_server: Service) -> None:
    """One slot and no queue: while a stream holds the slot, the model itself refuses at once (503 with
    Retry-After, recorded in the ledger), a route moves on to its next model, and the gauges show it."""
    gateway = make_gateway({
        "models": [{"name": "local/busy", "backend": "local/smollm2-135m-instruct", "model_dir": str(built("int8")),
                    "threads": 2, "max_retries": 0, "serving": {"max_batch": 1, "max_queue": 0}},
                   model_entry("remote", "alpha", standin_server.url)],
        "routes": [{"name": "overflow", "models": ["local/busy", "remote"]}],
    })
    body = {"model": "local/busy", "stream": True, "max_tokens": 400, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}]}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, headers=gateway.headers(),
                      timeout=120) as holding:
        lines = holding.iter_lines()
        assert next(line for line in lines if line.startswith("data: ") and '"content"' in line)
        refused = gateway.post("/v1/chat/completions", {"model": "local/busy", "max_tokens": 4,
                                                        "messages": [{"role": "user", "content": "Hi"}]})
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "model_overloaded"
        assert int(refused.headers["retry-after"]) >= 1
        routed = gateway.post("/v1/chat/completions", {"model": "overflow", "max_tokens": 8, "messages": [
            {"role": "user", "content": "What is the capital of France?"}]})
        assert routed.status_code == 200 and routed.headers["x-frugal-model"] == "remote"
        assert routed.headers["x-frugal-models-tried"] == "local/busy,remote"
        assert metric(gateway, "frugal_local_batch_size", "local/busy") == 1
        assert metric(gateway, "frugal_local_queue_depth", "local/busy") == 0
        assert metric(gateway, "frugal_local_rejected_total", "local/busy") == 2
    assert gateway.ledger_row(refused.headers["x-request-id"])["status"] == 503
    # The local model was never put in cooldown for being busy: it answers once the slot is free.
    answered = wait_until(lambda: (r := gateway.post("/v1/chat/completions", {
        "model": "local/busy", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})).status_code == 200
        and r, 60, "the slot to be freed")
    assert answered.headers["x-frugal-model"] == "local/busy"
