"""Learning from traffic in the running gateway (docs/learning.md): client feedback, shadow audits and
escalation labels, their budget, the admin API's estimates, and hot swaps of route artifacts under load.

A fitted synthetic cascade (tests/cascade_data.py: cheap, mid, big) answers through the stand-in provider,
so that which tier answers, and what each model said, is known from the data file."""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import select

from gateway.artifacts import ArtifactStore, ArtifactTier
from gateway.ledger import labels_table, requests_table
from scorer.agreement import compare
from scorer.fit.dataset import Grid
from tests.cascade_data import MODELS
from tests.harness import API_KEY, Gateway, Service, model_entry, wait_until

ROUTE = "frugal/auto"
ADMIN = "sk-admin-test"
OTHER = "sk-other-tenant"


def _models(url: str) -> list[dict[str, Any]]:
    return [model_entry(name, name, url, transport="http", max_retries=0, input_cost_per_token=price / 40,
                        output_cost_per_token=price / 40) for name, _, price in MODELS]


def _config(standin: Service, cascade: Path, tmp: Path, *, store_content: bool = True,
            **learning: Any) -> dict[str, Any]:
    return {"models": _models(standin.url),
            "routes": [{"name": ROUTE, "kind": "cascade", "cascade": str(cascade), "learning": learning}],
            "auth": {"keys": [{"id": "test-key", "key_env": "FRUGAL_TEST_KEY"},
                              {"id": "other", "key_env": "FRUGAL_OTHER_KEY"}]},
            "ledger": {"store_content": store_content},
            "artifacts": {"dir": str(tmp / "artifacts"), "watch_interval_s": 0.1}}


ENV = {"FRUGAL_OTHER_KEY": OTHER, "FRUGAL_ADMIN_KEY": ADMIN}


def _ask(gateway: Gateway, grid: Grid, q: int, **extra: Any) -> httpx.Response:
    body = {"model": ROUTE, "messages": [{"role": "user", "content": grid.queries[q]}], "user": grid.query_ids[q],
            **extra}
    reply = gateway.post("/v1/chat/completions", body)
    assert reply.status_code == 200, reply.text
    return reply


def _recorded(grid: Grid, q: int, model: str) -> str:
    return grid.answers[q][grid.models.index(model)]


def _labels(gateway: Gateway, request_id: str) -> list[dict[str, Any]]:
    with gateway.engine.connect() as connection:
        rows = connection.execute(select(labels_table).where(labels_table.c.request_id == request_id))
        return [dict(r._mapping) for r in rows]


def _rows(gateway: Gateway, **where: Any) -> list[dict[str, Any]]:
    query = select(requests_table).where(*(requests_table.c[k] == v for k, v in where.items()))
    with gateway.engine.connect() as connection:
        return [dict(r._mapping) for r in connection.execute(query)]


def _admin(gateway: Gateway, method: str, path: str, body: Any = None, key: str | None = ADMIN) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, gateway.url + path, json=body, headers=headers, timeout=60)


