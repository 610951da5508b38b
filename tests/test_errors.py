"""Every error class, in OpenAI's shape with the right status, through both transports; no client input
yields a 500."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.harness import Gateway, Service, model_entry

TRANSPORTS = ["litellm", "http"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def upstream(prefix: str) -> str:
    """A model name the stand-in has never seen, so a fault rule for it touches no other test."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Faulty:
    """Models whose stand-in upstream misbehaves in a given way, declared before the gateway starts."""

    def __init__(self) -> None:
        self.names = {kind: upstream(kind) for kind in
                      ("broken", "hang", "reject", "auth", "limited", "midstream", "flaky")}


def add_fault(standin: Service, **rule: object) -> None:
    httpx.post(standin.url + "/_standin/faults", json=rule).raise_for_status()


def standin_calls(standin: Service, model: str) -> int:
    return httpx.get(standin.url + "/_standin/stats").json()["requests"].get(model, 0)


@pytest.fixture(scope="module", params=TRANSPORTS)
def setup(request: pytest.FixtureRequest, standin_server: Service,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Faulty, str]]:
    transport = request.param
    faulty = Faulty()
    url = standin_server.url
    names = faulty.names
    add_fault(standin_server, model=names["broken"], status=500)
    add_fault(standin_server, model=names["hang"], hang=True)
    add_fault(standin_server, model=names["reject"], status=400, message="bad things in the request")
    add_fault(standin_server, model=names["auth"], status=401, message="Incorrect API key provided")
    add_fault(standin_server, model=names["limited"], status=429)
    add_fault(standin_server, model=names["midstream"], fail_after_chunks=3)
    models = [
        model_entry("alpha", "alpha", url, transport),
        model_entry("beta", "beta", url, transport),
        model_entry("broken", names["broken"], url, transport, max_retries=1),
        model_entry("hang", names["hang"], url, transport, timeout_s=0.5, max_retries=0),
        model_entry("reject", names["reject"], url, transport),
        model_entry("auth", names["auth"], url, transport),
        model_entry("limited", names["limited"], url, transport, max_retries=1),
        model_entry("midstream", names["midstream"], url, transport, max_retries=0),
    ]
    gateway = Gateway(tmp_path_factory.mktemp(f"errors-{transport}"), {
        "models": models,
        "routes": [{"name": "with-fallback", "models": ["broken", "alpha"]},
                   {"name": "rejecting", "models": ["reject", "alpha"]}],
        "auth": {"keys": [{"id": "test-key", "key_env": "FRUGAL_TEST_KEY"},
                          {"id": "slow-key", "key_env": "FRUGAL_SLOW_KEY", "requests_per_minute": 2}]},
        "limits": {"max_body_bytes": 4096},
        "retry": {"backoff_base_s": 0.01, "backoff_max_s": 0.05},
        # Cooldown is tested on its own gateway (test_router.py); keep it out of the way here.
        "cooldown": {"failures": 1000},
    }, env={"FRUGAL_SLOW_KEY": "sk-slow"})
    gateway.start()
    yield gateway, faulty, transport
    gateway.stop()


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def test_400_bad_bodies(setup: tuple[Gateway, Faulty, str]) -> None:
    gw, _, _ = setup
    assert_error(gw.post("/v1/chat/completions", content=b"{not json"), 400, "invalid_json")
    assert_error(gw.post("/v1/chat/completions", content=b""), 400, "invalid_json")
    assert_error(gw.post("/v1/chat/completions", content=b"[1, 2]"), 400, "invalid_json")
    assert_error(gw.post("/v1/chat/completions", {"messages": QUESTION}), 400, param="model")
    assert_error(gw.post("/v1/chat/completions", {"model": "alpha", "messages": []}), 400, param="messages")
    assert_error(gw.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION, "top_p": 2}),
                 400, "invalid_value", "top_p")
    assert_error(gw.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION, "bogus": 1}),
                 400, "unknown_parameter", "bogus")
    error = assert_error(gw.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION,
                                                          "audio": {"voice": "alloy", "format": "mp3"}}),
                         400, "unsupported_parameter", "audio")
    assert "not supported" in error["message"]
    assert_error(gw.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION,
                                                  "tools": [{"type": "function"}]}),
                 400, "missing_required_parameter", "tools[0].function")
    assert_error(gw.post("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": 1}]}),
                 400, param="messages[0].content")
    assert_error(gw.post("/v1/completions", {"model": "alpha", "prompt": []}), 400, param="prompt")


