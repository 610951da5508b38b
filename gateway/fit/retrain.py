"""`frugal judge retrain --from-ledger` and `frugal cascade refit --from-ledger` (docs/learning.md).

Both read one judged tier's labelled answers from the ledger (`gateway.fit.ledger_data`), split them by time,
make a candidate on the older part, and compare it with the current artifact on the newer part
(`gateway.fit.promotion`). A promoted candidate becomes a new version in the artifact store, made current;
running gateways follow the store (or swap at once through the admin API).

- `retrain_judge`: a new judge (the learners of `scorer.fit.judge_build`, picked by out-of-fold AUROC) on
  the judge features the traces kept, its threshold chosen on out-of-fold scores at the route's target.
- `refit_threshold`: the same judge, a new threshold, on the scores the current judge gave (only answers it
  judged).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from gateway.artifacts import CONFIG, ArtifactStore, ArtifactTier
from gateway.fit.ledger_data import LabelledAnswer, labelled_answers
from gateway.fit.promotion import Decision, choose_threshold, decide, evaluate, time_split
from gateway.routes import price_order
from gateway.settings import FrugalConfig
from scorer.answers import TASK_KINDS
from scorer.fit.dataset import Grid
from scorer.fit.judge_build import LEARNERS, graded_outcomes, make_learner, mean_auroc, onnx_bytes, out_of_fold
from scorer.judge import CARD, MODEL, LocalJudge, packaged_judge, read_card
from scorer.signals import FEATURE_NAMES, Embed

#: A kind of query the candidate judge vouches for needs this many labelled train answers (or the current
#: judge vouched for it).
MIN_KIND_ROWS = 20
#: Train answers a candidate needs at least (of each label, 5).
MIN_TRAIN = 20


class RetrainError(ValueError):
    """Nothing can be trained or compared; the message says why."""


@dataclass
class Current:
    """What serves the route now: its version, every tier, and the judged tier's judge and threshold."""

    version: str
    tiers: list[ArtifactTier]
    model: str
    judge: LocalJudge
    threshold: float


@dataclass
class Outcome:
    route: str
    model: str
    kind: str
    decision: Decision
    current_version: str
    candidate: dict[str, Any] = field(default_factory=dict)
    promoted: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"route": self.route, "tier": self.model, "kind": self.kind, "current_version": self.current_version,
                "decision": self.decision.to_json(), "candidate": self.candidate, "promoted": self.promoted,
                "data": self.data}


def _judge_folder(judge: str, backend: str) -> Path | None:
    if judge == "none":
        return None
    if judge == "packaged":
        return packaged_judge(backend)
    return Path(judge)


def current_state(config: FrugalConfig, route_name: str, tier: str | None = None) -> tuple[ArtifactStore, Current]:
    """The route's current artifact (the store's current version, else the configuration's tiers) and its
    judged local tier (`tier`, else the first one with a judge)."""
    route = config.route(route_name)
    if route.kind != "cascade":
        raise RetrainError(f"route {route_name!r} is not a cascade")
    store = ArtifactStore(config.artifacts.dir)
    version = store.current(route_name)
    if version != CONFIG:
        tiers = store.read(route_name, version).tiers
    else:
        configured = route.tiers or price_order(route.models, config)
        tiers = [ArtifactTier(t.model, t.threshold, t.judge or "packaged") for t in configured]
    for index, candidate in enumerate(tiers[:-1]):
        if tier is not None and candidate.model != tier:
            continue
        model = config.model(candidate.model)
        folder = _judge_folder(candidate.judge, model.backend) if model.is_local or candidate.judge not in (
            "packaged", "none") else None
        if folder is None:
            continue
        judge = LocalJudge(folder)
        threshold = candidate.threshold if candidate.threshold is not None else judge.threshold
        tiers[index] = ArtifactTier(candidate.model, threshold, candidate.judge)
        return store, Current(version, tiers, candidate.model, judge, threshold)
    raise RetrainError(f"route {route_name!r} has no judged tier" + (f" {tier}" if tier else ""))


