"""The spend ledger: every request recorded (answered, failed, rejected, abandoned), on SQLite and on a
real PostgreSQL server; content only when configured; nothing lost when the database is down."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from gateway.ledger import Ledger, ledger_row, requests_table
from gateway.ledger_journal import Journal
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


def row_of(request_id: str, cost_usd: float = 0.5) -> dict:
    return ledger_row(id=request_id, endpoint="chat", models_tried=[], status=200, stream=False, prompt_tokens=1,
                      completion_tokens=1, tokens_estimated=False, cost_usd=cost_usd, latency_ms=1.0, cache="none",
                      client_disconnected=False, trace={"attempts": [{"model": "m", "outcome": "ok"}]})


def written(ledger: Ledger) -> dict[str, float]:
    with ledger.engine.connect() as connection:
        return dict(connection.execute(select(requests_table.c.id, requests_table.c.cost_usd)).all())


def test_rows_are_spilled_to_a_file_when_the_database_is_unreachable_and_written_by_the_next_start(
        tmp_path: Path) -> None:
    # A SQLite path under a folder that does not exist: every write fails.
    ledger = Ledger(f"sqlite:///{tmp_path / 'missing' / 'ledger.db'}", tmp_path / "spill.jsonl",
                    retry_interval_s=0.05)
    ledger.start()
    for i in range(3):
        ledger.record(row_of(f"r{i}"))
    ledger.close()
    spilled = [json.loads(line) for line in (tmp_path / "spill.jsonl").read_text().splitlines()]
    assert [r["id"] for r in spilled] == ["r0", "r1", "r2"]
    assert all(r["cost_usd"] == 0.5 for r in spilled)

    (tmp_path / "missing").mkdir()  # the database is back: the next start writes what was spilled, once
    again = Ledger(f"sqlite:///{tmp_path / 'missing' / 'ledger.db'}", tmp_path / "spill.jsonl")
    again.start()
    again.record(row_of("r0"))  # already written by the time the spill is replayed? either way: one row
    assert again.flush(10)
    assert written(again) == {"r0": 0.5, "r1": 0.5, "r2": 0.5} and again.replayed + again.written >= 3
    assert (tmp_path / "spill.jsonl").read_bytes() == b""
    again.close()


def test_a_dead_process_journal_is_replayed_once_and_another_ledgers_is_left_alone(tmp_path: Path) -> None:
    url, other_url = f"sqlite:///{tmp_path / 'ledger.db'}", f"sqlite:///{tmp_path / 'other.db'}"
    journal_dir = tmp_path / "journal"
    ledger = Ledger(url, tmp_path / "spill.jsonl", journal=Journal(journal_dir, url))
    ledger.start()
    ledger.record(row_of("written-before-death", 1.0))
    assert ledger.flush(10)
    ledger.close()
    # a process that appended rows, wrote one of them to the database, and died (its locks die with it)
    dead = Journal(journal_dir, url)
    for request_id in ("written-before-death", "lost-1", "lost-2"):
        dead.append(row_of(request_id, 0.25))
    [segment] = dead._segments.values()
    with segment.path.open("ab") as handle:
        handle.write(b'{"id": "torn-by-the-cra')  # a line cut short by the kill: never acknowledged
    foreign = Journal(journal_dir, other_url)
    foreign.append(row_of("another-ledgers-row"))
    for journal in (dead, foreign):
        for held in journal._segments.values():
            os.close(held.fd)  # the process is gone: its flock is released, its file stays

    live = Journal(journal_dir, url)
    ledger = Ledger(url, tmp_path / "spill.jsonl", journal=live, retry_interval_s=0.05)
    ledger.start()
    ledger.record(row_of("new", 2.0))
    assert ledger.flush(10)
    assert written(ledger) == {"written-before-death": 1.0, "lost-1": 0.25, "lost-2": 0.25, "new": 2.0}
    assert ledger.replayed == 2
    assert not segment.path.exists()
    left = sorted(p.name for p in journal_dir.glob("*.jsonl"))
    assert len(left) == 2 and any(p.startswith(f"segment-{live._stem}") for p in left)  # ours, and the foreign one
    ledger.close()
    assert sorted(p.name for p in journal_dir.glob("*.jsonl")) == [n for n in left if not n.startswith(
        f"segment-{live._stem}")]  # a clean stop leaves nothing of its own behind


def test_journal_segments_are_deleted_once_their_rows_are_written(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    journal = Journal(tmp_path / "journal", url, segment_bytes=600)
    ledger = Ledger(url, tmp_path / "spill.jsonl", journal=journal, linger_s=0.0)
    ledger.start()
    for i in range(40):
        ledger.record(row_of(f"row-{i}"))
        if i % 10 == 9:
            assert ledger.flush(10)
    assert len(written(ledger)) == 40
    assert journal._seq > 5  # the rows filled several segments...
    assert len(list((tmp_path / "journal").glob("*.jsonl"))) == 1  # ...and only the one being written stays
    ledger.close()


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