def test_401_missing_and_unknown_keys(setup: tuple[Gateway, Faulty, str]) -> None:
    gw, _, _ = setup
    missing = assert_error(gw.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION}, auth=False),
                           401, "invalid_api_key")
    assert missing["type"] == "authentication_error"
    assert_error(gw.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION}, auth=False,
                         headers={"authorization": "Bearer sk-nope"}), 401)
    assert_error(gw.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION}, auth=False,
                         headers={"authorization": "Basic dXNlcjpwYXNz"}), 401)
    assert httpx.get(gw.url + "/v1/models").status_code == 401


def test_404_unknown_model_and_path(setup: tuple[Gateway, Faulty, str]) -> None:
    gw, _, _ = setup
    assert_error(gw.post("/v1/chat/completions", {"model": "gpt-17", "messages": QUESTION}), 404,
                 "model_not_found", "model")
    assert_error(gw.post("/v1/chat/completion", {"model": "alpha", "messages": QUESTION}), 404, "unknown_url")
    assert_error(httpx.get(gw.url + "/v1/chat/completions"), 405, "method_not_allowed")


def test_413_body_over_limit(setup: tuple[Gateway, Faulty, str]) -> None:
    gw, _, _ = setup
    big = [{"role": "user", "content": "x" * 5000}]
    assert_error(gw.post("/v1/chat/completions", {"model": "alpha", "messages": big}), 413, "request_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        yield b'{"model": "alpha", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    response = httpx.post(gw.url + "/v1/chat/completions", content=chunked(), headers=gw.headers())
    assert_error(response, 413, "request_too_large")


def test_429_rate_limit_per_key_with_retry_after(setup: tuple[Gateway, Faulty, str]) -> None:
    gw, _, _ = setup
    slow = {"authorization": "Bearer sk-slow"}
    statuses = [gw.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION}, auth=False,
                        headers=slow) for _ in range(3)]
    assert [r.status_code for r in statuses[:2]] == [200, 200]
    assert_error(statuses[2], 429, "rate_limit_exceeded")
    assert int(statuses[2].headers["retry-after"]) >= 1
    # Other keys are not affected.
    assert gw.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION}).status_code == 200


def test_502_when_upstream_keeps_failing_after_retries(setup: tuple[Gateway, Faulty, str],
                                                        standin_server: Service) -> None:
    gw, faulty, _ = setup
    before = standin_calls(standin_server, faulty.names["broken"])
    response = gw.post("/v1/chat/completions", {"model": "broken", "messages": QUESTION})
    assert_error(response, 502, "upstream_error")
    assert standin_calls(standin_server, faulty.names["broken"]) - before == 2  # one try + one retry
    row = gw.ledger_row(response.headers["x-request-id"])
    assert row["status"] == 502 and row["models_tried"] == ["broken"] and row["cost_usd"] == 0
    assert [a["outcome"] for a in row["trace"]["attempts"]] == ["server_error", "server_error"]


def test_502_when_provider_rejects_our_credentials(setup: tuple[Gateway, Faulty, str]) -> None:
    gw, _, _ = setup
    assert_error(gw.post("/v1/chat/completions", {"model": "auth", "messages": QUESTION}), 502, "upstream_error")


def test_504_when_upstream_hangs(setup: tuple[Gateway, Faulty, str]) -> None:
    gw, _, _ = setup
    assert_error(gw.post("/v1/chat/completions", {"model": "hang", "messages": QUESTION}), 504, "upstream_timeout")
    streamed = gw.post("/v1/chat/completions", {"model": "hang", "messages": QUESTION, "stream": True})
    assert_error(streamed, 504, "upstream_timeout")


def test_upstream_429_is_retried_then_passed_on_with_retry_after(setup: tuple[Gateway, Faulty, str],
                                                                  standin_server: Service) -> None:
    gw, faulty, _ = setup
    before = standin_calls(standin_server, faulty.names["limited"])
    response = gw.post("/v1/chat/completions", {"model": "limited", "messages": QUESTION})
    assert_error(response, 429, "upstream_rate_limited")
    assert int(response.headers["retry-after"]) >= 1
    assert standin_calls(standin_server, faulty.names["limited"]) - before == 2


