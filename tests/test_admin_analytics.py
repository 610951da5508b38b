"""The analytics half of the admin API (docs/analytics.md): rollups written with the ledger's rows, the
overview, funnel and judge figures read from them, traces paged from the ledger, what-if on a fitted cascade's
frontier and its live apply, and the admin audit log.

Rollups are checked against an aggregation of the ledger's own rows written here (independently of
gateway/rollups.py), on SQLite and PostgreSQL; the API against real gateway processes."""

from __future__ import annotations

import bisect
import json
import math
import random
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import select

from gateway.ledger import Ledger, ledger_row, requests_table
from gateway.rollups import LATENCY_BOUNDS_MS, Rollups, rollups_table, tier_rollups_table
from tests.cascade_data import MODELS
from tests.harness import API_KEY, Gateway, Service, model_entry, wait_until
from workers.pricing import TokenPrice

ROUTE = "frugal/auto"
ADMIN = "sk-admin-test"
ENV = {"FRUGAL_ADMIN_KEY": ADMIN}
REASONS = ("score", "error", "timeout", "capacity", "context_length", "capability", "cooldown", "no_key")
#: The seeded rows' routes and what "always the top model" costs per token (input, output) on each.
TOP = {"fast": TokenPrice(1e-6, 2e-6), "casc": TokenPrice(4e-5, 8e-5), "alpha": TokenPrice(1e-6, 2e-6)}
START = datetime(2026, 11, 20, 0, 0, tzinfo=UTC)


# -- seeded ledger rows -----------------------------------------------------------------------------------------
def _tier(rng: random.Random, model: str, last: bool, accept: bool) -> dict[str, Any]:
    if last:
        return {"model": model, "outcome": "accepted", "score": None, "threshold": None, "cost_usd": 1e-3,
                "latency_s": 0.2, "reason": None}
    score = rng.random()
    reason = None if accept else rng.choice(REASONS)
    return {"model": model, "outcome": "accepted" if accept else ("rejected" if reason == "score" else "failed"),
            "score": score if reason in (None, "score") else None, "threshold": 0.5 + rng.random() / 10,
            "cost_usd": 1e-5, "latency_s": 0.05, "reason": reason}


