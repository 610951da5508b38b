"""The gateway's OpenAPI document is complete, and the running gateway keeps to it: schemathesis sends
requests generated from it (valid and invalid ones, a bounded number per operation) and checks that none
gets a server error and every response matches its documented status, content type and schema.
`bench/fuzz.py` runs the same with a larger budget."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from schemathesis import Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conformance import fuzz
from tests.harness import API_KEY, Gateway, Service, model_entry

EXAMPLES = 40


@pytest.fixture(scope="module")
def gateway(standin_server: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("gw-openapi"), {
        "models": [model_entry("alpha", "alpha", standin_server.url, "http")],
        "routes": [{"name": "frugal/auto", "models": ["alpha"]}],
        "limits": {"max_body_bytes": 262144},
    })
    gw.start()
    yield gw
    gw.stop()


def test_the_document_describes_every_public_operation(gateway: Gateway) -> None:
    doc = httpx.get(gateway.url + "/openapi.json").json()
    operations = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert operations == {("/v1/chat/completions", "post"), ("/v1/completions", "post"), ("/v1/models", "get"),
                          ("/v1/models/{model}", "get"), ("/healthz", "get"), ("/readyz", "get"),
                          ("/metrics", "get"), ("/v1/feedback", "post")}
    for path, method in operations:
        operation = doc["paths"][path][method]
        assert operation["responses"]["200"]["content"], (path, method)
        if method == "post":
            assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert {"400", "401", "404", "413"} <= set(operation["responses"])
            if path != "/v1/feedback":
                assert "429" in operation["responses"]
    assert doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"] == {"text/plain": {"schema": {
        "type": "string"}}}
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "tools", "tool_choice", "response_format", "stream_options"} <= set(chat)


def point_at_a_model(case: Case, mode: GenerationMode) -> None:
    """Valid bodies name a configured model (a random name would only ever get 404)."""
    if mode == GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "frugal/auto"


def test_the_gateway_keeps_to_its_own_document(gateway: Gateway) -> None:
    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
    sent, findings = fuzz(schema, gateway.url, headers={"authorization": f"Bearer {API_KEY}"}, examples=EXAMPLES,
                          prepare=point_at_a_model,
                          checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                  response_schema_conformance, negative_data_rejection])
    assert sent >= EXAMPLES * 4
    assert not findings, "\n".join(str(f) for f in findings)
