"""The spend ledger: every request recorded (answered, failed, rejected, abandoned), on SQLite and on a
real PostgreSQL server; content only when configured; nothing lost when the database is down."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from gateway.ledger import Ledger, ledger_row, requests_table
from tests.harness import Gateway, Service, model_entry, wait_until

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def config(standin: Service, **ledger: object) -> dict:
    return {
        "models": [model_entry("alpha", "alpha", standin.url, "http"),
                   model_entry("beta", "beta", standin.url, "http")],
        "ledger": ledger,
    }


def exercise(gw: Gateway) -> dict[str, int]:
    """One request of each outcome; returns request id -> expected status."""
    expected = {}
    for body, headers, status in [
        ({"model": "alpha", "messages": QUESTION}, None, 200),
        ({"model": "alpha", "messages": QUESTION, "stream": True}, None, 200),
        ({"model": "nope", "messages": QUESTION}, None, 404),
        ({"model": "alpha", "messages": QUESTION, "temperature": -1}, None, 400),
        ({"model": "alpha", "messages": QUESTION}, {"authorization": "Bearer wrong"}, 401),
    ]:
        response = gw.post("/v1/chat/completions", body, auth=headers is None, headers=headers)
        assert response.status_code == status
        expected[response.headers["x-request-id"]] = status
    return expected


def check_rows(gw: Gateway, expected: dict[str, int]) -> None:
    for request_id, status in expected.items():
        row = gw.ledger_row(request_id)
        assert row["status"] == status
        assert row["endpoint"] == "chat"
        assert row["latency_ms"] > 0
        # sampled requests (no temperature) are not cacheable; requests refused earlier never reach the cache
        assert row["cache"] == ("bypass" if status == 200 else "none")
        if status == 200:
            assert row["key_id"] == "test-key" and row["model"] == "alpha" and row["models_tried"] == ["alpha"]
            assert row["prompt_tokens"] == 14 and row["completion_tokens"] == 2
            assert row["cost_usd"] == pytest.approx(14e-6 + 4e-6)
            assert row["trace"]["attempts"][0]["outcome"] == "ok"
        else:
            assert row["cost_usd"] == 0 and row["model"] is None
        if status == 401:
            assert row["key_id"] is None
        if status == 404:
            assert row["error_code"] == "model_not_found" and row["route"] == "nope"


def test_every_request_is_recorded_in_sqlite(make_gateway: Callable[..., Gateway], standin_server: Service) -> None:
    gw = make_gateway(config(standin_server))
    check_rows(gw, exercise(gw))


@pytest.mark.postgres
def test_every_request_is_recorded_in_postgresql(make_gateway: Callable[..., Gateway], standin_server: Service,
                                                 postgres_db: str) -> None:
    gw = make_gateway(config(standin_server, url=postgres_db))
    assert gw.engine.dialect.name == "postgresql"
    check_rows(gw, exercise(gw))


@pytest.mark.postgres
def test_ledger_url_from_the_environment(make_gateway: Callable[..., Gateway], standin_server: Service,
                                         postgres_db: str, tmp_path: Path) -> None:
    gw = make_gateway(config(standin_server), env={"FRUGAL_LEDGER_URL": postgres_db})
    response = gw.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION})
    ledger = Ledger(postgres_db, tmp_path / "unused.jsonl")
    request_id = response.headers["x-request-id"]
    wait_until(lambda: any(r["id"] == request_id for r in ledger.rows()), what="row in PostgreSQL")
    ledger.engine.dispose()


def test_content_is_stored_only_when_configured(make_gateway: Callable[..., Gateway],
                                                standin_server: Service) -> None:
    gw = make_gateway(config(standin_server, store_content=True))
    plain = gw.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION})
    streamed = gw.post("/v1/chat/completions", {"model": "beta", "messages": QUESTION, "stream": True})
    row = gw.ledger_row(plain.headers["x-request-id"])
    assert row["prompt"] == QUESTION and row["response"] == "Paris."
    row = gw.ledger_row(streamed.headers["x-request-id"])
    assert row["response"] == "The capital of France is Paris, a city on the Seine."


def test_a_client_that_disconnects_mid_stream_is_still_billed(make_gateway: Callable[..., Gateway],
                                                              standin_server: Service) -> None:
    slow = "slow-" + Path(standin_server.log_path).stem  # an upstream name no other test uses
    httpx.post(standin_server.url + "/_standin/faults", json={"model": slow, "chunk_latency_ms": 100})
    cfg = config(standin_server)
    cfg["models"].append(model_entry("slow", slow, standin_server.url, "http"))
    gw = make_gateway(cfg)
    body = {"model": "slow", "messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, headers=gw.headers(), timeout=30) as r:
        request_id = r.headers["x-request-id"]
        lines = r.iter_lines()
        received = [next(lines) for _ in range(5)]  # role chunk, a blank, two tokens …
    assert any("content" in line for line in received)
    row = gw.ledger_row(request_id)
    assert row["status"] == 499 and row["client_disconnected"] in (True, 1)
    assert row["error_code"] == "client_closed"
    assert 1 <= row["completion_tokens"] < 15  # what was generated before the client left
    assert row["tokens_estimated"] in (True, 1)
    assert row["cost_usd"] == pytest.approx(row["prompt_tokens"] * 1e-6 + row["completion_tokens"] * 2e-6)
    assert row["trace"]["attempts"][-1]["outcome"] == "client_closed"


def test_rows_are_spilled_to_a_file_when_the_database_is_unreachable(tmp_path: Path) -> None:
    # A SQLite path under a folder that does not exist: every write fails.
    ledger = Ledger(f"sqlite:///{tmp_path / 'missing' / 'ledger.db'}", tmp_path / "spill.jsonl",
                    retry_interval_s=0.05)
    ledger.start()
    rows = [ledger_row(id=f"r{i}", endpoint="chat", models_tried=[], status=200, stream=False, prompt_tokens=1,
                       completion_tokens=1, tokens_estimated=False, cost_usd=0.5, latency_ms=1.0, cache="none",
                       client_disconnected=False) for i in range(3)]
    for row in rows:
        ledger.record(row)
    ledger.close()
    spilled = [json.loads(line) for line in (tmp_path / "spill.jsonl").read_text().splitlines()]
    assert [r["id"] for r in spilled] == ["r0", "r1", "r2"]
    assert all(r["cost_usd"] == 0.5 for r in spilled)


def test_rows_written_after_the_database_comes_back(tmp_path: Path) -> None:
    folder = tmp_path / "later"
    ledger = Ledger(f"sqlite:///{folder / 'ledger.db'}", tmp_path / "spill.jsonl", retry_interval_s=0.05)
    ledger.start()
    ledger.record(ledger_row(id="late", endpoint="chat", models_tried=[], status=200, stream=False,
                             prompt_tokens=1, completion_tokens=1, tokens_estimated=False, cost_usd=0.25,
                             latency_ms=1.0, cache="none", client_disconnected=False))
    wait_until(lambda: ledger.failures > 0, what="a failed write")
    folder.mkdir()  # the database becomes reachable
    assert ledger.flush(10)
    with ledger.engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(requests_table)).scalar() == 1
    ledger.close()
    assert not (tmp_path / "spill.jsonl").exists()


def test_shutdown_flushes_the_queue(make_gateway: Callable[..., Gateway], standin_server: Service) -> None:
    gw = make_gateway(config(standin_server))
    ids = [gw.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION}).headers["x-request-id"]
           for _ in range(20)]
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal so the exit status tells.
    assert gw.stop() in (0, -15)
    assert "Application shutdown complete" in gw.log()
    with gw.engine.connect() as connection:
        stored = {r.id for r in connection.execute(select(requests_table.c.id))}
    assert set(ids) <= stored