def seeded_rows(count: int, seed: int = 7, start: datetime = START, hours: int = 60) -> list[dict[str, Any]]:
    """Realistic rows over `hours` hours: three routes (a cascade among them), errors, cache hits, compression,
    audits, legacy multi-prompt cascades and latencies from 0.3 ms to 20 minutes."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        route = rng.choice(["fast", "casc", "casc", "alpha", None])
        created = start + timedelta(seconds=rng.randrange(hours * 3600), microseconds=rng.randrange(10 ** 6))
        status = rng.choices([200, 400, 429, 499, 500, 503], [80, 4, 4, 2, 5, 5])[0]
        prompt, completion = rng.randrange(5, 2000), rng.randrange(0, 800)
        cost = round(rng.random() * 1e-3, 9)
        cache = rng.choice(["none", "miss", "hit", "semantic-hit", "bypass"]) if status == 200 else "none"
        latency = 10 ** rng.uniform(-0.5, 6.1)
        trace: dict[str, Any] | None = {"route": route, "model": "m", "attempts": []}
        purpose = "audit" if rng.random() < 0.05 else "client"
        if cache in ("hit", "semantic-hit"):
            cost = 0.0
            trace["cache"] = {"result": cache, "saved_usd": round(rng.random() * 1e-3, 9), "age_s": 1.0}
        elif route == "casc" and status in (200, 503):
            tiers = []
            for _ in range(2 if rng.random() < 0.1 else 1):  # a legacy completion's second prompt
                for position, model in enumerate(("small", "medium", "large")):
                    accept = position == 2 or rng.random() < 0.5
                    tiers.append(_tier(rng, model, position == 2, accept))
                    if accept:
                        break
            if status == 503:
                tiers[-1].update(outcome="failed", reason="error", score=None)
            trace["tiers"] = tiers
            answered = [n for n, t in enumerate(tiers, 1) if t["outcome"] in ("accepted", "fallback_accepted")]
            trace["accepted_tier"] = answered[0] if answered else None
            trace["accepted"] = bool(answered) and rng.random() < 0.9
            trace["saved_usd"] = round(rng.uniform(-1e-4, 1e-2), 9) if answered else None
        elif rng.random() < 0.2:
            trace = None
        if trace is not None and rng.random() < 0.3:
            trace["compression"] = [{"model": "m", "outcome": "compressed", "saved_usd": round(rng.random() * 1e-4, 9)}]
        rows.append(ledger_row(
            id=f"seed-{seed}-{i:06d}", created_at=created, key_id=rng.choice(["k1", "k2", "k3", None]),
            endpoint="chat", route=route, model="m", models_tried=["m"], status=status, stream=False,
            prompt_tokens=prompt, completion_tokens=completion, tokens_estimated=False, cost_usd=cost,
            latency_ms=latency, cache=cache, client_disconnected=status == 499, trace=trace, purpose=purpose))
    return rows


# -- an independent aggregation of ledger rows ---------------------------------------------------------------------
def _hour(created: datetime) -> int:
    created = created if created.tzinfo else created.replace(tzinfo=UTC)
    return int(created.timestamp()) // 3600


def expected_rollups(rows: list[dict[str, Any]]) -> tuple[dict, dict]:
    routes: dict[tuple, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    tiers: dict[tuple, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in rows:
        key = (_hour(row["created_at"]), row["route"] or "", row["purpose"])
        c = routes[key]
        trace = row["trace"] or {}
        c["requests"] += 1
        c["spend_usd"] += row["cost_usd"]
        c["errors_4xx"] += 400 <= row["status"] < 500
        c["errors_5xx"] += row["status"] >= 500
        c[f"lat_{bisect.bisect_right(LATENCY_BOUNDS_MS, row['latency_ms']):02d}"] += 1
        if row["purpose"] != "client":
            continue
        c["cache_exact"] += row["cache"] == "hit"
        c["cache_semantic"] += row["cache"] == "semantic-hit"
        if row["cache"] in ("hit", "semantic-hit"):
            c["cache_saved_usd"] += trace["cache"]["saved_usd"]
        c["compression_saved_usd"] += sum(x["saved_usd"] for x in trace.get("compression", []))
        if row["status"] < 400:
            if trace.get("saved_usd") is not None:
                c["saved_usd"] += trace["saved_usd"]
            elif row["route"] in TOP:
                c["saved_usd"] += TOP[row["route"]].cost(row["prompt_tokens"], row["completion_tokens"]) - \
                    row["cost_usd"]
            elif row["cache"] in ("hit", "semantic-hit"):
                c["saved_usd"] += trace["cache"]["saved_usd"]
        if not trace.get("tiers"):
            continue
        c["unanswered"] += trace["accepted_tier"] is None
        c["unaccepted"] += trace["accepted_tier"] is not None and trace["accepted"] is False
        position = 0
        for tier in trace["tiers"]:
            position = 1 if tier["model"] == "small" else position + 1
            t = tiers[(_hour(row["created_at"]), row["route"], position, tier["model"])]
            t["reached"] += 1
            t["accepted"] += tier["outcome"] == "accepted"
            if tier["reason"]:
                t[f"esc_{tier['reason']}"] += 1
            if tier["score"] is not None:
                side = "acc" if tier["outcome"] == "accepted" else "esc"
                t[f"judge_{side}_{min(19, int(tier['score'] * 20)):02d}"] += 1
    return routes, tiers


def stored_rollups(ledger: Ledger) -> tuple[dict, dict]:
    with ledger.engine.connect() as connection:
        routes = {(r.hour, r.route, r.purpose): dict(r._mapping) for r in connection.execute(select(rollups_table))}
        tiers = {(r.hour, r.route, r.tier, r.model): dict(r._mapping)
                 for r in connection.execute(select(tier_rollups_table))}
    return routes, tiers


def assert_same(expected: dict, stored: dict) -> None:
    assert set(expected) == set(stored)
    for key, counters in expected.items():
        for name, value in counters.items():
            assert stored[key][name] == pytest.approx(value, rel=1e-9, abs=1e-12), (key, name)


def ledger_rows(ledger: Ledger) -> list[dict[str, Any]]:
    with ledger.engine.connect() as connection:
        return [dict(r._mapping) for r in connection.execute(select(requests_table))]


def replay(spill: Path, ledger: Ledger) -> int:
    """Rows spilled to the JSON-lines file, written again through the ledger (as an operator's replay does)."""
    lines = spill.read_text().splitlines()
    for line in lines:
        row = json.loads(line)
        row["created_at"] = datetime.fromisoformat(row["created_at"])
        ledger.record(row)
    return len(lines)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("postgres_db")  # a database of this test's own


def test_rollups_equal_a_direct_aggregation_of_the_ledger_rows_spilled_ones_included(
        ledger_url: str, tmp_path: Path) -> None:
    rows = seeded_rows(1500)
    ledger = Ledger(ledger_url, tmp_path / "spill.jsonl", batch_size=97, rollups=Rollups(TOP.get))
    ledger.start()
    for row in rows[:1200]:
        ledger.record(row)
    assert ledger.flush(60)
    # the database is unreachable for another writer: its rows are spilled, then replayed into the ledger
    broken = Ledger(f"sqlite:///{tmp_path / 'missing' / 'ledger.db'}", tmp_path / "spill.jsonl",
                    retry_interval_s=0.05)
    broken.start()
    for row in rows[1200:]:
        broken.record(row)
    broken.close()
    assert replay(tmp_path / "spill.jsonl", ledger) == 300
    assert ledger.flush(60)
    written = ledger_rows(ledger)
    assert len(written) == 1500
    expected_routes, expected_tiers = expected_rollups(written)
    stored_routes, stored_tiers = stored_rollups(ledger)
    assert_same(expected_routes, stored_routes)
    assert_same(expected_tiers, stored_tiers)
    assert sum(v["requests"] for v in stored_routes.values()) == 1500
    assert any(k[2] == "audit" for k in stored_routes)
    cascaded = sum(1 for r in written if r["purpose"] == "client" and (r["trace"] or {}).get("tiers"))
    assert sum(v["reached"] for k, v in stored_tiers.items() if k[2] == 1) > cascaded  # legacy second prompts
    ledger.close()


# -- the API over seeded rows ----------------------------------------------------------------------------------
def _admin(gateway: Gateway, method: str, path: str, body: Any = None, key: str | None = ADMIN) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, gateway.url + path, json=body, headers=headers, timeout=60)


