"""Tool calls and content parts through the gateway, with the unchanged openai SDK, over every transport
(direct HTTP, litellm to an OpenAI-compatible server, litellm translating for Anthropic's Messages API), to
the stand-in provider, whose tool calls are synthetic and deterministic (standin/tools.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.harness import Gateway, Service, model_entry

QUESTION = "What is the capital of France?"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
MODELS = ["alpha-http", "alpha-litellm", "alpha-anthropic"]


@pytest.fixture(scope="module")
def gateway(standin_server: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    url = standin_server.url
    models = [model_entry("alpha-http", "alpha", url, "http"), model_entry("alpha-litellm", "alpha", url, "litellm"),
              {"name": "alpha-anthropic", "backend": "anthropic/alpha", "api_base": url,
               "api_key_env": "STANDIN_API_KEY", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
              model_entry("alpha-text", "alpha", url, "http", capabilities=[])]
    gw = Gateway(tmp_path_factory.mktemp("gw-tools"), {
        "models": models,
        "routes": [{"name": "text-first", "models": ["alpha-text", "alpha-http"]},
                   {"name": "text-only", "models": ["alpha-text"]}],
    })
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return gateway.client()


def ask(**extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": QUESTION}], "tools": [WEATHER, CLOCK], **extra}


@pytest.mark.parametrize("model", MODELS)
def test_a_tool_call_comes_back_whole_and_is_billed(client: openai.OpenAI, gateway: Gateway, model: str) -> None:
    raw = client.chat.completions.with_raw_response.create(model=model, **ask())
    response = raw.parse()
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"city": QUESTION, "unit": "celsius"}
    assert response.usage.completion_tokens > 0
    row = gateway.ledger_row(raw.headers["x-request-id"])
    assert row["status"] == 200 and row["completion_tokens"] == response.usage.completion_tokens
    assert row["cost_usd"] == pytest.approx(float(raw.headers["x-frugal-cost-usd"])) and row["cost_usd"] > 0


@pytest.mark.parametrize("model", MODELS)
def test_a_streamed_tool_call_arrives_in_deltas_that_add_up(client: openai.OpenAI, gateway: Gateway,
                                                           model: str) -> None:
    stream = client.chat.completions.create(model=model, stream=True, stream_options={"include_usage": True},
                                            **ask(tool_choice={"type": "function", "function": {"name": "get_time"}}))
    names, arguments, finish, usage, ids = [], "", None, None, set()
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                ids.add(delta.id) if delta.id else None
                if delta.function and delta.function.name:
                    names.append(delta.function.name)
                arguments += (delta.function.arguments or "") if delta.function else ""
    assert names == ["get_time"] and json.loads(arguments) == {} and len(ids) == 1
    assert finish == "tool_calls" and usage is not None and usage.completion_tokens > 0


@pytest.mark.parametrize("model", MODELS)
def test_after_the_tool_s_result_the_model_answers(client: openai.OpenAI, model: str) -> None:
    first = client.chat.completions.create(model=model, **ask())
    call = first.choices[0].message.tool_calls[0]
    messages = [{"role": "user", "content": QUESTION},
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees."}]
    answer = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER])
    assert answer.choices[0].message.content == "Paris." and answer.choices[0].finish_reason == "stop"


def test_a_model_that_cannot_call_tools_is_skipped(client: openai.OpenAI, gateway: Gateway) -> None:
    raw = client.chat.completions.with_raw_response.create(model="text-first", **ask())
    assert raw.parse().choices[0].message.tool_calls[0].function.name == "get_weather"
    assert raw.headers["x-frugal-model"] == "alpha-http"
    assert raw.headers["x-frugal-models-tried"] == "alpha-http"
    attempts = gateway.ledger_row(raw.headers["x-request-id"])["trace"]["attempts"]
    assert [(a["model"], a["outcome"]) for a in attempts] == [("alpha-text", "skipped_capability"),
                                                             ("alpha-http", "ok")]
    # without tools the same route answers with its first model
    plain = client.chat.completions.with_raw_response.create(
        model="text-first", messages=[{"role": "user", "content": QUESTION}])
    assert plain.headers["x-frugal-model"] == "alpha-text"


def test_a_route_with_no_capable_model_refuses_clearly(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="text-only", **ask())
    error = refused.value.body
    assert refused.value.status_code == 400 and error["code"] == "unsupported_content" and error["param"] == "tools"
    assert "tool calls" in error["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="text-only", messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE]}])
    assert refused.value.body["param"] == "messages" and "image inputs" in refused.value.body["message"]


def test_text_parts_work_everywhere_and_images_go_to_a_model_that_takes_them(client: openai.OpenAI) -> None:
    parts = [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]
    for model in ("text-only", *MODELS):
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": parts}])
        assert answer.choices[0].message.content, model
    raw = client.chat.completions.with_raw_response.create(model="text-first", messages=[
        {"role": "user", "content": [{"type": "text", "text": QUESTION}, IMAGE]}])
    assert raw.headers["x-frugal-model"] == "alpha-http"


def test_a_tool_call_is_served_from_the_exact_cache_streamed_or_not(client: openai.OpenAI) -> None:
    first = client.chat.completions.with_raw_response.create(model="alpha-http", temperature=0, **ask())
    again = client.chat.completions.with_raw_response.create(model="alpha-http", temperature=0, **ask())
    assert again.headers["x-frugal-cache"] == "hit"
    assert again.parse().choices[0].message.tool_calls == first.parse().choices[0].message.tool_calls
    assert again.parse().choices[0].finish_reason == "tool_calls"
    streamed = client.chat.completions.create(model="alpha-http", temperature=0, stream=True, **ask())
    deltas = [d for chunk in streamed for c in chunk.choices for d in c.delta.tool_calls or []]
    assert [d.function.name for d in deltas if d.function and d.function.name] == ["get_weather"]
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": QUESTION, "unit": "celsius"}
