"""OpenAI's own published specification against the gateway (the subset of the operations it implements,
tests/openai_spec/): schemathesis generates requests from OpenAI's request schemas, valid and invalid. No
request may get a server error; every 200 must match OpenAI's response schema; invalid requests must be
refused; and a valid request may be refused only where the gateway differs on purpose, each difference
listed below with its reason (and in docs/gateway.md)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis import Case, GenerationMode
from schemathesis.checks import negative_data_rejection, not_a_server_error, response_schema_conformance

from tests.conformance import fuzz
from tests.harness import API_KEY, Gateway, Service, model_entry

SPEC = Path(__file__).parent / "openai_spec" / "openai-openapi-subset.json"
EXAMPLES = 50

#: (error code, param pattern) -> why a request valid by OpenAI's schema is refused. `[]` stands for any index.
DELIBERATE: dict[tuple[str, str], str] = {
    ("unsupported_parameter", "audio"): "audio output is not implemented",
    ("unsupported_parameter", "modalities"): "only text output (modalities [\"text\"] is accepted)",
    ("unsupported_parameter", "prediction"): "predicted outputs are not implemented",
    ("unsupported_parameter", "web_search_options"): "web search is not implemented",
    ("unsupported_parameter", "store"): "stored completions are not implemented (store: false is accepted)",
    ("unsupported_parameter", "metadata"): "metadata of stored completions (accepted without store: true)",
    ("unsupported_parameter", "service_tier"): "flex, scale and priority change the provider's price (auto and "
                                               "default are accepted)",
    ("unsupported_parameter", "moderation"): "OpenAI's moderation is not run",
    ("unsupported_parameter", "echo"): "echo is not implemented (echo: false is accepted)",
    ("unsupported_parameter", "best_of"): "best_of is not implemented (best_of: 1 is accepted)",
    ("unsupported_parameter", "suffix"): "suffix is not implemented",
    ("unknown_parameter", "*"): "properties OpenAI's schema leaves open (no additionalProperties: false); OpenAI's "
                                "own server refuses them as unrecognized too",
    ("invalid_value", "tool_choice"): "tool_choice without tools (OpenAI's server refuses it too)",
    ("invalid_value", "parallel_tool_calls"): "parallel_tool_calls without tools (OpenAI's server refuses it too)",
    ("invalid_value", "top_logprobs"): "top_logprobs without logprobs: true (OpenAI's server refuses it too)",
    ("invalid_value", "stream_options"): "stream_options without stream (OpenAI's server refuses it too)",
    ("invalid_value", "max_tokens"): "below 1, or beyond a 64-bit integer",
    ("invalid_value", "max_completion_tokens"): "below 1, or beyond a 64-bit integer",
    ("invalid_value", "seed"): "beyond a 64-bit integer",
    ("invalid_value", "logit_bias.*"): "a bias beyond ±100 (OpenAI's documented range, not in its schema)",
    ("invalid_value", "*.name"): "function and schema names: non-empty, ^[a-zA-Z0-9_-]{1,64}$ for functions "
                                 "(OpenAI's documented rule, not in its schema)",
    ("invalid_value", "prompt*"): "an empty prompt list, or token ids outside cl100k_base",
}


def deliberate(code: str, param: str | None) -> str | None:
    """Why (code, param) is a listed difference, or None."""
    shape = re.sub(r"\[\d+\]", "[]", param or "")
    for (listed_code, pattern), reason in DELIBERATE.items():
        if code == listed_code and fnmatch.fnmatchcase(shape, pattern):
            return reason
    return None


@pytest.fixture(scope="module")
def gateway(standin_server: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("gw-openai-spec"), {
        "models": [model_entry("alpha", "alpha", standin_server.url, "http")],
        "limits": {"max_body_bytes": 1048576},
    })
    gw.start()
    yield gw
    gw.stop()


def point_at_a_model(case: Case, mode: GenerationMode) -> None:
    """A configured model for valid bodies (random names would only ever get 404)."""
    if mode == GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "alpha"


def judge(case: Case, mode: GenerationMode, response: Any) -> str | None:
    if response.status_code < 400:
        return None
    error = response.json().get("error")
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"not OpenAI's error shape: {response.text[:200]}"
    if mode == GenerationMode.NEGATIVE or response.status_code == 401:
        return None
    if response.status_code == 404 and error["code"] == "model_not_found":
        return None  # OpenAI's answer to a model it does not serve, too (retrieveModel of a random name)
    if response.status_code == 400 and deliberate(error["code"], error["param"]) is not None:
        return None
    return f"a valid request refused, and not a listed difference: {error}"


def test_the_deliberate_differences_match_what_the_gateway_says() -> None:
    assert deliberate("unsupported_parameter", "audio") and deliberate("unknown_parameter", "messages[3].foo")
    assert deliberate("invalid_value", "tools[0].function.name") and deliberate("invalid_value", "prompt[2]")
    assert deliberate("invalid_value", "messages[0].content") is None
    assert deliberate("unsupported_parameter", "tools") is None


def test_openai_s_specification_against_the_gateway(gateway: Gateway) -> None:
    schema = schemathesis.openapi.from_path(str(SPEC))
    sent, findings = fuzz(schema, gateway.url + "/v1", headers={"authorization": f"Bearer {API_KEY}"},
                          examples=EXAMPLES, prepare=point_at_a_model, judge=judge,
                          checks=[not_a_server_error, response_schema_conformance, negative_data_rejection])
    assert sent >= EXAMPLES * 4
    assert not findings, "\n".join(str(f) for f in findings)