def _window(start: datetime, end: datetime) -> str:
    return f"since={start.isoformat().replace('+00:00', 'Z')}&until={end.isoformat().replace('+00:00', 'Z')}"


def _plain_config(standin: Service) -> dict[str, Any]:
    return {"models": [model_entry("alpha", "alpha", standin.url, "http", input_cost_per_token=1e-6,
                                   output_cost_per_token=2e-6),
                       model_entry("beta", "beta", standin.url, "http", input_cost_per_token=1e-7,
                                   output_cost_per_token=2e-7)],
            "routes": [{"name": "fast", "models": ["beta", "alpha"]}]}


@pytest.fixture
def seeded(make_gateway: Callable[..., Gateway], standin_server: Service, tmp_path: Path, ledger_url: str
           ) -> tuple[Gateway, list[dict[str, Any]]]:
    """A gateway whose ledger (SQLite or PostgreSQL) holds the seeded rows, written through the ledger and its
    rollups."""
    gateway = make_gateway({**_plain_config(standin_server), "ledger": {"url": ledger_url}}, ENV)
    ledger = Ledger(gateway.ledger_url, tmp_path / "seed-spill.jsonl", rollups=Rollups(TOP.get))
    ledger.start()
    rows = seeded_rows(600, seed=11)
    for row in rows:
        ledger.record(row)
    assert ledger.flush(60)
    ledger.close()
    return gateway, rows


