"""Faults with real processes, and what the gateway promises through them (docs/reliability.md): a gateway
killed with SIGKILL under load loses no completed response from the ledger; PostgreSQL stopped and restarted
under a running gateway loses no row (they wait, then catch up; a gateway stopped or killed meanwhile replays
them at its next start); Redis stopped and restarted empty hangs no request, fails budgets closed, and gives
no budget back what it had spent."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from gateway.ledger import requests_table
from tests.harness import Gateway, Service, TempPostgres, TempRedis, model_entry, wait_until

ADMIN_KEY = "frugal-admin-reliability"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def ids_in_ledger(gateway: Gateway, ids: set[str]) -> set[str]:
    found: set[str] = set()
    wanted = sorted(ids)
    with gateway.engine.connect() as connection:
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            found.update(connection.execute(select(requests_table.c.id).where(requests_table.c.id.in_(chunk)))
                         .scalars())
    return found


def complete_request(client: httpx.Client, gateway: Gateway, index: int) -> str | None:
    """One request of a mix (streamed or not; answered or refused); its id when the client received the
    whole response, None when the connection broke first."""
    body: dict = {"model": "alpha" if index % 5 else "no-such-model", "messages": QUESTION, "max_tokens": 20}
    try:
        if index % 2:
            with client.stream("POST", gateway.url + "/v1/chat/completions", headers=gateway.headers(),
                               json={**body, "stream": True}) as response:
                lines = list(response.iter_lines())
                complete = response.status_code != 200 or "data: [DONE]" in lines
                return response.headers["x-request-id"] if complete else None
        response = client.post(gateway.url + "/v1/chat/completions", headers=gateway.headers(), json=body)
        response.json()  # the whole body arrived
        return response.headers["x-request-id"]
    except (httpx.HTTPError, json.JSONDecodeError):
        return None


class Load:
    """`clients` threads sending the mix as fast as they can; `completed` holds the ids of the responses that
    arrived whole."""

    def __init__(self, gateway: Gateway, clients: int = 6) -> None:
        self.gateway = gateway
        self.completed: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, offset: int) -> None:
        with httpx.Client(timeout=10) as client:
            index = offset
            while not self._stop.is_set():
                request_id = complete_request(client, self.gateway, index)
                index += 1
                if request_id is not None:
                    with self._lock:
                        self.completed.add(request_id)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def count(self) -> int:
        with self._lock:
            return len(self.completed)

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


def config(standin: Service, ledger_url: str | None = None) -> dict:
    models = [model_entry("alpha", "alpha", standin.url, transport="http")]
    return {"models": models, "cache": {"exact": {"enabled": False}},
            **({"ledger": {"url": ledger_url}} if ledger_url else {})}


def journal_files(gateway: Gateway) -> list[Path]:
    return sorted((Path(gateway.config["ledger"]["spill_path"]).parent / "frugal-ledger-journal").glob("*.jsonl"))


def test_a_gateway_killed_under_load_loses_no_completed_response(tmp_path: Path, standin_server: Service) -> None:
    gateway = Gateway(tmp_path, config(standin_server)).start()
    try:
        with Load(gateway) as load:
            wait_until(lambda: load.count() >= 300, 60, "300 completed responses")
            gateway.kill()  # SIGKILL while requests are in flight and rows wait in the writer's batch
        completed = set(load.completed)
        missing_at_kill = completed - ids_in_ledger(gateway, completed)
        gateway.start()  # the same config: the same ledger and journal
        wait_until(lambda: ids_in_ledger(gateway, completed) == completed, 30,
                   f"{len(missing_at_kill)} rows not written before the kill to be replayed")
        # replayed rows are complete rows, written once; the dead process's journal is gone
        with gateway.engine.connect() as connection:
            rows = connection.execute(select(requests_table).where(requests_table.c.id.in_(sorted(completed)))).all()
        assert len(rows) == len(completed)
        assert {r.status for r in rows} <= {200, 404} and all(r.key_id == "test-key" for r in rows)
        assert all(r.completion_tokens > 0 for r in rows if r.status == 200)
        live = journal_files(gateway)
        wait_until(lambda: all("-" + str(gateway.process.pid) + "-" in p.name for p in journal_files(gateway)),
                   10, f"the killed process's journal to be removed (left: {live})")
    finally:
        gateway.stop()


@pytest.fixture
def own_postgres() -> Iterator[TempPostgres]:
    """A PostgreSQL server of this test's own (it is stopped and started again by the test)."""
    try:
        server = TempPostgres()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    server.start()
    yield server
    server.stop()


