"""Retraining and refitting from the ledger (gateway/fit, docs/learning.md): the time-ordered split, the
promotion rule that refuses a worse candidate, versions written and made current, and rollback, on a
ledger of synthetic labelled traffic judged by the packaged judge."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from gateway.artifacts import CONFIG, ArtifactStore
from gateway.cli import build
from gateway.fit.ledger_data import labelled_answers
from gateway.fit.promotion import choose_threshold, decide, evaluate, time_split
from gateway.fit.retrain import PackOutcomes, refit_threshold, retrain_judge
from gateway.ledger import Ledger, ledger_row
from gateway.settings import load_config
from scorer.fit.dataset import load_grid
from scorer.judge import LocalJudge, packaged_judge
from scorer.signals import FEATURE_NAMES
from tests.harness import write_dataset

LOCAL = "local/smollm2-135m-instruct"
ROUTE = "frugal/auto"
START = datetime(2026, 11, 1, tzinfo=UTC)


def judge() -> LocalJudge:
    folder = packaged_judge(LOCAL)
    assert folder is not None
    return LocalJudge(folder)


def features(rng: np.random.Generator, signal: float) -> list[float]:
    """A multiple-choice answer's features; `mean_logprob` carries `signal`."""
    x = rng.normal(0, 1, len(FEATURE_NAMES))
    for i, name in enumerate(FEATURE_NAMES):
        if name.startswith("kind_"):
            x[i] = 1.0 if name == "kind_multiple_choice" else 0.0
    x[FEATURE_NAMES.index("mean_logprob")] = signal
    return [round(float(v), 5) for v in x]


def write_ledger(tmp: Path, threshold: float, rule: Any, n: int = 240, audit_rate: float = 0.5) -> Path:
    """`n` requests over time, judged by the packaged judge's version with `score` uniform; the local answer
    accepted at `threshold` (audited at `audit_rate`), else rejected (an escalation label); `rule(i, score)`
    says whether it was good."""
    rng = np.random.default_rng(7)
    version = judge().version
    ledger = Ledger(f"sqlite:///{tmp / 'ledger.db'}", tmp / "spill.jsonl")
    ledger.start()
    try:
        for i in range(n):
            score = float(rng.uniform())
            good = bool(rule(i, score))
            accepted = score >= threshold
            tiers = [{"model": LOCAL, "outcome": "accepted" if accepted else "rejected", "score": score,
                      "threshold": threshold, "judge": version, "features": features(rng, 2 * score - 1)}]
            if not accepted:
                tiers.append({"model": "big", "outcome": "accepted"})
            request_id = f"r{i:04d}"
            ledger.record(ledger_row(
                id=request_id, created_at=START + timedelta(minutes=i), key_id="k", endpoint="chat", route=ROUTE,
                model=LOCAL if accepted else "big", models_tried=[], status=200, stream=False, prompt_tokens=10,
                completion_tokens=2, tokens_estimated=False, cost_usd=0.0, latency_ms=1.0, cache="none",
                client_disconnected=False, trace={"route": ROUTE, "tiers": tiers, "version": "config-x"}))
            if accepted and i % round(1 / audit_rate) == 0:
                ledger.upsert_label(request_id=request_id, source="audit", model=LOCAL, route=ROUTE,
                                    label="good" if good else "bad", sample_rate=audit_rate)
            elif not accepted:
                ledger.upsert_label(request_id=request_id, source="escalation", model=LOCAL, route=ROUTE,
                                    label="good" if good else "bad")
        assert ledger.flush()
    finally:
        ledger.close()
    return tmp / "ledger.db"


def write_config(tmp: Path, threshold: float, target: float = 0.1) -> Path:
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "models": [{"name": LOCAL, "backend": LOCAL},
                   {"name": "big", "backend": "openai/big", "api_base": "http://127.0.0.1:9/v1",
                    "input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6}],
        "routes": [{"name": ROUTE, "kind": "cascade", "tiers": [{"model": LOCAL, "threshold": threshold},
                                                                {"model": "big"}],
                    "learning": {"target_false_accept": target}}],
        "ledger": {"url": f"sqlite:///{tmp / 'ledger.db'}"},
        "artifacts": {"dir": str(tmp / "artifacts")}}))
    return path


def test_the_split_is_by_time_and_weights_follow_the_sampling(tmp_path: Path) -> None:
    write_ledger(tmp_path, 0.5, lambda i, s: s > 0.3)
    answers = labelled_answers(f"sqlite:///{tmp_path / 'ledger.db'}", ROUTE, LOCAL)
    assert [a.created_at for a in answers] == sorted(a.created_at for a in answers)
    assert {a.source for a in answers} == {"audit", "escalation"}
    assert all(a.weight == (2.0 if a.source == "audit" else 1.0) for a in answers)
    assert all(len(a.features) == len(FEATURE_NAMES) for a in answers)
    train, test = time_split(answers, 0.3)
    assert max(answers[i].created_at for i in train) < min(answers[i].created_at for i in test)
    assert len(test) == round(len(answers) * 0.3)