def _quantile_bucket(latencies: list[float], q: float) -> tuple[float, float]:
    ordered = sorted(latencies)
    value = ordered[max(0, math.ceil(q * len(ordered)) - 1)]
    index = bisect.bisect_right(LATENCY_BOUNDS_MS, value)
    return (LATENCY_BOUNDS_MS[index - 1] if index else 0.0), LATENCY_BOUNDS_MS[min(index, len(LATENCY_BOUNDS_MS) - 1)]


def test_overview_totals_and_series_match_the_rows(seeded: tuple[Gateway, list[dict[str, Any]]]) -> None:
    gateway, rows = seeded
    window = _window(START, START + timedelta(days=3))
    hourly = _admin(gateway, "GET", f"/admin/analytics/overview?{window}").json()
    daily = _admin(gateway, "GET", f"/admin/analytics/overview?{window}&granularity=day").json()
    client = [r for r in rows if r["purpose"] == "client"]
    totals = hourly["totals"]
    assert totals["requests"] == len(client)
    assert totals["errors"] == sum(r["status"] >= 400 for r in client)
    assert totals["errors_5xx"] == sum(r["status"] >= 500 for r in client)
    assert totals["spend_usd"] == pytest.approx(sum(r["cost_usd"] for r in client))
    assert totals["cache_hits"] == sum(r["cache"] in ("hit", "semantic-hit") for r in client)
    assert totals["cache_saved_usd"] == pytest.approx(sum((r["trace"] or {}).get("cache", {}).get("saved_usd", 0)
                                                          for r in client))
    assert totals["compression_saved_usd"] == pytest.approx(
        sum(x["saved_usd"] for r in client for x in (r["trace"] or {}).get("compression", [])))
    expected, _ = expected_rollups(rows)
    assert totals["saved_usd"] == pytest.approx(sum(v["saved_usd"] for k, v in expected.items() if k[2] == "client"))
    for q, name in ((0.5, "p50_ms"), (0.95, "p95_ms")):
        lo, hi = _quantile_bucket([r["latency_ms"] for r in client], q)
        assert lo <= totals[name] <= hi, (name, totals[name], lo, hi)
    audits = [r for r in rows if r["purpose"] == "audit"]
    assert hourly["audits"] == {"requests": len(audits), "spend_usd": pytest.approx(sum(r["cost_usd"] for r in audits))}
    assert hourly["routes"] == ["alpha", "casc", "fast"]
    assert len(hourly["series"]) == len({_hour(r["created_at"]) for r in client})
    assert [s["bucket"] for s in daily["series"]] == [(START + timedelta(days=d)).isoformat() for d in range(3)]
    for field in ("requests", "errors", "cache_hits"):
        assert sum(s[field] for s in daily["series"]) == sum(s[field] for s in hourly["series"]) == totals[field]
    first_day = START.isoformat()
    assert daily["series"][0]["requests"] == sum(r["created_at"] < START + timedelta(days=1) for r in client)
    assert daily["series"][0]["bucket"] == first_day
    one = _admin(gateway, "GET", f"/admin/analytics/overview?{window}&route=casc").json()
    assert one["totals"]["requests"] == sum(r["route"] == "casc" for r in client)


def _walk(gateway: Gateway, query: str) -> list[str]:
    ids, after, pages = [], None, 0
    while True:
        page = _admin(gateway, "GET", f"/admin/traces?{query}" + (f"&after={after}" if after else "")).json()
        ids += [row["id"] for row in page["data"]]
        pages += 1
        if not page["has_more"]:
            assert page["next"] is None
            return ids
        after = page["next"]
        assert pages < 500