def ask(gateway: Gateway, count: int) -> set[str]:
    ids = set()
    for _ in range(count):
        response = gateway.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION})
        assert response.status_code == 200, response.text
        ids.add(response.headers["x-request-id"])
    return ids


@pytest.mark.postgres
def test_postgresql_stopped_and_restarted_loses_no_row(tmp_path: Path, standin_server: Service,
                                                       own_postgres: TempPostgres) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{own_postgres.port}/postgres"
    gateway = Gateway(tmp_path, config(standin_server, url)).start()
    try:
        before = ask(gateway, 3)
        wait_until(lambda: ids_in_ledger(gateway, before) == before, 20, "rows before the outage")
        gateway.engine.dispose()

        # 1. down under a running gateway: requests are answered, readiness says the ledger is away
        own_postgres.halt()
        during = ask(gateway, 5)
        ready = httpx.get(gateway.url + "/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["ledger"] is False
        own_postgres.resume()
        wait_until(lambda: ids_in_ledger(gateway, during) == during, 30, "rows kept in memory to catch up")

        # 2. down, and the gateway is killed: the journal holds the rows until the next start
        gateway.engine.dispose()
        own_postgres.halt()
        killed = ask(gateway, 5)
        gateway.kill()
        own_postgres.resume()
        gateway.start()
        wait_until(lambda: ids_in_ledger(gateway, killed) == killed, 30, "journaled rows to be replayed")
        # keys and budgets are served as last read while the database is away: read them once
        killed |= ask(gateway, 1)

        # 3. down, and the gateway is stopped: it spills what it holds, and the next start writes it
        gateway.engine.dispose()
        own_postgres.halt()
        stopped = ask(gateway, 5)
        gateway.stop()
        spill = Path(gateway.config["ledger"]["spill_path"])
        assert {json.loads(line)["id"] for line in spill.read_text().splitlines()} >= stopped
        own_postgres.resume()
        gateway.start()
        wait_until(lambda: ids_in_ledger(gateway, stopped) == stopped, 30, "spilled rows to be replayed")
        wait_until(lambda: spill.stat().st_size == 0, 10, "the spill file to be emptied once written")
        everything = before | during | killed | stopped
        with gateway.engine.connect() as connection:
            count = len(connection.execute(select(requests_table.c.id)
                                           .where(requests_table.c.id.in_(sorted(everything)))).all())
        assert count == len(everything) == 19  # each once: nothing lost, nothing written twice
    finally:
        gateway.stop()


def test_redis_stopped_and_restarted_hangs_nothing_and_gives_no_budget_back(tmp_path: Path,
                                                                            standin_server: Service) -> None:
    redis = TempRedis(tmp_path)
    redis_url = redis.start()
    gateway = Gateway(tmp_path, {**config(standin_server), "redis": {"url": redis_url, "timeout_s": 0.25},
                                 "cache": {"exact": {"enabled": True}}},
                      env={"FRUGAL_ADMIN_KEY": ADMIN_KEY}).start()
    try:
        created = httpx.post(gateway.url + "/admin/keys", headers=ADMIN, timeout=30,
                             json={"name": "budgeted", "budgets": [{"period": "total", "limit_usd": 1.0}]})
        assert created.status_code == 201, created.text
        key = created.json()
        budgeted = {"authorization": f"Bearer {key['key']}"}

        def chat(headers: dict[str, str], content: str = "What is the capital of France?") -> httpx.Response:
            return httpx.post(gateway.url + "/v1/chat/completions", headers=headers, timeout=10,  # 10 s: a hang
                              json={"model": "alpha", "messages": [{"role": "user", "content": content}],
                                    "max_tokens": 20, "temperature": 0})

        def spent() -> float:
            return httpx.get(f"{gateway.url}/admin/keys/{key['id']}", headers=ADMIN,
                             timeout=10).json()["budgets"][0]["spent_usd"]

        paid = [chat(budgeted, f"Question {i}?") for i in range(3)]
        assert all(r.status_code == 200 for r in paid)
        cost = sum(float(r.headers["x-frugal-cost-usd"]) for r in paid)
        assert cost > 0
        for response in paid:
            gateway.ledger_row(response.headers["x-request-id"])
        wait_until(lambda: abs(spent() - cost) < 1e-9, 10, "the settlements to reach the counter")
        assert chat(gateway.headers()).status_code == 200
        assert chat(gateway.headers()).headers["x-frugal-cache"] == "hit"

        redis.stop()
        # requests without a budget are answered (the shared cache misses; rate limits fail open), none hangs
        answered = chat(gateway.headers(), "What is the capital of Spain?")
        assert answered.status_code == 200 and answered.headers["x-frugal-cache"] == "miss"
        # a budget that cannot be checked refuses (fails closed), clearly
        refused = chat(budgeted)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "budget_unavailable"
        metrics = httpx.get(gateway.url + "/metrics", timeout=10).text
        assert 'frugal_state_errors_total{mechanism="budgets"' in metrics
        # readiness stays up (the replica serves, degraded) but says Redis is away: monitoring sees it
        ready = httpx.get(gateway.url + "/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["status"] == "degraded" and ready.json()["redis"] is False

        redis.start()  # the same port, empty: no restart of the gateway
        again = wait_until(lambda: (r := chat(budgeted, "Question 9?")).status_code == 200 and r, 30,
                           "budgets to be checked again")
        # the counter was seeded from the ledger: what was spent before the restart still counts
        total = cost + float(again.headers["x-frugal-cost-usd"])
        wait_until(lambda: abs(spent() - total) < 1e-9, 10, f"spend {total} (not reset by the restart)")
        # the cache serves again once its client's breaker lets a call through (within a second)
        wait_until(lambda: chat(gateway.headers()).headers["x-frugal-cache"] == "hit", 10, "the cache to serve again")
        assert httpx.get(gateway.url + "/readyz", timeout=10).json()["status"] == "ready"
    finally:
        gateway.stop()
        redis.stop()


def test_a_hung_redis_hangs_no_request(tmp_path: Path, standin_server: Service) -> None:
    """Redis that accepts connections but never answers (SIGSTOP: a stalled host, a full network buffer) costs
    a few calls their timeout, then the client stops asking it for a while (a circuit breaker) and each
    mechanism's failure policy applies: no request waits on it for ever, and most do not wait at all."""
    redis = TempRedis(tmp_path)
    redis_url = redis.start()
    gateway = Gateway(tmp_path, {**config(standin_server), "redis": {"url": redis_url},
                                 "cache": {"exact": {"enabled": True}, "semantic": {"enabled": True}}}).start()
    assert redis.process is not None
    try:
        def ask(content: str) -> httpx.Response:
            return httpx.post(gateway.url + "/v1/chat/completions", headers=gateway.headers(), timeout=15,
                              json={"model": "alpha", "messages": [{"role": "user", "content": content}],
                                    "max_tokens": 20, "temperature": 0})

        assert ask("What is the capital of France?").status_code == 200
        redis.process.send_signal(signal.SIGSTOP)
        for content in ("What is the capital of France?", "Name the capital city of France.", "Name a colour."):
            response = ask(content)  # a hang would be an httpx timeout here
            assert response.status_code == 200 and response.headers["x-frugal-cache"] == "miss", response.text
        ready = httpx.get(gateway.url + "/readyz", timeout=15)
        assert ready.status_code == 200 and ready.json()["redis"] is False
        assert "circuit open" in gateway.log()  # the breaker stopped asking it
    finally:
        redis.process.send_signal(signal.SIGCONT)
        gateway.stop()
        redis.stop()