def _metric(gateway: Gateway, name: str, **labels: str) -> float:
    text = httpx.get(gateway.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- audits and escalation labels ---------------------------------------------------------------------------
def test_audits_label_accepted_answers_after_the_response_at_the_operators_cost(
        make_gateway: Callable[..., Gateway], synthetic, synthetic_standin, tmp_path: Path) -> None:
    _, grid, cascade = synthetic
    gateway = make_gateway(_config(synthetic_standin, cascade, tmp_path, audit_rate=1.0, audit_budget_usd=100.0),
                           ENV)
    tiers = [t["model"] for t in yaml.safe_load(cascade.read_text())["chosen"]["tiers"]]
    top = tiers[-1]
    audited = escalated = 0
    for q in range(1, 60, 2):
        reply = _ask(gateway, grid, q)
        request_id, model = reply.headers["x-request-id"], reply.headers["x-frugal-model"]
        outcomes = reply.headers["x-frugal-tier-outcomes"].split(",")
        query, answer = grid.queries[q], _recorded(grid, q, model)
        if model != top:
            audited += 1
            label = wait_until(lambda rid=request_id: [x for x in _labels(gateway, rid) if x["source"] == "audit"],
                               what="an audit label")[0]
            verdict = compare(query, answer, _recorded(grid, q, top))
            assert (label["model"], label["label"]) == (model, "good" if verdict.agree else "bad")
            assert label["sample_rate"] == 1.0 and label["correction"] == _recorded(grid, q, top)
            row, audit = gateway.ledger_row(request_id), gateway.ledger_row(f"{request_id}-audit")
            assert (audit["purpose"], audit["parent_id"], audit["key_id"], audit["model"]) == \
                ("audit", request_id, None, top)
            assert audit["cost_usd"] > 0 and audit["trace"]["audit"]["model"] == model
            # never on the client's time: the audit started once the answer had been sent in full
            assert audit["created_at"] >= row["created_at"] + timedelta(milliseconds=row["latency_ms"])
            assert row["cost_usd"] == pytest.approx(sum(a["cost_usd"] for a in row["trace"]["attempts"]))
        for rejected, outcome in zip(tiers, outcomes, strict=False):
            if outcome != "rejected":
                continue
            escalated += 1
            label = wait_until(lambda rid=request_id, m=rejected: [x for x in _labels(gateway, rid)
                                                                   if x["source"] == "escalation" and x["model"] == m],
                               what="an escalation label")[0]
            verdict = compare(query, _recorded(grid, q, rejected), answer)
            assert label["label"] == ("good" if verdict.agree else "bad")
    assert audited >= 3 and escalated >= 3, (audited, escalated)
    wait_until(lambda: len(_rows(gateway, purpose="audit")) == audited, what="every audit's row")
    assert not _rows(gateway, purpose="audit", key_id="test-key")
    assert _metric(gateway, "frugal_audits_total", route=ROUTE) == audited
    assert _metric(gateway, "frugal_audit_spend_usd_total", route=ROUTE) > 0

    # the estimates, from the ledger (admin API) and live (Prometheus)
    body = _admin(gateway, "GET", "/admin/learning?route=" + ROUTE).json()
    window = body["data"][0]
    audited_tiers = {m: t for m, t in window["tiers"].items() if t["audited"]}
    assert sum(t["audited"] for t in audited_tiers.values()) == audited
    for tier in audited_tiers.values():
        fa = tier["false_accept_rate"]
        assert fa["low"] <= fa["estimate"] <= fa["high"]
        assert fa["estimate"] == pytest.approx(tier["audited_bad"] / tier["audited"])
        assert tier["label_coverage"] == pytest.approx(1.0)
    assert window["audit_cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in _rows(gateway, purpose="audit")))
    assert _metric(gateway, "frugal_false_accept_rate", route=ROUTE, bound="high") > 0
    first = window["tiers"][tiers[0]]
    assert first["escalation_rate"] == pytest.approx(1 - first["accepted"] / first["reached"])


def test_audits_respect_their_daily_budget_and_rate(make_gateway: Callable[..., Gateway], synthetic, synthetic_standin,
                                                    tmp_path: Path) -> None:
    _, grid, cascade = synthetic
    big_price = dict((n, p) for n, _, p in MODELS)["big"] / 40
    budget = big_price * 400  # a few audits' worth (each reserves its prompt and 16 answer tokens at most)
    gateway = make_gateway(_config(synthetic_standin, cascade, tmp_path, audit_rate=1.0, audit_budget_usd=budget,
                                   audit_max_tokens=16, label_escalations=False), ENV)
    for q in range(1, 80, 2):
        _ask(gateway, grid, q)
    skipped = wait_until(lambda: _metric(gateway, "frugal_audits_total", outcome="skipped_budget"),
                         what="an audit skipped for the budget")
    audits = wait_until(lambda: _rows(gateway, purpose="audit"), what="an audit row")
    assert skipped >= 1
    assert sum(r["cost_usd"] for r in audits) <= budget
    label = wait_until(lambda: _labels(gateway, audits[0]["parent_id"]), what="the audit's label")[0]
    assert label["source"] == "audit"


def test_without_content_storage_or_with_rate_zero_nothing_is_audited(
        make_gateway: Callable[..., Gateway], synthetic, synthetic_standin, tmp_path: Path) -> None:
    _, grid, cascade = synthetic
    off = make_gateway(_config(synthetic_standin, cascade, tmp_path, store_content=False, audit_rate=1.0), ENV)
    zero = make_gateway(_config(synthetic_standin, cascade, tmp_path, audit_rate=0.0, label_escalations=False), ENV)
    ids = []
    for gateway in (off, zero):
        for q in range(1, 30, 2):
            ids.append((gateway, _ask(gateway, grid, q).headers["x-request-id"]))
    assert "ledger.store_content is false" in off.log()
    for gateway, request_id in ids:
        gateway.ledger_row(request_id)
    for gateway in (off, zero):
        assert gateway.post("/v1/chat/completions", {"model": "cheap", "messages": [{"role": "user", "content": "x"}]})
        assert not _rows(gateway, purpose="audit")
        assert _metric(gateway, "frugal_audits_total") == 0
    assert all(not _labels(g, r) for g, r in ids)


@pytest.fixture(scope="module")
def plain_gateway(tmp_path_factory: pytest.TempPathFactory, synthetic: Any, synthetic_standin: Service) -> Any:
    """One gateway for the many small validation cases."""
    tmp = tmp_path_factory.mktemp("learning")
    gateway = Gateway(tmp, _config(synthetic_standin, synthetic[2], tmp), ENV).start()
    yield gateway
    gateway.stop()


# -- feedback -----------------------------------------------------------------------------------------------
def test_feedback_is_stored_once_per_source_and_only_for_the_key_that_asked(
        make_gateway: Callable[..., Gateway], synthetic, synthetic_standin, tmp_path: Path) -> None:
    _, grid, cascade = synthetic
    gateway = make_gateway(_config(synthetic_standin, cascade, tmp_path, store_content=False), ENV)
    reply = _ask(gateway, grid, 3)
    request_id = reply.headers["x-request-id"]
    first = gateway.post("/v1/feedback", {"request_id": request_id, "label": "good", "comment": "spot on",
                                          "correction": "B"})
    assert first.status_code == 200, first.text
    assert first.json()["label"] == "good" and first.json()["model"] == reply.headers["x-frugal-model"]
    assert first.json()["correction_stored"] is False  # content storage is off
    again = gateway.post("/v1/feedback", {"request_id": reply.json()["id"], "score": 0.2})  # the body's id works too
    assert again.status_code == 200 and again.json()["label"] == "bad"
    stored = _labels(gateway, request_id)
    assert len(stored) == 1 and stored[0]["label"] == "bad" and stored[0]["score"] == 0.2
    assert stored[0]["key_id"] == "test-key" and stored[0]["correction"] is None and stored[0]["comment"] is None

    other = gateway.post("/v1/feedback", {"request_id": request_id, "label": "bad"},
                         headers={"authorization": f"Bearer {OTHER}"})
    unknown = gateway.post("/v1/feedback", {"request_id": "0123456789abcdef000000000001", "label": "bad"})
    for refused in (other, unknown):
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "request_not_found"
    assert other.json()["error"]["message"].replace(request_id, "ID") == \
        unknown.json()["error"]["message"].replace("0123456789abcdef000000000001", "ID")
    assert _labels(gateway, request_id)[0]["label"] == "bad"
    assert gateway.post("/v1/feedback", {"request_id": request_id, "label": "good"}, auth=False).status_code == 401

    # from the openai SDK
    import openai

    client = gateway.client()
    body = client.post("/feedback", body={"request_id": request_id, "label": "good"}, cast_to=object)
    assert body["label"] == "good"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.post("/feedback", body={"request_id": request_id, "label": "great"}, cast_to=object)


@pytest.mark.parametrize(("body", "param"), [
    ({"label": "good"}, "request_id"),
    ({"request_id": "", "label": "good"}, "request_id"),
    ({"request_id": 12, "label": "good"}, "request_id"),
    ({"request_id": "x"}, "label"),
    ({"request_id": "x", "label": "meh"}, "label"),
    ({"request_id": "x", "score": 1.5}, "score"),
    ({"request_id": "x", "score": True}, "score"),
    ({"request_id": "x", "score": "0.5"}, "score"),
    ({"request_id": "x", "label": "good", "score": 0.1}, "label"),
    ({"request_id": "x", "label": "good", "comment": 3}, "comment"),
    ({"request_id": "x", "label": "good", "rating": 5}, "rating"),
    ({"request_id": "x" * 65, "label": "good"}, "request_id"),
])
def test_feedback_validation_errors_are_400s_that_name_the_field(plain_gateway: Gateway, body: dict[str, Any],
                                                                   param: str) -> None:
    reply = plain_gateway.post("/v1/feedback", body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_feedback_bodies_that_are_not_json_objects_are_400s(plain_gateway: Gateway) -> None:
    for content in (b"", b"not json", b"[1, 2]", b'"x"'):
        reply = plain_gateway.post("/v1/feedback", content=content, headers={"content-type": "application/json"})
        assert reply.status_code == 400 and "error" in reply.json(), content


# -- the admin API and hot swaps ----------------------------------------------------------------------------
def test_admin_endpoints_refuse_client_keys_and_anonymous_calls_and_say_when_they_are_off(
        make_gateway: Callable[..., Gateway], synthetic, synthetic_standin, tmp_path: Path) -> None:
    _, _, cascade = synthetic
    on = make_gateway(_config(synthetic_standin, cascade, tmp_path), ENV)
    off = make_gateway(_config(synthetic_standin, cascade, tmp_path), {"FRUGAL_OTHER_KEY": OTHER})
    for method, path, body in (("GET", "/admin/routes", None), ("POST", "/admin/routes/rollback", {"route": ROUTE}),
                               ("GET", "/admin/learning", None)):
        assert _admin(on, method, path, body, key=None).status_code == 401
        for client_key in (API_KEY, OTHER):
            refused = _admin(on, method, path, body, key=client_key)
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
        disabled = _admin(off, method, path, body)
        assert disabled.status_code == 404 and "FRUGAL_ADMIN_KEY" in disabled.json()["error"]["message"]
    assert _admin(on, "GET", "/admin/learning?since=yesterday").status_code == 400
    assert _admin(on, "GET", "/admin/learning?since=2020-01-01T00:00:00Z").status_code == 400  # over 90 days
    assert _admin(on, "GET", "/admin/learning?route=nope").status_code == 404
    assert _admin(on, "POST", "/admin/routes/swap", {"route": ROUTE}).status_code == 400


def _thresholds(row: dict[str, Any]) -> list[float | None]:
    return [t["threshold"] for t in row["trace"]["tiers"]]


def test_swaps_under_load_lose_no_request_and_never_mix_versions_and_roll_back(
        make_gateway: Callable[..., Gateway], synthetic, synthetic_standin, tmp_path: Path) -> None:
    _, grid, cascade = synthetic
    gateway = make_gateway(_config(synthetic_standin, cascade, tmp_path), ENV)
    chosen = yaml.safe_load(cascade.read_text())["chosen"]["tiers"]
    store = ArtifactStore(tmp_path / "artifacts")
    # v0001 accepts whatever the first tier says; its other thresholds are the configuration's
    relaxed = [ArtifactTier(t["model"], 0.0 if i == 0 else t.get("threshold"), "none") for i, t in enumerate(chosen)]
    store.new_version(ROUTE, relaxed, parent="config", meta={"made_by": "test"})
    live = _admin(gateway, "GET", "/admin/routes").json()["data"][0]
    config_version = live["version"]
    assert live["artifact"] == "config" and live["versions"] == ["v0001"]
    assert [t["threshold"] for t in live["tiers"]] == [t.get("threshold") for t in chosen]

    swapped = _admin(gateway, "POST", "/admin/routes/swap", {"route": ROUTE, "version": "v0001"})
    assert swapped.status_code == 200, swapped.text
    v1 = swapped.json()["version"]
    assert v1.startswith("v0001-") and swapped.json()["previous"] == "config"
    reply = _ask(gateway, grid, 5)
    assert reply.headers["x-frugal-tier-accepted"] == "1"
    assert gateway.ledger_row(reply.headers["x-request-id"])["route_version"] == v1
    assert store.current(ROUTE) == "v0001"

    # under load: swaps back and forth while 6 clients ask
    expected = {v1: [t.threshold for t in relaxed], config_version: [t.get("threshold") for t in chosen]}
    versions = ["config", "v0001"] * 6

    def client(worker: int) -> list[str]:
        with httpx.Client(timeout=60, headers=gateway.headers()) as http:
            ids = []
            for i in range(15):
                q = (worker * 15 + i) % len(grid)
                body = {"model": ROUTE, "messages": [{"role": "user", "content": grid.queries[q]}]}
                answer = http.post(gateway.url + "/v1/chat/completions", json=body)
                assert answer.status_code == 200, answer.text
                ids.append(answer.headers["x-request-id"])
            return ids

    with ThreadPoolExecutor(7) as pool:
        futures = [pool.submit(client, w) for w in range(6)]
        for version in versions:
            done = _admin(gateway, "POST", "/admin/routes/swap", {"route": ROUTE, "version": version})
            assert done.status_code == 200, done.text
        ids = [i for f in futures for i in f.result()]
    assert len(ids) == 90
    for request_id in ids:
        row = gateway.ledger_row(request_id)
        assert row["route_version"] in expected
        served = _thresholds(row)
        assert served == expected[row["route_version"]][:len(served)]  # one version decided every tier
    assert {gateway.ledger_row(i)["route_version"] for i in ids} <= set(expected)

    # a version that cannot serve is refused and nothing changes
    (store.folder(ROUTE) / "v0002").mkdir()
    (store.folder(ROUTE) / "v0002" / "route.yaml").write_text("format: something-else\n")
    refused = _admin(gateway, "POST", "/admin/routes/swap", {"route": ROUTE, "version": "v0002"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "swap_refused"
    before = _admin(gateway, "GET", "/admin/routes").json()["data"][0]["version"]
    assert before == v1  # the last swap of the loop was to v0001

    # one-command rollback, and a change of the store's current version made elsewhere is followed
    rolled = _admin(gateway, "POST", "/admin/routes/rollback", {"route": ROUTE}).json()
    assert rolled["version"] == config_version and store.current(ROUTE) == "config"
    store.set_current(ROUTE, "v0001", "promoted by another process")
    wait_until(lambda: _admin(gateway, "GET", "/admin/routes").json()["data"][0]["artifact"] == "v0001",
               what="the gateway following the artifact store")
    assert re.search(r"now served by v0001-", gateway.log())
