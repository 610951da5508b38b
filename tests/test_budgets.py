"""Virtual keys and budgets through real gateways (`frugal serve`), the stand-in provider, SQLite and a real
Redis: reservations hold under concurrency across two replicas, cancelled streams and killed replicas release
what they reserved, keys are hashed at rest, scoped, and revoked everywhere within a second."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from gateway.ledger import requests_table
from tests.harness import Gateway, Service, model_entry, wait_until

ADMIN_KEY = "frugal-admin-test-secret"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def redis_url(redis_server: str) -> str:
    return redis_server


def gateway_config(standin_url: str, ledger_url: str, *, redis: str | None = None, lease_s: float = 30.0) -> dict:
    config: dict[str, Any] = {
        "models": [model_entry("alpha", "alpha", standin_url), model_entry("beta", "beta", standin_url)],
        "ledger": {"url": ledger_url},
        "budgets": {"lease_s": lease_s},
        "artifacts": {"watch_interval_s": 0},
    }
    if redis is not None:
        config["redis"] = {"url": redis}
    return config


def replicas(make_gateway: Any, tmp_path: Path, standin_url: str, count: int = 2, ledger_url: str | None = None,
             **options: Any) -> list[Gateway]:
    """`count` gateways sharing one database (by default a SQLite file; and Redis when given)."""
    config = gateway_config(standin_url, ledger_url or f"sqlite:///{tmp_path / 'shared-ledger.db'}", **options)
    started = []
    for index in range(count):
        config["ledger"]["spill_path"] = str(tmp_path / f"spill-{index}.jsonl")
        started.append(make_gateway(config, {"FRUGAL_ADMIN_KEY": ADMIN_KEY}))
    return started


def create_key(gateway: Gateway, **body: Any) -> dict[str, Any]:
    response = httpx.post(gateway.url + "/admin/keys", json={"name": "test", **body}, headers=ADMIN, timeout=30)
    assert response.status_code == 201, response.text
    return response.json()


def key_state(gateway: Gateway, key_id: str) -> dict[str, Any]:
    response = httpx.get(f"{gateway.url}/admin/keys/{key_id}", headers=ADMIN, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def ledger_spend(gateway: Gateway, key_id: str) -> tuple[int, float]:
    with gateway.engine.connect() as connection:
        count, total = connection.execute(select(func.count(), func.coalesce(func.sum(requests_table.c.cost_usd), 0))
                                          .where(requests_table.c.key_id == key_id)).one()
    return int(count), float(total)


def chat(gateway: Gateway, secret: str, **extra: Any) -> httpx.Response:
    body = {"model": "alpha", "messages": QUESTION, "max_tokens": 50, **extra}
    return httpx.post(gateway.url + "/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {secret}"}, timeout=30)


@contextlib.contextmanager
def slow_stream(standin: Service, gateway: Gateway, secret: str, chunk_latency_ms: int) -> Iterator[httpx.Response]:
    """A streamed answer (beta, up to 200 tokens) whose chunks the stand-in sends `chunk_latency_ms` apart,
    open and past its first frame; the client leaves when the block ends."""
    slow = {"model": "beta", "chunk_latency_ms": chunk_latency_ms}
    httpx.post(standin.url + "/_standin/faults", json=slow).raise_for_status()
    try:
        body = {"model": "beta", "messages": QUESTION, "max_tokens": 200, "stream": True}
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=30,
                          headers={"authorization": f"Bearer {secret}"}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()  # kept: a discarded line iterator closes the stream
            assert next(lines).startswith("data:")
            yield response
    finally:
        httpx.delete(standin.url + "/_standin/faults")


@pytest.mark.parametrize("store", ["sql", "redis", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_hundred_concurrent_requests_on_two_replicas_never_overspend(
        store: str, make_gateway: Any, tmp_path: Path, standin_server: Service, redis_url: str,
        request: pytest.FixtureRequest) -> None:
    """Counters in SQLite (the embedded default), in Redis, and in PostgreSQL (what replicas share in production)."""
    a, b = replicas(make_gateway, tmp_path, standin_server.url, redis=redis_url if store == "redis" else None,
                    ledger_url=request.getfixturevalue("postgres_db") if store == "postgresql" else None)
    # One request reserves at most ~(32 prompt + 50 answer tokens) ≈ $0.000132 here: the budget fits 10.
    limit = 10 * 0.000132
    key = create_key(a, budgets=[{"period": "total", "limit_usd": limit}])

    async def one(client: httpx.AsyncClient, gateway: Gateway, index: int) -> tuple[int, dict | None]:
        """A third plain, a third streamed to the end, a third streamed and left after the first frame
        (status 499 on the client's side: it cancelled). Returns the status and an error body."""
        body = {"model": "alpha", "messages": QUESTION, "max_tokens": 50}
        url, headers = gateway.url + "/v1/chat/completions", {"authorization": f"Bearer {key['key']}"}
        if index % 3 == 0:
            response = await client.post(url, json=body, headers=headers)
            return response.status_code, response.json() if response.status_code != 200 else None
        async with client.stream("POST", url, json={**body, "stream": True}, headers=headers) as response:
            if response.status_code != 200:
                return response.status_code, json.loads(await response.aread())
            async for _ in response.aiter_lines():
                if index % 3 == 2:
                    return 499, None  # the client leaves mid-stream
            return 200, None

    async def burst() -> list[tuple[int, dict | None]]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as client:
            return await asyncio.gather(*(one(client, gw, i) for i, gw in enumerate([a, b] * 50)))

    outcomes = asyncio.run(burst())
    statuses = [status for status, _ in outcomes]
    assert set(statuses) <= {200, 429, 499}, statuses
    refused = [error for status, error in outcomes if status == 429]
    assert refused and statuses.count(200) + statuses.count(499) >= 10
    error = refused[0]["error"]
    assert error["code"] == "budget_exceeded" and "total budget of key" in error["message"]
    assert key["id"] in error["message"] and "does not reset" in error["message"]
    wait_until(lambda: ledger_spend(a, key["id"])[0] == 100, 20, "100 ledger rows")

    def settled() -> tuple[dict[str, Any], float] | None:
        """The budget once every request is settled (the replicas write settlements in batches, after the answer)."""
        [budget] = key_state(b, key["id"])["budgets"]
        return (budget, ledger_spend(a, key["id"])[1]) if budget["reserved_usd"] == 0 else None

    budget, ledger_total = wait_until(settled, 10, "every reservation settled")
    assert budget["spent_usd"] == pytest.approx(ledger_total, abs=1e-8)  # the ledger agrees to the cent (and far below)
    assert budget["spent_usd"] <= limit  # every reservation covered its request's actual cost


@pytest.mark.parametrize("store", ["sql", "redis"])
def test_cancelled_stream_settles_what_was_generated_and_releases_the_rest(
        store: str, make_gateway: Any, tmp_path: Path, standin_server: Service, redis_url: str) -> None:
    [gateway] = replicas(make_gateway, tmp_path, standin_server.url, count=1,
                         redis=redis_url if store == "redis" else None)
    key = create_key(gateway, budgets=[{"period": "day", "limit_usd": 1.0}])
    with slow_stream(standin_server, gateway, key["key"], 400) as response:
        request_id = response.headers["x-request-id"]
        [held] = key_state(gateway, key["id"])["budgets"]
        assert held["reserved_usd"] > 0  # held while the answer streams
    # the client went away mid-answer
    row = gateway.ledger_row(request_id)
    assert row["status"] == 499
    [budget] = wait_until(lambda: (s := key_state(gateway, key["id"])["budgets"])[0]["reserved_usd"] == 0 and s,
                          10, "the reservation released")
    assert budget["spent_usd"] == pytest.approx(row["cost_usd"], abs=1e-9)
    assert row["completion_tokens"] < 200


@pytest.mark.parametrize("store", ["sql", "redis"])
def test_a_killed_replica_leaks_no_reservation_past_its_lease(
        store: str, make_gateway: Any, tmp_path: Path, standin_server: Service, redis_url: str) -> None:
    a, b = replicas(make_gateway, tmp_path, standin_server.url, redis=redis_url if store == "redis" else None,
                    lease_s=2)
    key = create_key(a, budgets=[{"period": "month", "limit_usd": 1.0}])
    with slow_stream(standin_server, a, key["key"], 1500):
        assert a.process is not None
        a.process.send_signal(signal.SIGKILL)
        a.process.wait(10)
        [held] = key_state(b, key["id"])["budgets"]
        assert held["reserved_usd"] > 0
    [budget] = wait_until(lambda: (s := key_state(b, key["id"])["budgets"])[0]["reserved_usd"] == 0 and s,
                          15, "the dead replica's reservation expiring")
    assert budget["spent_usd"] == 0
    assert chat(b, key["key"]).status_code == 200  # the budget is whole again


def test_keys_are_hashed_at_rest_scoped_expired_and_revoked_on_every_replica(
        make_gateway: Any, tmp_path: Path, standin_server: Service) -> None:
    a, b = replicas(make_gateway, tmp_path, standin_server.url)
    key = create_key(a, name="scoped", models=["alpha"], metadata={"owner": "team-x"})
    secret = key["key"]
    assert secret.startswith("sk-frugal-") and key["prefix"] == secret[:14] and "key_hash" not in key
    assert chat(b, secret).status_code == 200
    refused = chat(b, secret, model="beta")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    listed = httpx.get(b.url + "/v1/models", headers={"authorization": f"Bearer {secret}"}).json()
    assert [m["id"] for m in listed["data"]] == ["alpha"]
    shown = key_state(b, key["id"])
    assert "key" not in shown and "key_hash" not in shown

    expired = create_key(a, expires_at="2020-01-01T00:00:00Z")
    gone = chat(a, expired["key"])
    assert gone.status_code == 401 and "expired" in gone.json()["error"]["message"]

    revoked = httpx.post(f"{a.url}/admin/keys/{key['id']}/revoke", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    # refused by the other replica within a second (each caches a key for auth.cache_s = 0.5 s)
    refusal = wait_until(lambda: (r := chat(b, secret)).status_code == 401 and r, 1.0, "revocation on replica b")
    assert "revoked" in refusal.json()["error"]["message"]

    # the secrets appear nowhere: not in the database, not in either replica's log
    for gateway in (a, b):
        gateway.stop()
    files = [p for p in tmp_path.iterdir() if p.name.startswith("shared-ledger.db")]
    assert files
    for path in files + [p for p in tmp_path.iterdir() if p.suffix == ".log"]:
        data = path.read_bytes()
        for raw in (secret, expired["key"], secret[14:]):
            assert raw.encode() not in data, f"a key's secret is in {path.name}"


def test_admin_key_api_refuses_clients_and_audits_changes(
        make_gateway: Any, tmp_path: Path, standin_server: Service) -> None:
    [gateway] = replicas(make_gateway, tmp_path, standin_server.url, count=1)
    assert httpx.get(gateway.url + "/admin/keys").status_code == 401
    client_key = create_key(gateway)["key"]
    for method, path in [("GET", "/admin/keys"), ("POST", "/admin/keys"), ("GET", "/admin/teams"),
                         ("PUT", "/admin/budgets"), ("GET", "/admin/budgets")]:
        response = httpx.request(method, gateway.url + path, headers={"authorization": f"Bearer {client_key}"},
                                 json={})
        assert response.status_code == 403, (method, path, response.text)

    team = httpx.post(gateway.url + "/admin/teams", headers={**ADMIN, "x-frugal-actor": "ops@example"},
                      json={"name": "research", "budgets": [{"period": "month", "limit_usd": 5}]})
    assert team.status_code == 201 and team.json()["budgets"][0]["limit_usd"] == 5
    member = create_key(gateway, team_id=team.json()["id"])
    bad = httpx.post(gateway.url + "/admin/keys", headers=ADMIN, json={"name": "x", "team_id": "team_nope"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "team_id"
    bad = httpx.post(gateway.url + "/admin/keys", headers=ADMIN, json={"name": "x", "models": ["gpt-5"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "models"
    bad = httpx.put(gateway.url + "/admin/budgets", headers=ADMIN,
                    json={"owner_type": "key", "owner_id": member["id"], "period": "week", "limit_usd": 1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "period"
    changed = httpx.put(gateway.url + "/admin/budgets", headers=ADMIN,
                        json={"owner_type": "team", "owner_id": team.json()["id"], "period": "month", "limit_usd": 7})
    assert changed.status_code == 200 and changed.json()["limit_usd"] == 7
    # a config-file key can have a budget too
    config_budget = httpx.put(gateway.url + "/admin/budgets", headers=ADMIN,
                              json={"owner_type": "key", "owner_id": "test-key", "period": "day", "limit_usd": 0})
    assert config_budget.status_code == 200
    refused = gateway.post("/v1/chat/completions", {"model": "alpha", "messages": QUESTION, "max_tokens": 5})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exceeded"
    assert "daily budget of key 'test-key'" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) <= 86400
    [shown] = httpx.get(gateway.url + "/admin/budgets", headers=ADMIN, params={"owner_id": "test-key"}).json()["data"]
    assert shown["exhausted"] is True and shown["last_refused_at"] and shown["spent_usd"] == 0

    pages, after = [], None
    while True:
        page = httpx.get(gateway.url + "/admin/keys", headers=ADMIN,
                         params={"limit": 1, **({"after": after} if after else {})}).json()
        pages += [k["id"] for k in page["data"]]
        if not page["has_more"]:
            break
        after = page["next"]
    assert sorted(pages) == sorted({member["id"], *(k["id"] for k in httpx.get(
        gateway.url + "/admin/keys", headers=ADMIN).json()["data"])}) and len(pages) == len(set(pages)) == 2

    from gateway.tenants.tables import admin_audit_table  # noqa: PLC0415

    with gateway.engine.connect() as connection:
        entries = [dict(r._mapping) for r in connection.execute(select(admin_audit_table)
                                                                .order_by(admin_audit_table.c.id))]
    actions = [(e["action"], e["actor"]) for e in entries]
    assert ("team.create", "admin (ops@example)") in actions
    assert [a for a, _ in actions].count("key.create") == 2
    budget_change = [e for e in entries if e["action"] == "budget.set" and e["before"] is not None]
    assert budget_change[0]["before"]["limit_usd"] == 5 and budget_change[0]["after"]["limit_usd"] == 7
    assert all("key" not in (e["after"] or {}) for e in entries)  # no secret in the audit log


def test_team_budgets_and_key_rate_limits_apply_to_virtual_keys(
        make_gateway: Any, tmp_path: Path, standin_server: Service, redis_url: str) -> None:
    a, b = replicas(make_gateway, tmp_path, standin_server.url, redis=redis_url)
    team = httpx.post(a.url + "/admin/teams", headers=ADMIN, json={"name": "small"}).json()
    limited = create_key(a, team_id=team["id"], requests_per_minute=2)
    assert chat(a, limited["key"]).status_code == 200
    assert chat(b, limited["key"]).status_code == 200
    third = chat(a, limited["key"])  # the minute's two requests were spent across both replicas
    assert third.status_code == 429 and third.json()["error"]["code"] == "rate_limit_exceeded"

    member = create_key(a, team_id=team["id"])
    spent = chat(b, member["key"])
    assert spent.status_code == 200
    cost = float(spent.headers["x-frugal-cost-usd"])
    # the team's monthly budget now holds less than what a member's request may cost
    httpx.put(a.url + "/admin/budgets", headers=ADMIN, json={
        "owner_type": "team", "owner_id": team["id"], "period": "month", "limit_usd": 0.0001}).raise_for_status()
    answered: list[float] = []  # b may answer within its budget cache's life (auth.cache_s) before it refuses

    def refusal() -> httpx.Response | None:
        response = chat(b, member["key"])
        if response.status_code == 200:
            answered.append(float(response.headers["x-frugal-cost-usd"]))
        return response if response.status_code == 429 else None

    refused = wait_until(refusal, 2.0, "the team budget")
    error = refused.json()["error"]
    assert error["code"] == "budget_exceeded" and f"monthly budget of team '{team['id']}'" in error["message"]
    assert "resets at" in error["message"] and int(refused.headers["retry-after"]) > 0
    # a request charged to the team before its budget existed is not in it; those after may be (the Redis
    # counter is seeded from the ledger rows since the budget was set, as far as they are written)
    [budget] = httpx.get(f"{a.url}/admin/teams/{team['id']}", headers=ADMIN).json()["budgets"]
    assert cost > 0 and budget["spent_usd"] <= sum(answered) + 1e-9
    # the member's own page shows the team budget that refuses it
    shown = key_state(a, member["id"])
    assert shown["budgets"] == [] and [b["id"] for b in shown["team_budgets"]] == [budget["id"]]
    assert shown["team_budgets"][0]["exhausted"] is True and shown["team_budgets"][0]["last_refused_at"]


def test_keys_and_budgets_fall_back_on_what_was_read_while_the_database_is_down(tmp_path: Path) -> None:
    from sqlalchemy import create_engine  # noqa: PLC0415

    from gateway.ledger import metadata  # noqa: PLC0415
    from gateway.tenants.budgets import BudgetBook, BudgetsUnknown  # noqa: PLC0415
    from gateway.tenants.keys import KeysUnavailable, VirtualKeys, digest_of  # noqa: PLC0415

    engine = create_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    metadata.create_all(engine)
    keys, book = VirtualKeys(engine, cache_s=0), BudgetBook(engine, cache_s=0)
    _, secret = keys.create(name="k")
    [row] = keys.page(10)
    book.set("key", row["id"], "day", 2.0)
    assert keys.lookup(digest_of(secret)) is not None and [b.limit_usd for b in book.of("key", row["id"])] == [2.0]
    down = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/nothing", connect_args={"connect_timeout": 2})
    keys.engine = book.engine = down
    key = keys.lookup(digest_of(secret))  # stale, but known: the request goes on
    assert key is not None and key.id == row["id"]
    assert [b.limit_usd for b in book.of("key", row["id"])] == [2.0]
    with pytest.raises(KeysUnavailable):
        keys.lookup(digest_of("sk-frugal-never-seen"))
    with pytest.raises(BudgetsUnknown):
        book.of("team", "never-read")


@pytest.mark.parametrize("store", ["postgresql", "sqlite", "redis"])
def test_counters_of_two_replicas_grant_exactly_what_fits(store: str, request: pytest.FixtureRequest,
                                                         tmp_path: Path) -> None:
    """Two replicas' counters (own connections) race 100 reservations for a budget that fits 10; then settle."""
    from sqlalchemy import create_engine  # noqa: PLC0415

    from gateway.ledger import metadata  # noqa: PLC0415
    from gateway.shared_state import state_client  # noqa: PLC0415
    from gateway.tenants.budgets import Budget  # noqa: PLC0415
    from gateway.tenants.counters import Charge, RedisCounters, Settlement, SqlCounters  # noqa: PLC0415

    budget = Budget(f"bud_{store}_{tmp_path.name[-8:]}", "key", "k", "total", 0.001)
    amount = budget.limit_nanos // 10
    charge = Charge(budget, "total")

    async def race() -> None:
        if store == "redis":
            url = request.getfixturevalue("redis_server")
            replicas = [RedisCounters(state_client(url, 5.0)) for _ in range(2)]
        else:
            url = request.getfixturevalue("postgres_db") if store == "postgresql" else f"sqlite:///{tmp_path / 'c.db'}"
            engines = [create_engine(url, pool_size=20, max_overflow=20) for _ in range(2)]
            metadata.create_all(engines[0])
            replicas = [SqlCounters(engine) for engine in engines]
        results = await asyncio.gather(*(replicas[i % 2].reserve(f"r{i}", [charge], amount, 30) for i in range(100)))
        granted = [f"r{i}" for i, refused in enumerate(results) if refused is None]
        assert len(granted) == 10
        refusal = next(r for r in results if r is not None)
        assert refusal.charge == charge and refusal.spent_nanos == 0 and refusal.reserved_nanos >= 9 * amount
        [usage] = await replicas[0].usage([charge])
        assert usage.reserved_nanos == 10 * amount and usage.spent_nanos == 0
        await replicas[0].settle([Settlement(r, [charge], amount // 3) for r in granted[:5]])
        await replicas[1].settle([Settlement(r, [charge], amount // 3) for r in granted[5:]])
        [usage] = await replicas[1].usage([charge])
        assert usage.reserved_nanos == 0 and usage.spent_nanos == 10 * (amount // 3)
        # a refusal leaves the budget refusing (exhausted for the dashboard) until a reservation fits again
        assert await replicas[0].reserve("too-big", [charge], budget.limit_nanos, 30) is not None
        [usage] = await replicas[1].usage([charge])
        assert usage.refusing and usage.refused_at is not None
        assert await replicas[1].reserve("small", [charge], 1, 30) is None
        [usage] = await replicas[0].usage([charge])
        assert not usage.refusing
        # all or none: a key's budget that fits gives back what it took when the team's budget refuses
        roomy = Charge(Budget(budget.id + "-key", "key", "k2", "day", 1.0), "2026-12-05")
        tight = Charge(Budget(budget.id + "-team", "team", "t", "day", 1e-6), "2026-12-05")
        results = await asyncio.gather(replicas[0].reserve("both", [roomy, tight], amount, 30),
                                       replicas[0].reserve("key-only", [roomy], amount, 30))
        assert results[0] is not None and results[0].charge == tight and results[1] is None
        assert [u.reserved_nanos for u in await replicas[1].usage([roomy, tight])] == [amount, 0]
        for replica in replicas:
            await replica.aclose()

    asyncio.run(race())
