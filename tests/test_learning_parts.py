"""The parts of learning from traffic, in process: the Wilson interval, the audit sample and budget, the
artifact store's versions, the ledger's labels and schema upgrade (docs/learning.md)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from scipy.stats import binomtest

from gateway.artifacts import CONFIG, ArtifactError, ArtifactStore, ArtifactTier
from gateway.audits import AuditBudget, sampled
from gateway.estimates import LiveEstimates, wilson
from gateway.ledger import Ledger, ledger_row


def test_wilson_interval_matches_the_reference_and_stays_in_bounds() -> None:
    assert wilson(0, 0) is None
    for bad, n in ((0, 10), (3, 10), (10, 10), (7, 200), (1, 1)):
        estimate, low, high = wilson(bad, n)  # type: ignore[misc]
        reference = binomtest(bad, n).proportion_ci(0.95, method="wilson")
        assert estimate == bad / n
        assert (low, high) == pytest.approx((reference.low, reference.high), abs=1e-9)
        assert 0 <= low <= estimate <= high <= 1


def test_the_audit_sample_is_uniform_and_reproducible() -> None:
    ids = [f"{i:028x}" for i in range(20_000)]
    chosen = [i for i in ids if sampled(i, 0.1)]
    assert 0.09 < len(chosen) / len(ids) < 0.11
    assert chosen == [i for i in ids if sampled(i, 0.1)]
    assert not any(sampled(i, 0.0) for i in ids[:1000]) and all(sampled(i, 1.0) for i in ids[:1000])


def test_the_audit_budget_reserves_settles_and_refuses() -> None:
    budget = AuditBudget({"r": 1.0})
    assert budget.reserve("r", 0.6)
    assert not budget.reserve("r", 0.6)  # 1.2 would exceed the day's dollar
    budget.settle("r", 0.6, 0.1)  # it cost less than reserved: the rest is free again
    assert budget.spent["r"] == pytest.approx(0.1)
    assert budget.reserve("r", 0.6)


def test_live_estimates_count_tiers_and_audit_labels() -> None:
    live = LiveEstimates()
    accepted = {"tiers": [{"model": "cheap", "outcome": "accepted"}]}
    climbed = {"tiers": [{"model": "cheap", "outcome": "rejected"}, {"model": "big", "outcome": "accepted"}]}
    for _ in range(6):
        live.request("r", accepted)
    for _ in range(4):
        live.request("r", climbed)
    for label in ("good", "good", "bad"):
        live.label("r", "cheap", "audit", label, accepted=True)
    live.label("r", "cheap", "escalation", "good", accepted=False)
    cheap = live.summary()["r"]["tiers"]["cheap"]
    assert cheap["escalation_rate"] == pytest.approx(0.4)
    assert cheap["audited"] == 3 and cheap["false_accept_rate"]["estimate"] == pytest.approx(1 / 3)
    assert cheap["label_coverage"] == pytest.approx(3 / 6)
    exported = {(m.name, tuple(s.labels.items())): s.value for m in live.collect() for s in m.samples}
    assert exported[("frugal_false_accept_rate", (("route", "r"), ("model", "cheap"), ("bound", "low")))] == \
        pytest.approx(wilson(1, 3)[1])  # type: ignore[index]


def test_artifact_versions_current_history_and_previous(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    assert store.current("frugal/auto") == CONFIG and store.previous("frugal/auto") is None
    judge = tmp_path / "a-judge"
    judge.mkdir()
    (judge / "judge.json").write_text("{}")
    one = store.new_version("frugal/auto", [ArtifactTier("local/m", 0.7), ArtifactTier("big")], parent=CONFIG,
                            meta={"made_by": "test"}, judges={"local/m": judge})
    two = store.new_version("frugal/auto", [ArtifactTier("local/m", 0.8), ArtifactTier("big")], parent="v0001",
                            meta={})
    assert (one.version, two.version) == ("v0001", "v0002")
    assert store.current("frugal/auto") == CONFIG  # written, not yet current
    read = store.read("frugal/auto", "v0001")
    assert Path(read.tiers[0].judge, "judge.json").is_file() and read.meta["made_by"] == "test"
    store.set_current("frugal/auto", "v0001", "promoted")
    store.set_current("frugal/auto", "v0002", "promoted")
    assert store.current("frugal/auto") == "v0002" and store.previous("frugal/auto") == "v0001"
    assert [h["version"] for h in store.history("frugal/auto")] == ["v0001", "v0002"]
    with pytest.raises(ArtifactError):
        store.set_current("frugal/auto", "v0009", "missing")
    with pytest.raises(ArtifactError):
        store.read("frugal/auto", "../../etc")
    assert store.current("frugal/auto") == "v0002"


def test_labels_replace_per_source_and_an_old_ledger_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as connection:  # the table as Frugal wrote it before labels and versions
        connection.execute(
            "CREATE TABLE frugal_requests (id VARCHAR(64) PRIMARY KEY, created_at DATETIME NOT NULL, key_id VARCHAR, "
            "endpoint VARCHAR NOT NULL, route VARCHAR, model VARCHAR, models_tried JSON NOT NULL, status INTEGER NOT "
            "NULL, error_code VARCHAR, stream BOOLEAN NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens "
            "INTEGER NOT NULL, tokens_estimated BOOLEAN NOT NULL, cost_usd FLOAT NOT NULL, latency_ms FLOAT NOT NULL, "
            "ttft_ms FLOAT, cache VARCHAR NOT NULL, client_disconnected BOOLEAN NOT NULL, user VARCHAR, trace JSON, "
            "prompt JSON, response TEXT)")
        connection.execute("INSERT INTO frugal_requests VALUES ('old', '2026-01-01 00:00:00', 'k', 'chat', 'r', 'm', "
                           "'[]', 200, NULL, 0, 1, 1, 0, 0.1, 1.0, NULL, 'none', 0, NULL, NULL, NULL, NULL)")
    ledger = Ledger(f"sqlite:///{path}", tmp_path / "spill.jsonl")
    ledger.start()
    try:
        ledger.record(ledger_row(id="new", endpoint="chat", models_tried=[], status=200, stream=False,
                                 prompt_tokens=1, completion_tokens=1, tokens_estimated=False, cost_usd=0.0,
                                 latency_ms=1.0, cache="none", client_disconnected=False, route_version="v0001-abc"))
        assert ledger.flush()
        old, new = ledger.request("old"), ledger.request("new")
        assert old is not None and old["purpose"] == "client" and old["route_version"] is None
        assert new is not None and new["route_version"] == "v0001-abc"
        first = ledger.upsert_label(request_id="new", source="client", model="m", label="good", score=1.0)
        ledger.upsert_label(request_id="new", source="audit", model="m", label="bad", score=0.0, sample_rate=0.1)
        again = ledger.upsert_label(request_id="new", source="client", model="m", label="bad", score=0.3)
        labels = ledger.labels("new")
        assert [(x["source"], x["label"]) for x in labels] == [("client", "bad"), ("audit", "bad")]
        assert again["id"] == first["id"] and again["created_at"] == first["created_at"]
        assert labels[1]["sample_rate"] == 0.1
    finally:
        ledger.close()


def test_feedback_while_the_ledger_is_unreachable_is_a_503_not_a_500(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from gateway.app import create_app
    from gateway.settings import parse_config

    config = parse_config(f"""
auth: {{required: false}}
ledger: {{url: "sqlite:///{tmp_path / 'missing' / 'ledger.db'}", spill_path: "{tmp_path / 'spill.jsonl'}"}}
artifacts: {{dir: "{tmp_path / 'artifacts'}", watch_interval_s: 0}}
""")
    with TestClient(create_app(config, backends={})) as client:
        reply = client.post("/v1/feedback", json={"request_id": "abc", "label": "good"})
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["code"] == "ledger_unavailable" and reply.headers["retry-after"] == "5"
