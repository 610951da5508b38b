"""Requests OpenAI accepts are accepted, and responses have the shapes OpenAI's specification gives them
(the defects found against OpenAI's published spec, issue 22)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.harness import Gateway, Service, model_entry

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gateway(standin_server: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("gw-conformance"),
                 {"models": [model_entry("alpha", "alpha", standin_server.url, "http"),
                             model_entry("alpha-litellm", "alpha", standin_server.url, "litellm")]})
    gw.start()
    yield gw
    gw.stop()


def last_params(standin: Service, model: str) -> dict:
    return httpx.get(standin.url + "/_standin/stats").json()["last_params"][model]


def test_an_explicit_null_means_absent(gateway: Gateway) -> None:
    body = {"model": "alpha", "messages": QUESTION, "tools": None, "tool_choice": None, "temperature": None,
            "logprobs": None, "functions": None, "response_format": None, "stream_options": None, "audio": None,
            "n": None, "stop": None}
    reply = gateway.post("/v1/chat/completions", body)
    assert reply.status_code == 200, reply.text
    reply = gateway.post("/v1/completions", {"model": "alpha", "prompt": "Name a primary colour.", "suffix": None,
                                             "echo": None, "logprobs": None})
    assert reply.status_code == 200, reply.text
    unknown = gateway.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION, "bogus": None})
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unknown_parameter"


def test_responses_carry_no_null_system_fingerprint(gateway: Gateway) -> None:
    body = gateway.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION}).json()
    assert body.get("system_fingerprint", "absent") is not None


def test_completion_log_probs_have_text_offsets(gateway: Gateway) -> None:
    prompt = "What is the capital of France?"
    choice = gateway.post("/v1/completions", {"model": "alpha", "prompt": prompt, "logprobs": 2}).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["text_offset"]) == len(logprobs["tokens"]) > 0
    assert logprobs["text_offset"][0] == len(prompt)
    for offset, token in zip(logprobs["text_offset"], logprobs["tokens"], strict=True):
        assert choice["text"][offset - len(prompt):].startswith(token)


def test_a_wrong_method_answers_405_with_allow(gateway: Gateway) -> None:
    reply = httpx.get(gateway.url + "/v1/chat/completions")
    assert reply.status_code == 405 and reply.headers["allow"] == "POST"
    assert reply.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("model", ["alpha", "alpha-litellm"])
def test_newer_parameters_are_forwarded(gateway: Gateway, standin_server: Service, model: str) -> None:
    body = {"model": model, "messages": QUESTION, "verbosity": "low", "safety_identifier": "user-hash-1",
            "prompt_cache_key": "k1", "reasoning_effort": "low", "stream": True,
            "stream_options": {"include_usage": True, "include_obfuscation": False}}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, headers=gateway.headers(),
                      timeout=30) as reply:
        assert reply.status_code == 200
        text = "".join(reply.iter_text())
    assert text.rstrip().endswith("data: [DONE]") and '"obfuscation"' not in text
    sent = last_params(standin_server, "alpha")
    assert (sent["verbosity"], sent["safety_identifier"], sent["prompt_cache_key"], sent["reasoning_effort"]) \
        == ("low", "user-hash-1", "k1", "low")


def test_moderation_is_clearly_unsupported(gateway: Gateway) -> None:
    reply = gateway.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION, "moderation": {}})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "unsupported_parameter"


def test_a_completion_takes_several_prompts_and_token_ids(gateway: Gateway) -> None:
    prompts = ["What is the capital of France?", "Name a primary colour."]
    body = gateway.post("/v1/completions", {"model": "alpha", "prompt": prompts, "n": 2}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][0]["text"] == body["choices"][1]["text"] == "Paris."
    alone = gateway.post("/v1/completions", {"model": "alpha", "prompt": prompts[1]}).json()
    assert body["choices"][2]["text"] == body["choices"][3]["text"] == alone["choices"][0]["text"] != "Paris."
    assert body["usage"]["prompt_tokens"] > 0
    # "What is the capital of France?" in cl100k_base token ids
    from workers.tokens import _encoding

    ids = _encoding().encode(prompts[0])
    for prompt in (ids, [ids]):
        reply = gateway.post("/v1/completions", {"model": "alpha", "prompt": prompt})
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == "Paris."
    refused = gateway.post("/v1/completions", {"model": "alpha", "prompt": prompts, "stream": True})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "unsupported_value"