def test_trace_pages_walk_every_row_once_newest_first(seeded: tuple[Gateway, list[dict[str, Any]]]) -> None:
    gateway, rows = seeded
    since, until = START + timedelta(hours=5), START + timedelta(hours=40)
    in_window = [r for r in rows if since <= r["created_at"] < until]
    newest_first = [r["id"] for r in sorted(in_window, key=lambda r: (r["created_at"], r["id"]), reverse=True)]
    assert _walk(gateway, f"{_window(since, until)}&limit=7") == newest_first
    by_key = [i for i in newest_first if next(r for r in rows if r["id"] == i)["key_id"] == "k2"]
    assert _walk(gateway, f"{_window(since, until)}&limit=13&key_id=k2") == by_key
    by_route = _walk(gateway, f"{_window(since, until)}&limit=500&route=casc")
    assert by_route == [i for i in newest_first if next(r for r in rows if r["id"] == i)["route"] == "casc"]
    first = _admin(gateway, "GET", f"/admin/traces?{_window(since, until)}&limit=1").json()["data"][0]
    assert set(first) >= {"id", "created_at", "key_id", "route", "model", "status", "cost_usd", "latency_ms",
                          "cache", "tiers"}
    assert "prompt" not in first and "response" not in first
    one = _admin(gateway, "GET", f"/admin/traces?{_window(since, until)}&request_id={newest_first[3]}").json()
    assert [r["id"] for r in one["data"]] == [newest_first[3]]
    cascaded = next(r for r in in_window if (r["trace"] or {}).get("tiers"))
    full = _admin(gateway, "GET", f"/admin/traces/{cascaded['id']}").json()
    assert full["trace"]["tiers"] == cascaded["trace"]["tiers"]
    assert "prompt" not in full and "response" not in full  # ledger.store_content is off
    missing = _admin(gateway, "GET", "/admin/traces/no-such-request")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "trace_not_found"
    assert _admin(gateway, "GET", "/admin/traces?after=bm90LWEtY3Vyc29y").status_code == 400


ENDPOINTS = (("GET", "/admin/analytics/overview", None), ("GET", "/admin/analytics/funnel", None),
             ("GET", "/admin/analytics/judge", None), ("GET", "/admin/traces", None),
             ("GET", "/admin/traces/x", None), ("GET", "/admin/whatif", None),
             ("POST", "/admin/whatif/apply", {"route": "fast", "tiers": [{"model": "alpha"}]}),
             ("GET", "/admin/audit", None))


def test_every_analytics_endpoint_needs_the_admin_key_and_windows_are_bounded(
        make_gateway: Callable[..., Gateway], standin_server: Service) -> None:
    on = make_gateway(_plain_config(standin_server), ENV)
    off = make_gateway(_plain_config(standin_server))
    for method, path, body in ENDPOINTS:
        assert _admin(on, method, path, body, key=None).status_code == 401, path
        refused = _admin(on, method, path, body, key=API_KEY)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden", path
        disabled = _admin(off, method, path, body)
        assert disabled.status_code == 404 and disabled.json()["error"]["code"] == "admin_disabled", path
    now = datetime.now(UTC)
    for path in ("/admin/analytics/overview", "/admin/traces"):
        too_long = _admin(on, "GET", f"{path}?{_window(now - timedelta(days=91), now)}")
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "since"
        assert _admin(on, "GET", f"{path}?{_window(now, now)}").status_code == 400
        assert _admin(on, "GET", f"{path}?since=yesterday").status_code == 400
        assert _admin(on, "GET", f"{path}?{_window(now - timedelta(days=90), now)}").status_code == 200
    assert _admin(on, "GET", "/admin/analytics/overview?granularity=week").status_code == 400
    assert _admin(on, "GET", "/admin/traces?limit=0").status_code == 400
    # a route that is not a cascade has no funnel, judge or frontier
    for path in ("/admin/analytics/funnel", "/admin/analytics/judge", "/admin/whatif"):
        assert _admin(on, "GET", path).status_code == 400  # no cascade route to default to
        unknown = _admin(on, "GET", f"{path}?route=fast")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "route_not_found"


# -- a real cascade through a real gateway --------------------------------------------------------------------------
CASCADE = "frugal/auto"


