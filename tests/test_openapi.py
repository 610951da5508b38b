"""The gateway's OpenAPI document is complete, and the running gateway keeps to it: schemathesis sends
requests generated from it (valid and invalid ones, a bounded number per operation) and checks that none
gets a server error and every response matches its documented status, content type and schema.
`bench/fuzz.py` runs the same with a larger budget."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi.routing import APIRoute
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
    operations = {(path, method) for path, item in doc["paths"].items() for method in item
                  if not path.startswith("/admin/")}
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
    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json").exclude(path_regex="^/admin")
    sent, findings = fuzz(schema, gateway.url, headers={"authorization": f"Bearer {API_KEY}"}, examples=EXAMPLES,
                          prepare=point_at_a_model,
                          checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                  response_schema_conformance, negative_data_rejection])
    assert sent >= EXAMPLES * 4
    assert not findings, "\n".join(str(f) for f in findings)


def api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    """Every APIRoute, those of included routers included."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        inner = getattr(route, "original_router", None) or getattr(route, "included_router", None)
        if inner is not None:
            yield from api_routes(inner.routes)


def test_every_admin_operation_is_documented(tmp_path: Path) -> None:
    from gateway.app import create_app  # noqa: PLC0415
    from gateway.settings import parse_config  # noqa: PLC0415

    app = create_app(parse_config(f"ledger: {{url: 'sqlite:///{tmp_path / 'l.db'}'}}"))
    served = {(route.path, method.lower()) for route in api_routes(app.routes)
              if route.path.startswith("/admin/") and route.include_in_schema for method in route.methods}
    doc = app.openapi()
    documented = {(path, method) for path, item in doc["paths"].items() if path.startswith("/admin/")
                  for method in item}
    assert served and served == documented
    for path, method in documented:
        operation = doc["paths"][path][method]
        assert operation["security"] == [{"adminKey": []}]
        assert {"401", "403", "404"} <= set(operation["responses"])


ADMIN_KEY = "openapi-admin-key"


def test_the_admin_api_keeps_to_its_document(standin_server: Service, tmp_path: Path) -> None:
    """With the admin key, generated admin requests (valid and invalid) never get a server error or an
    undocumented status."""
    gw = Gateway(tmp_path, {"models": [model_entry("alpha", "alpha", standin_server.url, "http")],
                            "routes": [{"name": "frugal/auto", "models": ["alpha"]}]},
                 {"FRUGAL_ADMIN_KEY": ADMIN_KEY})
    gw.start()
    try:
        schema = schemathesis.openapi.from_url(gw.url + "/openapi.json").include(path_regex="^/admin")
        sent, findings = fuzz(schema, gw.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, examples=6,
                              checks=[not_a_server_error, status_code_conformance, content_type_conformance])
        assert sent >= 6 * 10
        assert not findings, "\n".join(str(f) for f in findings)
    finally:
        gw.stop()
