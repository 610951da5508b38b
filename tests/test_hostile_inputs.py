"""Hostile and broken clients against a running gateway: each gets a clear 4xx (OpenAI's error JSON) or a
clean close, the gateway stays up and answers the next request, and its memory comes back to where it was.

Defects found by fuzzing (issue 22) each have a test here that failed before the fix."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import API_KEY, Gateway, Service, model_entry, wait_until

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.5
MAX_CONNECTIONS = 40


@pytest.fixture(scope="module")
def gateway(standin_server: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    url = standin_server.url
    gw = Gateway(tmp_path_factory.mktemp("gw-hostile"), {
        "models": [model_entry("alpha", "alpha", url, "http"), model_entry("slow", "slow-alpha", url, "http")],
        "limits": {"max_body_bytes": 65536, "header_timeout_s": HEADER_TIMEOUT_S, "body_timeout_s": BODY_TIMEOUT_S,
                   "max_connections": MAX_CONNECTIONS},
    })
    gw.start()
    for _ in range(5):
        still_answers(gw)
    gw.baseline_rss_mib = rss_mib(gw)  # type: ignore[attr-defined]
    yield gw
    gw.stop()


def rss_mib(gateway: Gateway) -> float:
    assert gateway.process is not None
    status = Path(f"/proc/{gateway.process.pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024


def still_answers(gateway: Gateway) -> None:
    reply = gateway.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION})
    assert reply.status_code == 200, reply.text


def raw_exchange(gateway: Gateway, data: bytes, timeout_s: float = 10.0) -> bytes:
    """Send bytes on a fresh connection; everything the server sends back until it closes."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=timeout_s) as conn:
        conn.sendall(data)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
        return received


def json_error(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower(), head
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return status, error


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("temperature", [0, 1])
def test_a_deeply_nested_body_is_a_clear_400_not_a_500(gateway: Gateway, temperature: int) -> None:
    body = {"model": "alpha", "messages": QUESTION, "temperature": temperature,
            "response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": nested(260)}}}
    reply = gateway.post("/v1/chat/completions", body)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_json"
    assert "levels deep" in reply.json()["error"]["message"]
    shallow = dict(body, response_format={"type": "json_schema", "json_schema": {"name": "ok", "schema": nested(8)}})
    assert gateway.post("/v1/chat/completions", shallow).status_code == 200


@pytest.mark.parametrize("length", [b"-1", b"1e20", b"abc"])
def test_an_invalid_content_length_gets_openai_s_error_json(gateway: Gateway, length: bytes) -> None:
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
               b"authorization: Bearer " + API_KEY.encode() + b"\r\ncontent-length: " + length + b"\r\n\r\n{}")
    status, error = json_error(raw_exchange(gateway, request))
    assert status == 400 and error["code"] in ("invalid_http_request", "invalid_json")
    still_answers(gateway)


def test_clients_that_trickle_headers_are_closed_after_the_header_timeout(gateway: Gateway) -> None:
    sockets = []
    try:
        for _ in range(20):
            conn = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")  # and then nothing, or a byte
            sockets.append(conn)
        started = time.monotonic()
        for conn in sockets:
            conn.sendall(b"x")
        replies = [b"".join(iter(lambda c=conn: c.recv(4096), b"")) for conn in sockets]
        waited = time.monotonic() - started
    finally:
        for conn in sockets:
            conn.close()
    assert waited < HEADER_TIMEOUT_S + 5  # closed by the server, not by the client's own timeout
    for reply in replies:
        status, error = json_error(reply)
        assert status == 408 and error["code"] == "request_timeout"
    still_answers(gateway)


def test_a_body_that_never_finishes_is_closed_after_the_body_timeout(gateway: Gateway) -> None:
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer " + API_KEY.encode() + b"\r\ncontent-length: 1000\r\n\r\n{\"model\"")
    started = time.monotonic()
    reply = raw_exchange(gateway, head)
    assert time.monotonic() - started < BODY_TIMEOUT_S + 5
    status, error = json_error(reply)
    assert status == 408 and error["code"] == "request_timeout"
    still_answers(gateway)


def test_connections_beyond_the_cap_are_refused_with_503_and_the_rest_still_served(gateway: Gateway) -> None:
    idle = [socket.create_connection(("127.0.0.1", gateway.port), timeout=10) for _ in range(MAX_CONNECTIONS)]
    try:
        status, error = json_error(raw_exchange(gateway, b""))
        assert status == 503 and error["code"] == "too_many_connections"
    finally:
        for conn in idle:
            conn.close()
    wait_until(lambda: gateway.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION})
               .status_code == 200, 10, "the gateway to take connections again")


@pytest.mark.parametrize("body", [
    b'{"model": "alpha", "messages": [{"role": "user", "content": "\xff\xfe bad utf-8"}]}',
    b'{"model": "alpha", "messages": [{"role": "user", "content": "\\ud800 lone surrogate"}]}',
    b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
    b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "n": 1000000}',
    b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}',
])
def test_malformed_values_are_400s(gateway: Gateway, body: bytes) -> None:
    reply = gateway.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_huge_but_valid_values_are_served_or_refused_clearly(gateway: Gateway) -> None:
    reply = gateway.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION, "max_tokens": 2**31})
    assert reply.status_code == 200
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"} for i in range(1999)]
    reply = gateway.post("/v1/chat/completions", {"model": "alpha", "messages": many})  # just under the body limit
    assert reply.status_code == 200, reply.text


def test_bodies_over_the_limit_are_413_with_or_without_a_length(gateway: Gateway) -> None:
    big = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "x" * 70000}]}).encode()
    reply = gateway.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert reply.status_code == 413

    def chunked() -> Iterator[bytes]:
        for start in range(0, len(big), 4096):
            yield big[start:start + 4096]

    reply = httpx.post(gateway.url + "/v1/chat/completions", content=chunked(), timeout=30,
                       headers={"authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"


def test_clients_that_vanish_mid_stream_cost_no_memory(gateway: Gateway, standin_server: Service) -> None:
    """The first client to leave a stream early once made the gateway load litellm to count the tokens it
    had been sent (+150 MB); now counting needs only the tokenizer, loaded at start-up."""
    httpx.post(standin_server.url + "/_standin/faults",
               json={"model": "slow-alpha", "chunk_latency_ms": 200}).raise_for_status()
    for _ in range(5):
        still_answers(gateway)
    baseline = rss_mib(gateway)
    ids = []
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as conn:
            body = json.dumps({"model": "slow", "stream": True, "messages": QUESTION}).encode()
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"authorization: Bearer " + API_KEY.encode() + b"\r\ncontent-length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            head = conn.recv(65536)
            ids.append(head.split(b"x-request-id: ")[1].split(b"\r\n")[0].decode())
        # the connection is closed here, in the middle of the stream
    for request_id in ids:
        row = gateway.ledger_row(request_id)
        assert row["status"] == 499 and row["client_disconnected"] in (True, 1)
    still_answers(gateway)
    assert rss_mib(gateway) - baseline < 20


def test_a_connection_that_never_sends_a_request_is_closed_without_an_answer(gateway: Gateway) -> None:
    started = time.monotonic()
    assert raw_exchange(gateway, b"") == b""  # the server closed it; nothing was sent back
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 5


def test_after_all_of_it_memory_is_back_near_where_it_started(gateway: Gateway) -> None:
    """Runs last: every hostile client above has come and gone; the gateway still answers, and holds no more
    than a little more memory than after its first few requests."""
    still_answers(gateway)
    assert rss_mib(gateway) - gateway.baseline_rss_mib < 40  # type: ignore[attr-defined]