def _cascade_config(standin: Service, cascade: Path, tmp: Path) -> dict[str, Any]:
    models = [model_entry(name, name, standin.url, transport="http", max_retries=0, input_cost_per_token=price / 40,
                          output_cost_per_token=price / 40) for name, _, price in MODELS]
    return {"models": models, "routes": [{"name": CASCADE, "kind": "cascade", "cascade": str(cascade)}],
            "artifacts": {"dir": str(tmp / "artifacts"), "watch_interval_s": 0}}


def _ask(gateway: Gateway, grid: Any, q: int) -> str:
    reply = gateway.post("/v1/chat/completions", {"model": CASCADE, "messages": [
        {"role": "user", "content": grid.queries[q]}]})
    assert reply.status_code == 200, reply.text
    return reply.headers["x-request-id"]


def test_funnel_and_judge_of_a_cascade_count_its_traces(
        make_gateway: Callable[..., Gateway], synthetic, synthetic_standin, tmp_path: Path) -> None:
    _, grid, cascade = synthetic
    gateway = make_gateway(_cascade_config(synthetic_standin, cascade, tmp_path), ENV)
    ids = [_ask(gateway, grid, q) for q in range(1, 61, 2)]
    traces = [gateway.ledger_row(i)["trace"] for i in ids]
    wait_until(lambda: _admin(gateway, "GET", "/admin/analytics/overview").json()["totals"]["requests"] == len(ids),
               what="the rollups of every request")
    funnel = _admin(gateway, "GET", "/admin/analytics/funnel").json()  # the only cascade route
    assert funnel["route"] == CASCADE and funnel["requests"] == len(ids) and funnel["cache_hits"] == 0
    tiers = yaml.safe_load(cascade.read_text())["chosen"]["tiers"]
    by_tier = {t["tier"]: t for t in funnel["tiers"]}
    assert [by_tier[n]["model"] for n in sorted(by_tier)] == [t["model"] for t in tiers][:len(by_tier)]
    for number, tier in by_tier.items():
        decisions = [t["tiers"][number - 1] for t in traces if len(t["tiers"]) >= number]
        assert tier["reached"] == len(decisions) > 0
        assert tier["accepted"] == sum(d["outcome"] == "accepted" for d in decisions)
        assert tier["escalated"]["score"] == sum(d["reason"] == "score" for d in decisions)
    assert sum(t["accepted"] + t["fallback_accepted"] for t in funnel["tiers"]) + funnel["unanswered"] == len(ids)
    assert by_tier[1]["escalated"]["score"] > 0 and by_tier[1]["accepted"] > 0  # the test means something

    judge = _admin(gateway, "GET", f"/admin/analytics/judge?route={CASCADE}&learning=true").json()
    judged = {t["tier"]: t for t in judge["tiers"]}
    assert judged[1]["threshold"] == tiers[0]["threshold"] == judged[1]["threshold_seen"]
    scores = [(t["tiers"][0]["score"], t["tiers"][0]["outcome"]) for t in traces]
    for b in judged[1]["bins"]:
        inside = [o for s, o in scores if b["lo"] <= s < b["hi"] or (b["hi"] == 1.0 and s == 1.0)]
        assert b["accepted"] == sum(o == "accepted" for o in inside)
        assert b["escalated"] == sum(o != "accepted" for o in inside)
    assert sum(b["accepted"] + b["escalated"] for b in judged[1]["bins"]) == len(ids)
    assert judge["learning"]["route"] == CASCADE
    assert _admin(gateway, "GET", f"/admin/analytics/judge?route={CASCADE}").json()["learning"] is None
    # a refresh reads no ledger: the estimate read a moment ago is shared
    again = _admin(gateway, "GET", f"/admin/analytics/judge?route={CASCADE}&learning=true").json()
    assert again["learning_read_at"] == judge["learning_read_at"] and again["learning"] == judge["learning"]