def test_upstream_400_is_the_clients_fault_and_stops_the_route(setup: tuple[Gateway, Faulty, str],
                                                               standin_server: Service) -> None:
    gw, faulty, _ = setup
    before = standin_calls(standin_server, "alpha")
    response = gw.post("/v1/chat/completions", {"model": "rejecting", "messages": QUESTION})
    error = assert_error(response, 400, "upstream_bad_request")
    assert "bad things in the request" in error["message"]
    assert standin_calls(standin_server, "alpha") == before  # no fallback: alpha would reject it too


def test_fallback_to_the_next_model(setup: tuple[Gateway, Faulty, str]) -> None:
    gw, _, _ = setup
    response = gw.post("/v1/chat/completions", {"model": "with-fallback", "messages": QUESTION})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Paris."
    assert response.headers["x-frugal-models-tried"] == "broken,alpha"
    assert response.headers["x-frugal-model"] == "alpha"
    streamed = gw.post("/v1/chat/completions", {"model": "with-fallback", "messages": QUESTION, "stream": True})
    assert streamed.status_code == 200 and streamed.headers["x-frugal-model"] == "alpha"
    assert '"Paris."' not in streamed.text and "Paris" in streamed.text


def test_failure_in_the_middle_of_a_stream_ends_it_with_an_error_event(setup: tuple[Gateway, Faulty, str]) -> None:
    gw, _, _ = setup
    response = gw.post("/v1/chat/completions", {"model": "midstream", "messages": QUESTION, "stream": True})
    assert response.status_code == 200  # the stream had begun
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert '"error"' in events[-2] and "upstream" in events[-2]
    row = gw.ledger_row(response.headers["x-request-id"])
    assert row["status"] == 502 and row["error_code"] == "upstream_error"
    assert row["completion_tokens"] >= 3 and row["cost_usd"] > 0  # the partial answer is billed


NASTY_BODIES: list[bytes] = [
    b"null", b'"text"', b"123", b"\xff\xfe\x00garbage", b"{" * 5000, b"[" * 100000,
    b'{"model": 5, "messages": []}', b'{"model": null}', b'{"model": "alpha", "messages": [null]}',
    b'{"model": "alpha", "messages": [{"role": "user", "content": [{"type": "text"}]}]}',
    b'{"model": "alpha", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}',
    b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
    b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "n": 100000000000000000000000}',
    b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}',
    b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": "x"}}',
    b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]}',
    b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": 1}}',
    b'{"model": "' + b"m" * 3000 + b'", "messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": "alpha", "messages": {"role": "user"}}',
    b'{"model": "alpha", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"model": "alpha", "prompt": "x"}',
]


@pytest.mark.parametrize("body", NASTY_BODIES, ids=range(len(NASTY_BODIES)))
def test_no_client_input_yields_a_500(setup: tuple[Gateway, Faulty, str], body: bytes) -> None:
    gw, _, _ = setup
    for path in ("/v1/chat/completions", "/v1/completions"):
        response = gw.post(path, content=body)
        assert response.status_code < 500, (path, body[:80], response.text)
        if response.status_code != 200:  # the last body is a valid legacy completion
            assert response.status_code in (400, 404, 413), (path, body[:80], response.text)
            assert_error(response, response.status_code)


def test_a_model_without_its_provider_key_fails_fast_and_clearly(make_gateway: Callable[..., Gateway],
                                                                  standin_server: Service) -> None:
    gw = make_gateway({"models": [
        model_entry("keyless", "alpha", standin_server.url, "litellm", api_key_env="FRUGAL_TEST_UNSET_KEY"),
        model_entry("keyed", "alpha", standin_server.url, "litellm")],
        "routes": [{"name": "r", "models": ["keyless", "keyed"]}]})
    before = standin_calls(standin_server, "alpha")
    error = assert_error(gw.post("/v1/chat/completions", {"model": "keyless", "messages": QUESTION}), 502)
    assert "FRUGAL_TEST_UNSET_KEY" in error["message"]
    assert standin_calls(standin_server, "alpha") == before  # never called the provider, never retried
    response = gw.post("/v1/chat/completions", {"model": "r", "messages": QUESTION})
    assert response.status_code == 200 and response.headers["x-frugal-model"] == "keyed"
    row = gw.ledger_row(response.headers["x-request-id"])
    assert [a["outcome"] for a in row["trace"]["attempts"]] == ["auth_error", "ok"]