def test_since_keeps_only_newer_requests(tmp_path: Path) -> None:
    write_ledger(tmp_path, 0.5, lambda i, s: s > 0.3)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    since = START + timedelta(minutes=120)
    every, newer = labelled_answers(url, ROUTE, LOCAL), labelled_answers(url, ROUTE, LOCAL, since=since)
    assert 0 < len(newer) < len(every)
    assert [a.request_id for a in newer] == [a.request_id for a in every if int(a.request_id[1:]) >= 120]
    assert all(a.group == a.request_id for a in every)  # no query_hash in these traces


def test_the_threshold_meets_the_target_with_the_largest_share() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    good = np.array([False, False, True, False, True, True, True, True, True])
    weights = np.ones(9)
    t = choose_threshold(scores, good, weights, 0.2, confident=False)
    assert t == 0.3  # 0.3 and above: 1 bad of 7
    assert evaluate(scores, good, weights, t).false_accept == pytest.approx(1 / 7)
    assert choose_threshold(scores, ~np.ones(9, dtype=bool), weights, 0.2, confident=False) == 1.0  # none does
    # confidently within 0.2: 1 bad of 7 could well be 0.2 or more (the interval reaches 0.51); 0 of 5 cannot
    assert choose_threshold(scores, good, weights, 0.2) == 1.0
    many = np.repeat(scores, 20), np.repeat(good, 20), np.ones(180)
    assert choose_threshold(*many, 0.2) == 0.5  # 0 bad of 100: the interval ends at 0.04


def test_a_refit_from_a_mis_set_threshold_is_promoted_and_made_current(tmp_path: Path) -> None:
    write_ledger(tmp_path, 0.1, lambda i, s: s >= 0.6)  # accepts nearly all; right only above 0.6
    config = load_config(write_config(tmp_path, 0.1))
    outcome = refit_threshold(config, ROUTE)
    decision = outcome.decision
    assert decision.promote and decision.current.false_accept > 0.1 >= decision.candidate.false_accept
    assert outcome.promoted == "v0001"
    store = ArtifactStore(tmp_path / "artifacts")
    assert store.current(ROUTE) == "v0001"
    artifact = store.read(ROUTE, "v0001")
    assert 0.55 <= artifact.tiers[0].threshold <= 0.65 and artifact.tiers[1].model == "big"
    assert artifact.parent == CONFIG and artifact.meta["report"]["decision"]["promote"]
    # the next refit starts from v0001, and finds nothing better
    again = refit_threshold(load_config(write_config(tmp_path, 0.1)), ROUTE, promote=True)
    assert again.current_version == "v0001" and not again.decision.promote and again.promoted is None
    assert store.versions(ROUTE) == ["v0001"]


def test_a_worse_candidate_and_too_few_labels_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    # older traffic was right above 0.3, newer traffic only above 0.7: a threshold fitted on the old part is
    # worse on the new part than the current 0.7
    write_ledger(tmp_path, 0.7, lambda i, s: s >= (0.3 if i < 170 else 0.7))
    config = load_config(write_config(tmp_path, 0.7))
    worse = refit_threshold(config, ROUTE)
    assert not worse.decision.promote and "above the target" in worse.decision.reason
    few = refit_threshold(config, ROUTE, min_test=10_000)
    assert not few.decision.promote and "not enough held-out labels" in few.decision.reason
    assert ArtifactStore(tmp_path / "artifacts").versions(ROUTE) == []
    runner = CliRunner()
    refused = runner.invoke(build(), ["cascade", "refit", "--from-ledger", "--route", ROUTE, "--config",
                                      str(tmp_path / "gateway.yaml")])
    assert refused.exit_code == 3, refused.output
    assert "refused" in refused.output
    assert decide(evaluate(np.ones(40), np.ones(40, bool), np.ones(40), 0.5),
                  evaluate(np.ones(40), np.ones(40, bool), np.ones(40), 0.5), 0.1, 30).promote is False