def test_whatif_proposes_from_the_frontier_and_apply_changes_the_live_thresholds_with_an_audit_entry(
        make_gateway: Callable[..., Gateway], synthetic, synthetic_standin, tmp_path: Path) -> None:
    _, grid, cascade = synthetic
    gateway = make_gateway(_cascade_config(synthetic_standin, cascade, tmp_path), ENV)
    fitted = yaml.safe_load(cascade.read_text())
    frontier = fitted["frontier"]
    budget = sorted(p["cost_usd"] for p in frontier)[len(frontier) // 2]
    body = _admin(gateway, "GET", f"/admin/whatif?route={CASCADE}&budget_usd={budget}").json()
    assert body["source"] == "cascade file" and len(body["frontier"]) == len(frontier)
    assert [p["accuracy"] for p in body["frontier"]] == [p["accuracy"] for p in frontier]
    best = max((p for p in frontier if p["cost_usd"] <= budget), key=lambda p: (p["accuracy"], -p["cost_usd"]))
    assert body["proposal"]["accuracy"] == best["accuracy"] and body["proposal"]["cost_usd"] == best["cost_usd"]
    chosen = fitted["chosen"]["tiers"]
    assert body["current"]["tiers"] == [{"model": t["model"], "threshold": t.get("threshold")} for t in chosen]
    assert _admin(gateway, "GET", f"/admin/whatif?route={CASCADE}").json()["proposal"] is None
    assert _admin(gateway, "GET", f"/admin/whatif?route={CASCADE}&budget_usd=-1").status_code == 400

    new = [{"model": t["model"], "threshold": (0.999 if i == 0 else t.get("threshold"))} for i, t in enumerate(chosen)]
    for bad in ([{"model": "nope"}], [{"model": chosen[0]["model"], "threshold": 1.5}, {"model": chosen[-1]["model"]}],
                [*new[:-1], {"model": chosen[-1]["model"], "threshold": 0.5}], [], "x"):
        refused = _admin(gateway, "POST", "/admin/whatif/apply", {"route": CASCADE, "tiers": bad})
        assert refused.status_code == 400, (bad, refused.text)
    assert _admin(gateway, "POST", "/admin/whatif/apply", {"route": CASCADE, "tiers": new},
                  key=API_KEY).status_code == 403
    assert _admin(gateway, "GET", "/admin/audit").json()["data"] == []  # nothing was changed so far

    applied = _admin(gateway, "POST", "/admin/whatif/apply", {"route": CASCADE, "tiers": new},
                     ).json()
    assert applied["applied"] == "v0001" and applied["artifact"] == "v0001"
    assert [t["threshold"] for t in applied["tiers"]] == [t["threshold"] for t in new]
    row = gateway.ledger_row(_ask(gateway, grid, 3))
    assert row["trace"]["tiers"][0]["threshold"] == 0.999  # the next request is judged against it
    entries = _admin(gateway, "GET", "/admin/audit?action=route.thresholds").json()["data"]
    assert len(entries) == 1
    entry = entries[0]
    assert (entry["actor"], entry["target"]) == ("admin", CASCADE)
    assert entry["before"]["tiers"][0]["threshold"] == chosen[0]["threshold"]
    assert entry["after"]["tiers"][0]["threshold"] == 0.999 and entry["after"]["artifact"] == "v0001"

    # a second change, named: the log pages newest first
    again = [{**new[0], "threshold": 0.25}, *new[1:]]
    assert _admin(gateway, "POST", "/admin/whatif/apply", {"route": CASCADE, "tiers": again}).status_code == 200
    httpx.post(gateway.url + "/admin/whatif/apply", json={"route": CASCADE, "tiers": new}, timeout=60,
               headers={"authorization": f"Bearer {ADMIN}", "x-frugal-actor": "ops-alice"}).raise_for_status()
    first = _admin(gateway, "GET", "/admin/audit?limit=2").json()
    assert [e["after"]["tiers"][0]["threshold"] for e in first["data"]] == [0.999, 0.25]
    assert first["data"][0]["actor"] == "admin (ops-alice)" and first["has_more"]
    rest = _admin(gateway, "GET", f"/admin/audit?limit=2&after={first['next']}").json()
    assert [e["after"]["tiers"][0]["threshold"] for e in rest["data"]] == [0.999] and not rest["has_more"]


def test_names_clients_make_up_share_one_rollup_row() -> None:
    rollups = Rollups(None, known=["frugal/auto"])
    now = datetime.now(UTC)
    rows = [ledger_row(id=f"r{i}", created_at=now, endpoint="chat", route=name, models_tried=[], status=status,
                       stream=False, prompt_tokens=0, completion_tokens=0, tokens_estimated=False, cost_usd=0.0,
                       latency_ms=1.0, cache="none", client_disconnected=False)
            for i, (name, status) in enumerate([("frugal/auto", 200), ("made-up-1", 404), ("made-up-2", 404)])]
    batch = rollups.aggregate(rows)
    assert sorted(route for _, route, _ in batch.routes) == ["(other)", "frugal/auto"]
    assert batch.routes[(next(iter(batch.routes))[0], "(other)", "client")]["requests"] == 2


def test_rebuilding_counts_a_ledger_written_before_rollups_existed(tmp_path: Path) -> None:
    """A ledger written without rollups (an older Frugal), rebuilt: the same counters as if it had had them."""
    from gateway.rollups import rebuild  # noqa: PLC0415

    rows = seeded_rows(700)
    old = Ledger(f"sqlite:///{tmp_path / 'old.db'}", tmp_path / "spill.jsonl", batch_size=50)
    old.start()
    for row in rows:
        old.record(row)
    assert old.flush(60)
    assert stored_rollups(old) == ({}, {})  # nothing counted yet: the dashboard would show no history
    assert rebuild(old.engine, Rollups(TOP.get), chunk_rows=64) == 700
    expected_routes, expected_tiers = expected_rollups(ledger_rows(old))
    stored_routes, stored_tiers = stored_rollups(old)
    assert_same(expected_routes, stored_routes)
    assert_same(expected_tiers, stored_tiers)
    assert rebuild(old.engine, Rollups(TOP.get)) == 700  # again: emptied first, never counted twice
    assert_same(expected_routes, stored_rollups(old)[0])
    old.close()


def test_the_rebuild_command_counts_the_configured_ledger(tmp_path: Path) -> None:
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    ledger = Ledger(f"sqlite:///{tmp_path / 'cli.db'}", tmp_path / "spill.jsonl")
    ledger.start()
    for row in seeded_rows(120):
        ledger.record(row)
    assert ledger.flush(60)
    ledger.close()
    config = tmp_path / "frugal.yaml"
    config.write_text(yaml.safe_dump({"ledger": {"url": f"sqlite:///{tmp_path / 'cli.db'}"}}))
    frugal = Path(sys.executable).parent / "frugal"
    done = subprocess.run([str(frugal), "ledger", "rebuild-rollups", "--config", str(config), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"] == 120
    check = Ledger(f"sqlite:///{tmp_path / 'cli.db'}", tmp_path / "spill.jsonl")
    assert sum(v["requests"] for v in stored_rollups(check)[0].values()) == 120
    missing = subprocess.run([str(frugal), "ledger", "rebuild-rollups", "--config", str(tmp_path / "nope.yaml")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "nope.yaml" in missing.stderr + missing.stdout


def test_expensive_reads_are_shared_by_concurrent_callers_and_kept_a_while() -> None:
    import asyncio  # noqa: PLC0415

    from gateway.single_flight import SharedReads  # noqa: PLC0415

    reads: list[str] = []

    async def scenario() -> None:
        gate = asyncio.Event()

        async def slow_read() -> str:
            reads.append("read")
            await gate.wait()
            return f"value {len(reads)}"

        kept = SharedReads(ttl_s=3600)
        waiting = [asyncio.ensure_future(kept.get("k", slow_read)) for _ in range(10)]
        await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(*waiting)
        assert {value for value, _ in results} == {"value 1"} and reads == ["read"]
        assert (await kept.get("k", slow_read))[0] == "value 1" and reads == ["read"]  # kept
        assert (await kept.get("other", slow_read))[0] == "value 2"  # another key: its own read
        stale = SharedReads(ttl_s=0)
        await stale.get("k", slow_read)
        await stale.get("k", slow_read)
        assert len(reads) == 4  # past its ttl a value is read again

    asyncio.run(scenario())
