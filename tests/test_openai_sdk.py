"""The official openai SDK, unchanged, against a running gateway, through both transports to the stand-in."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.harness import Gateway, Service, model_entry
from workers.tokens import count_tokens

TRANSPORTS = ["litellm", "http"]


@pytest.fixture(scope="module")
def gateway(standin_server: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    url = standin_server.url
    models = []
    for transport in TRANSPORTS:
        models += [model_entry(f"alpha-{transport}", "alpha", url, transport),
                   model_entry(f"beta-{transport}", "beta", url, transport,
                               input_cost_per_token=3e-6, output_cost_per_token=5e-6)]
    # Providers that need litellm's translation: Anthropic's Messages API, and vLLM's provider prefix.
    models.append({"name": "alpha-anthropic", "backend": "anthropic/alpha", "api_base": url,
                   "api_key_env": "STANDIN_API_KEY", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6})
    models.append({"name": "alpha-vllm", "backend": "hosted_vllm/alpha", "api_base": url + "/v1",
                   "transport": "litellm", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6})
    gw = Gateway(tmp_path_factory.mktemp("gw"), {
        "models": models,
        "routes": [{"name": "frugal/auto", "models": ["alpha-http", "beta-http"]}],
    })
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return gateway.client()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_chat_answers_with_the_recorded_answer(client: openai.OpenAI, gateway: Gateway, transport: str) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=f"alpha-{transport}", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
    )
    response = raw.parse()
    assert response.choices[0].message.content == "Paris."
    assert response.choices[0].finish_reason == "stop"
    assert response.model == f"alpha-{transport}"
    # The recorded token counts, and the cost from the configured prices.
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (14, 2)
    assert float(raw.headers["x-frugal-cost-usd"]) == pytest.approx(14 * 1e-6 + 2 * 2e-6)
    assert raw.headers["x-frugal-model"] == f"alpha-{transport}"
    row = gateway.ledger_row(raw.headers["x-request-id"])
    assert row["status"] == 200 and row["model"] == f"alpha-{transport}"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (14, 2)
    assert row["cost_usd"] == pytest.approx(18e-6)
    assert row["prompt"] is None and row["response"] is None  # content is not stored by default


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_system_prompt_and_user_message_match_the_recorded_query(client: openai.OpenAI, transport: str) -> None:
    response = client.chat.completions.create(
        model=f"alpha-{transport}",
        messages=[{"role": "system", "content": "Answer with one word."},
                  {"role": "user", "content": "Name a primary colour."}],
    )
    assert response.choices[0].message.content == "Red"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_streaming_with_usage(client: openai.OpenAI, gateway: Gateway, transport: str) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=f"beta-{transport}", messages=[{"role": "user", "content": "What is the capital of France?"}],
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of France is Paris, a city on the Seine."
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5  # really incremental
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    # The record has no token counts: the stand-in counts them with a tokenizer.
    assert usage.completion_tokens == count_tokens(text)
    row = gateway.ledger_row(raw.headers["x-request-id"])
    assert row["stream"] is True or row["stream"] == 1
    assert row["status"] == 200 and row["completion_tokens"] == usage.completion_tokens
    assert row["cost_usd"] == pytest.approx(usage.prompt_tokens * 3e-6 + usage.completion_tokens * 5e-6)
    assert row["ttft_ms"] is not None and row["ttft_ms"] <= row["latency_ms"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_streaming_without_usage_sends_no_usage_chunk(client: openai.OpenAI, transport: str) -> None:
    chunks = list(client.chat.completions.create(
        model=f"alpha-{transport}", messages=[{"role": "user", "content": "What is the capital of France?"}],
        stream=True))
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Paris."


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_legacy_completions(client: openai.OpenAI, transport: str) -> None:
    response = client.completions.create(model=f"alpha-{transport}", prompt="What is the capital of France?")
    assert response.choices[0].text == "Paris."
    streamed = list(client.completions.create(model=f"alpha-{transport}",
                                              prompt="What is the capital of France?", stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "Paris."


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_logprobs_pass_through(client: openai.OpenAI, transport: str) -> None:
    response = client.chat.completions.create(
        model=f"alpha-{transport}", messages=[{"role": "user", "content": "What is the capital of France?"}],
        logprobs=True, top_logprobs=1,
    )
    content = response.choices[0].logprobs.content
    assert "".join(t.token for t in content) == "Paris."
    # The stand-in spreads the recorded confidence (-0.05) over the answer's tokens.
    assert sum(t.logprob for t in content) == pytest.approx(-0.05)
    assert all(len(t.top_logprobs) == 1 for t in content)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_max_tokens_stop_and_n(client: openai.OpenAI, transport: str) -> None:
    query = [{"role": "user", "content": "What is the capital of France?"}]
    short = client.chat.completions.create(model=f"beta-{transport}", messages=query, max_tokens=3)
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 3
    stopped = client.chat.completions.create(model=f"beta-{transport}", messages=query, stop=[","])
    assert stopped.choices[0].message.content == "The capital of France is Paris"
    several = client.chat.completions.create(model=f"alpha-{transport}", messages=query, n=2, seed=7)
    assert [c.index for c in several.choices] == [0, 1]
    assert {c.message.content for c in several.choices} == {"Paris."}


@pytest.mark.parametrize("model", ["alpha-anthropic", "alpha-vllm"])
def test_other_providers_through_litellm(client: openai.OpenAI, gateway: Gateway, model: str) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=50)
    response = raw.parse()
    assert response.choices[0].message.content == "Paris."
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (14, 2)
    assert float(raw.headers["x-frugal-cost-usd"]) == pytest.approx(18e-6)
    chunks = list(client.chat.completions.create(
        model=model, stream=True, stream_options={"include_usage": True}, max_tokens=50,
        messages=[{"role": "system", "content": "Answer with one word."},
                  {"role": "user", "content": "Name a primary colour."}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Red"
    assert chunks[-1].usage.completion_tokens == 1


def test_route_answers_with_its_first_model(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="frugal/auto", messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert raw.parse().model == "alpha-http"
    assert raw.headers["x-frugal-route"] == "frugal/auto"
    assert raw.headers["x-frugal-models-tried"] == "alpha-http"


def test_models_lists_models_and_routes(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert ids == {"alpha-litellm", "beta-litellm", "alpha-http", "beta-http", "alpha-anthropic", "alpha-vllm",
                   "frugal/auto"}
    assert client.models.retrieve("frugal/auto").id == "frugal/auto"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")


def test_sdk_sees_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="alpha-http", messages=[{"role": "user", "content": "hi"}],
                                       temperature=9)
    assert bad.value.param == "temperature"
    wrong_key = openai.OpenAI(base_url=str(client.base_url), api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.chat.completions.create(model="alpha-http", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sampling_parameters_reach_the_provider_unchanged(client: openai.OpenAI, standin_server: Service,
                                                         transport: str) -> None:
    import httpx

    sent = {"temperature": 0.3, "top_p": 0.9, "max_tokens": 40, "stop": ["\n\n"], "seed": 11, "user": "u-1",
            "presence_penalty": 0.5, "frequency_penalty": -0.5, "logit_bias": {"50256": -100},
            "response_format": {"type": "json_object"}}
    client.chat.completions.create(model=f"beta-{transport}", messages=[{"role": "user", "content": "Hi?"}], **sent)
    forwarded = httpx.get(standin_server.url + "/_standin/stats").json()["last_params"]["beta"]
    for name, value in sent.items():
        assert forwarded.get(name) == value, (name, forwarded)