def test_a_retrained_judge_is_promoted_as_a_loadable_version_and_rolled_back(tmp_path: Path) -> None:
    # the current threshold (0.999) accepts almost nothing; the labels follow the features' mean_logprob
    write_ledger(tmp_path, 0.999, lambda i, s: s >= 0.5)
    path = write_config(tmp_path, 0.999, target=0.15)
    runner = CliRunner()
    done = runner.invoke(build(), ["judge", "retrain", "--from-ledger", "--route", ROUTE, "--config", str(path),
                                   "--keep-candidate", str(tmp_path / "candidate")])
    assert done.exit_code == 0, done.output
    assert "promoted" in done.output
    store = ArtifactStore(tmp_path / "artifacts")
    assert store.current(ROUTE) == "v0001"
    artifact = store.read(ROUTE, "v0001")
    folder = Path(artifact.tiers[0].judge)
    assert folder.is_relative_to(store.folder(ROUTE) / "v0001")
    retrained = LocalJudge(folder)  # its card and ONNX file agree, and it loads as the gateway would
    assert retrained.threshold == artifact.tiers[0].threshold and retrained.version != judge().version
    assert retrained.card["data"]["source"] == "ledger"
    assert LocalJudge(tmp_path / "candidate").version == retrained.version
    dry = runner.invoke(build(), ["cascade", "refit", "--from-ledger", "--dry-run", "--route", ROUTE, "--config",
                                  str(path)])
    # the retrained judge has scored no answer yet: there is nothing to refit its threshold on
    assert dry.exit_code == 2 and "scored by the current judge" in dry.output, dry.output
    assert store.versions(ROUTE) == ["v0001"]
    rolled = runner.invoke(build(), ["cascade", "rollback", "--route", ROUTE, "--config", str(path)])
    assert rolled.exit_code == 0 and store.current(ROUTE) == CONFIG
    listed = runner.invoke(build(), ["cascade", "versions", "--route", ROUTE, "--config", str(path), "--json"])
    assert '"current": "config"' in listed.output and listed.output.count('"version"') == 2


def pack_outcomes(tmp: Path, queries: int = 80) -> tuple[Path, Path]:
    """A graded multiple-choice pack (named as MMLU, which is graded by its gold letter) and the local model's
    cached answers to it, right on even queries, in `frugal judge build`'s format."""
    rows, outcomes = [], []
    for q in range(queries):
        query = f"Question {q}: which letter?\nA) one\nB) two\nC) three\nD) four\nAnswer:"
        split = "train" if q % 4 else "test"
        rows.append({"dataset": "zellinger_mmlu", "split": split, "query_id": f"p{q}", "query": query, "gold": "B",
                     "model": "m", "answer": "B", "correct": 1.0, "cost_usd": 1e-6, "input_tokens": 10,
                     "output_tokens": 1, "confidence": None})
        text = "B" if q % 2 == 0 else "C"
        logprob = -0.1 if q % 2 == 0 else -2.0
        outcomes.append({"dataset": "zellinger_mmlu", "query_id": f"p{q}", "split": split, "text": text,
                         "finish_reason": "stop", "tokens": [[text, logprob, [logprob, -3.0]]],
                         "samples": [text] * 4})
    pack = write_dataset(tmp / "zellinger_mmlu.jsonl.gz", rows)
    folder = tmp / "outcomes"
    folder.mkdir()
    (folder / "zellinger_mmlu.jsonl").write_text("".join(json.dumps(o) + "\n" for o in outcomes))
    return pack, folder


def test_a_retrain_can_mix_in_the_packs_graded_answers(tmp_path: Path) -> None:
    write_ledger(tmp_path, 0.999, lambda i, s: s >= 0.5)
    path = write_config(tmp_path, 0.999, target=0.15)
    pack, folder = pack_outcomes(tmp_path)
    outcome = retrain_judge(load_config(path), ROUTE, promote=False,
                            packs=PackOutcomes([load_grid(pack)], folder))
    assert outcome.data["pack_train_answers"] == 60  # the pack's train split only
    assert outcome.decision.candidate is not None and outcome.promoted is None
    assert ArtifactStore(tmp_path / "artifacts").versions(ROUTE) == []
    runner = CliRunner()
    alone = runner.invoke(build(), ["judge", "retrain", "--from-ledger", "--route", ROUTE, "--config", str(path),
                                    "--mix-outcomes", str(folder)])
    assert alone.exit_code == 2 and "go together" in alone.output


def test_one_wrong_answer_is_no_evidence_that_the_current_artifact_misses_its_target() -> None:
    n = 60
    good = np.ones(n, dtype=bool)
    good[0] = False
    weights = np.ones(n)
    scores = np.zeros(n)
    scores[0] = 0.9  # the current threshold accepts one answer, and it is wrong
    current = evaluate(scores, good, weights, 0.5)
    nothing = evaluate(scores, good, weights, 0.95)
    assert current.false_accept == 1.0 and current.above_target_low < 0.3
    refused = decide(current, nothing, 0.3, 30)
    assert not refused.promote and "not better" in refused.reason
    scores[:10] = 0.9
    good[:10] = False  # ten wrong in ten accepted is evidence
    assert decide(evaluate(scores, good, weights, 0.5), nothing, 0.3, 30).promote