def _arrays(answers: list[LabelledAnswer], rows: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x = np.vstack([answers[i].features for i in rows]) if rows else np.zeros((0, len(FEATURE_NAMES)), np.float32)
    good = np.array([answers[i].good for i in rows], dtype=bool)
    weights = np.array([answers[i].weight for i in rows], dtype=float)
    groups = np.array([answers[i].group for i in rows])
    return x, good, weights, groups


def _kinds_of(x: np.ndarray) -> np.ndarray:
    first = FEATURE_NAMES.index(f"kind_{TASK_KINDS[0]}")
    return np.array([TASK_KINDS[int(np.argmax(row[first:first + len(TASK_KINDS)]))] for row in x])


def _finish(config: FrugalConfig, store: ArtifactStore, current: Current, route: str, kind: str, decision: Decision,
            candidate_tier: ArtifactTier, candidate: dict[str, Any], data: dict[str, Any], *, promote: bool,
            judge_folder: Path | None = None) -> Outcome:
    outcome = Outcome(route, current.model, kind, decision, current.version, candidate, data=data)
    if decision.promote and promote:
        tiers = [candidate_tier if t.model == current.model else t for t in current.tiers]
        report = {"made_by": f"frugal {kind}", "from": "ledger", **outcome.to_json()}
        artifact = store.new_version(route, tiers, parent=current.version, meta={"report": report},
                                     judges={current.model: judge_folder} if judge_folder else None)
        store.set_current(route, artifact.version, f"{kind}: {decision.reason}")
        outcome.promoted = artifact.version
    return outcome


def _load(config: FrugalConfig, route: str, tier: str | None, since: datetime | None,
          ) -> tuple[ArtifactStore, Current, list[LabelledAnswer]]:
    store, current = current_state(config, route, tier)
    answers = labelled_answers(config.ledger.url, route, current.model, since)
    if not answers:
        raise RetrainError(f"no labelled answers of {current.model} on route {route!r} in the ledger "
                           f"{config.ledger.url} (labels come from POST /v1/feedback and, with "
                           "ledger.store_content, from audits and escalations)")
    return store, current, answers


def refit_threshold(config: FrugalConfig, route: str, *, tier: str | None = None, since: datetime | None = None,
                    test_share: float = 0.3, min_test: int = 30, promote: bool = True) -> Outcome:
    """A new threshold for the current judge (only answers that judge scored)."""
    store, current, answers = _load(config, route, tier, since)
    answers = [a for a in answers if a.judge == current.judge.version and a.score is not None]
    if not answers:
        raise RetrainError(f"no labelled answers scored by the current judge ({current.judge.version})")
    target = config.route(route).learning.target_false_accept
    train, test = time_split(answers, test_share)
    scores = np.array([a.score for a in answers], dtype=float)
    _, good, weights, _ = _arrays(answers, list(range(len(answers))))
    if not train:
        raise RetrainError("no labelled answers left to fit on")
    threshold = choose_threshold(scores[train], good[train], weights[train], target)
    decision = decide(evaluate(scores[test], good[test], weights[test], current.threshold),
                      evaluate(scores[test], good[test], weights[test], threshold), target, min_test)
    if decision.promote and abs(threshold - current.threshold) < 1e-9:
        decision = Decision(False, "the refitted threshold is the current one", decision.current, decision.candidate)
    data = {"labelled": len(answers), "train": len(train), "test": len(test), "target_false_accept": target}
    current_tier = next(t for t in current.tiers if t.model == current.model)
    return _finish(config, store, current, route, "cascade refit", decision,
                   ArtifactTier(current.model, round(threshold, 6), current_tier.judge),
                   {"threshold": round(threshold, 6), "current_threshold": round(current.threshold, 6)}, data,
                   promote=promote)


@dataclass(frozen=True)
class PackOutcomes:
    """The local model's graded answers to data pack queries (`frugal judge build`'s cache), mixed into the
    training rows: their `train` split only (the held-out part is the ledger's own newer traffic)."""

    grids: list[Grid]
    folder: Path
    embed: Embed | None = None


def _pack_rows(packs: PackOutcomes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        outcomes = graded_outcomes(packs.grids, packs.folder, packs.embed)
    except ValueError as exc:
        raise RetrainError(str(exc)) from exc
    train = outcomes.mask("train")
    return outcomes.x[train].astype(np.float32), outcomes.y[train] >= 0.5, outcomes.groups[train]


def retrain_judge(config: FrugalConfig, route: str, *, tier: str | None = None, since: datetime | None = None,
                  test_share: float = 0.3, min_test: int = 30, promote: bool = True,
                  packs: PackOutcomes | None = None, keep: Path | None = None) -> Outcome:
    """A new judge trained on the labelled answers' features (and, with `packs`, the packs' graded train
    answers), compared with the current judge on the newer labelled answers. `keep`: also copy the candidate
    judge there, promoted or not (to inspect it)."""
    store, current, answers = _load(config, route, tier, since)
    target = config.route(route).learning.target_false_accept
    train, test = time_split(answers, test_share)
    x, good, weights, groups = _arrays(answers, train)
    pack_answers = 0
    if packs is not None:
        px, pgood, pgroups = _pack_rows(packs)
        pack_answers = len(pgood)
        x, good = np.vstack([x, px]), np.concatenate([good, pgood])
        weights, groups = np.concatenate([weights, np.ones(len(pgood))]), np.concatenate([groups, pgroups])
    if len(good) < MIN_TRAIN or good.sum() < 5 or (~good).sum() < 5:
        raise RetrainError(f"too few labelled answers to train on: {len(good)} ({int(good.sum())} good, "
                           f"{int((~good).sum())} bad; need {MIN_TRAIN}, and 5 of each)")
    y = good.astype(float)
    kinds = _kinds_of(x)
    oofs = {name: out_of_fold(x, y, groups, name) for name in LEARNERS}
    choice = {name: mean_auroc(oof, y, kinds) for name, oof in oofs.items()}
    chosen = max(LEARNERS, key=lambda name: (round(choice[name], 6), name))
    vouched = sorted(set(current.judge.kinds) | {k for k in TASK_KINDS if int((kinds == k).sum()) >= MIN_KIND_ROWS})
    oof = np.where(np.isin(kinds, vouched), oofs[chosen], 0.0)
    threshold = choose_threshold(oof, good, weights, target)
    learner = make_learner(chosen).fit(x, y)
    folder = Path(tempfile.mkdtemp(prefix="frugal-judge-"))
    try:
        blob = onnx_bytes(learner, len(FEATURE_NAMES))
        (folder / MODEL).write_bytes(blob)
        card = dict(read_card(current.judge.folder))
        for stale in ("test", "train_out_of_fold", "data", "learner", "threshold_rule"):
            card.pop(stale, None)
        card.update({
            "learner": {"name": chosen, **LEARNERS[chosen], "chosen_by": "mean per-kind AUROC of out-of-fold scores",
                        "out_of_fold_auroc": {k: round(v, 4) for k, v in choice.items()}},
            "kinds": vouched,
            "threshold": round(threshold, 6),
            "threshold_rule": f"the largest weighted accept share whose weighted false-accept rate is at most "
                              f"{target} on out-of-fold scores (route {route})",
            "target_false_accept": target,
            "data": {"source": "ledger" + (" and data packs" if pack_answers else ""), "route": route,
                     "since": since.isoformat() if since else None, "ledger_train_answers": len(train),
                     "pack_train_answers": pack_answers, "parent_judge": current.judge.version},
            "onnx_sha256": hashlib.sha256(blob).hexdigest(),
        })
        (folder / CARD).write_text(json.dumps(card, indent=2) + "\n")
        candidate_judge = LocalJudge(folder)
        if keep is not None:
            shutil.copytree(folder, keep, dirs_exist_ok=True)
        x_test, good_test, weights_test, _ = _arrays(answers, test)
        current_scores = np.array(current.judge.score_features(x_test)) if test else np.zeros(0)
        candidate_scores = np.array(candidate_judge.score_features(x_test)) if test else np.zeros(0)
        decision = decide(evaluate(current_scores, good_test, weights_test, current.threshold),
                          evaluate(candidate_scores, good_test, weights_test, candidate_judge.threshold),
                          target, min_test)
        data = {"labelled": len(answers), "train": len(train), "test": len(test), "target_false_accept": target,
                "pack_train_answers": pack_answers}
        return _finish(config, store, current, route, "judge retrain", decision,
                       ArtifactTier(current.model, round(threshold, 6), "packaged"),
                       {"judge": candidate_judge.version, "learner": chosen, "threshold": round(threshold, 6),
                        "kinds": vouched, "out_of_fold_auroc": round(choice[chosen], 4)}, data,
                       promote=promote, judge_folder=folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
