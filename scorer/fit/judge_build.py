"""Building a local model's judge from its own graded outcomes (`frugal judge build`, docs/cascade.md).

1. Outcomes: the local model's answers to the pack queries (`scorer.fit.outcomes`, cached), graded
   (`scorer.fit.grading`).
2. Features: `scorer.signals.features` of every answer, as the gateway computes them.
3. Learner: of `LEARNERS` (gradient-boosted trees of two depths, a logistic regression), the one whose
   out-of-fold scores on train (query-grouped folds: a question asked twice never sits on both sides) rank
   best, averaged over the datasets; trained on the whole `train` split. Its out-of-fold scores choose the
   threshold: the lowest score whose accepted-and-wrong answers stay within `target_false_accept` of all
   train queries.
4. Report on `test`: per task, the judge's AUROC against the plain mean token log-prob's, and the share of
   queries accepted and falsely accepted at the threshold; which signals earn their cost (the same learner
   without the samples, and with fewer of them).
5. Export: `judge.onnx` and the card `judge.json`. Nothing in them depends on the time or the machine: the
   same outcomes build the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scorer.answers import TASK_KINDS, normalize, task_kind
from scorer.fit.dataset import Grid
from scorer.fit.grading import GRADED, golds, grade
from scorer.fit.outcomes import chosen_queries, read_outcomes
from scorer.fit.quality import auroc
from scorer.fit.train import grouped_folds
from scorer.judge import CARD, FORMAT, MODEL
from scorer.signals import FEATURE_NAMES, SIGNALS_VERSION, AnswerSignals, Embed, JudgeSettings, features

#: The learners tried (scikit-learn, all exportable to ONNX); the one with the best out-of-fold AUROC on
#: train, averaged over the datasets, is kept.
LEARNERS: dict[str, dict[str, Any]] = {
    "boosting-depth3": {"kind": "GradientBoostingClassifier", "n_estimators": 150, "max_depth": 3,
                        "learning_rate": 0.05, "subsample": 0.8, "min_samples_leaf": 20, "random_state": 0},
    "boosting-depth2": {"kind": "GradientBoostingClassifier", "n_estimators": 80, "max_depth": 2,
                        "learning_rate": 0.05, "subsample": 0.8, "min_samples_leaf": 20, "random_state": 0},
    "logistic": {"kind": "LogisticRegression", "C": 0.3, "max_iter": 2000},
}
FOLDS = 5
#: A task kind needs this many graded train outcomes for the judge to vouch for it; answers to queries of
#: other kinds are never accepted (they escalate).
MIN_KIND_ROWS = 40


@dataclass
class Outcomes:
    """Graded outcomes of one local model: features and labels, with where each came from."""

    datasets: np.ndarray
    splits: np.ndarray
    kinds: np.ndarray
    groups: np.ndarray
    x: np.ndarray
    #: The same features without the samples, and with only the first two of them (for the ablation).
    x_no_samples: np.ndarray
    x_two_samples: np.ndarray
    y: np.ndarray
    digest: str
    #: Each outcome's row in its dataset's grid (to join with the pack's recorded answers of other models).
    rows: np.ndarray | None = None

    def mask(self, split: str) -> np.ndarray:
        return self.splits == split


def signals_of(row: dict[str, Any], samples: int | None = None) -> AnswerSignals:
    tokens = row.get("tokens") or []
    kept = row.get("samples") or []
    return AnswerSignals(row["text"], row.get("finish_reason"), [t[1] for t in tokens], [t[2] for t in tokens],
                         tuple(kept if samples is None else kept[:samples]))


def graded_outcomes(grids: Sequence[Grid], folder: Path, embed: Embed | None = None,
                    per_split: int | None = None) -> Outcomes:
    """The cached outcomes of `folder` for the graded datasets among `grids` (only the queries
    `chosen_queries(grid, per_split)` picks, so a larger cache builds the same judge), featurized and graded."""
    cols: dict[str, list[Any]] = {k: [] for k in ("datasets", "splits", "kinds", "groups", "x", "x0", "x2", "y",
                                                  "rows")}
    digest = hashlib.sha256()
    for grid in sorted(grids, key=lambda g: g.name):  # the order of --data never changes the judge
        if grid.name not in GRADED:
            continue
        rows = read_outcomes(folder / f"{grid.name}.jsonl")
        gold = golds(grid)
        for q in sorted(chosen_queries(grid, per_split)):
            qid = grid.query_ids[q]
            row = rows.get(qid)
            if row is None or gold[q] is None:
                continue
            query = grid.queries[q]
            signals = signals_of(row)
            digest.update(json.dumps([grid.name, qid, row["text"], row["tokens"], row["samples"]]).encode())
            cols["datasets"].append(grid.name)
            cols["splits"].append(row["split"])
            cols["kinds"].append(task_kind(query))
            cols["groups"].append(f"{grid.name}:{normalize(query)}")
            cols["x"].append(features(query, signals, embed))
            cols["x0"].append(features(query, signals, embed, use_samples=False))
            cols["x2"].append(features(query, signals_of(row, 2), embed))
            cols["y"].append(float(grade(grid.name, query, row["text"], gold[q])))
            cols["rows"].append(q)
    if not cols["y"]:
        raise ValueError(f"no graded outcomes in {folder}: run the local model on the pack first")
    return Outcomes(np.array(cols["datasets"]), np.array(cols["splits"]), np.array(cols["kinds"]),
                    np.array(cols["groups"]), np.vstack(cols["x"]), np.vstack(cols["x0"]), np.vstack(cols["x2"]),
                    np.array(cols["y"]), digest.hexdigest(), np.array(cols["rows"]))


def make_learner(name: str) -> Any:
    """A fresh learner of `LEARNERS` (logistic regression on standardised features)."""
    from sklearn.ensemble import GradientBoostingClassifier  # noqa: PLC0415
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415
    from sklearn.pipeline import make_pipeline  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    settings = dict(LEARNERS[name])
    kind = settings.pop("kind")
    if kind == "LogisticRegression":
        return make_pipeline(StandardScaler(), LogisticRegression(**settings))
    return GradientBoostingClassifier(**settings)


def out_of_fold(x: np.ndarray, y: np.ndarray, groups: np.ndarray, learner: str) -> np.ndarray:
    """Each train row scored by a learner fitted on the folds that do not hold its query."""
    scores = np.zeros(len(y))
    for train, held in grouped_folds(groups, FOLDS, seed=0):
        scores[held] = make_learner(learner).fit(x[train], y[train]).predict_proba(x[held])[:, 1]
    return scores


def mean_auroc(scores: np.ndarray, y: np.ndarray, datasets: np.ndarray) -> float:
    """AUROC averaged over the datasets (each counts the same, whatever its size)."""
    values = [auroc(scores[datasets == d], y[datasets == d]) for d in sorted(set(datasets))]
    found = [v for v in values if v is not None]
    return float(np.mean(found)) if found else 0.5


def choose_threshold(scores: np.ndarray, y: np.ndarray, target: float) -> float:
    """The lowest threshold at which answers scoring at or above it and wrong are at most `target` of all."""
    order = np.argsort(-scores, kind="stable")
    false_accepts = np.cumsum(1 - y[order]) / len(y)
    ok = np.flatnonzero(false_accepts <= target)
    if not ok.size:
        return 1.0
    last = ok[-1]
    # stop before a tie that would cross the target
    while last > 0 and scores[order[last]] == scores[order[min(last + 1, len(order) - 1)]] and last + 1 < len(order) \
            and false_accepts[last + 1] > target:
        last -= 1
    return float(scores[order[last]])


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def task_report(outcomes: Outcomes, judge_scores: np.ndarray, threshold: float, rows: np.ndarray,
                by: np.ndarray, ablations: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per group (dataset or kind) on `rows`: accuracy, AUROCs, acceptance and false accepts."""
    baseline = outcomes.x[:, FEATURE_NAMES.index("mean_logprob")]
    report: dict[str, Any] = {}
    for name in [*sorted(set(by[rows])), "all"]:
        sel = rows & (by == name) if name != "all" else rows
        y, s = outcomes.y[sel], judge_scores[sel]
        accepted = s >= threshold
        judge_auc, base_auc = auroc(s, y), auroc(baseline[sel], y)
        report[name] = {
            "queries": int(sel.sum()),
            "local_accuracy": _round(y.mean()),
            "auroc_judge": _round(judge_auc),
            "auroc_mean_logprob": _round(base_auc),
            "auroc_margin": _round(judge_auc - base_auc) if judge_auc is not None and base_auc is not None else None,
            **{f"auroc_{k}": _round(auroc(v[sel], y)) for k, v in ablations.items()},
            "accepted_share": _round(accepted.mean()),
            "false_accept_share": _round((accepted & (y < 0.5)).mean()),
            "accepted_accuracy": _round(y[accepted].mean()) if accepted.any() else None,
        }
    return report


def onnx_bytes(learner: Any, n_features: int) -> bytes:
    from skl2onnx import to_onnx  # noqa: PLC0415

    model = to_onnx(learner, np.zeros((1, n_features), dtype=np.float32), options={"zipmap": False},
                    target_opset={"": 17, "ai.onnx.ml": 3})
    model.doc_string = ""
    model.producer_version = ""
    return model.SerializeToString()


def build(outcomes: Outcomes, out: Path, *, model: str, settings: JudgeSettings, target_false_accept: float,
          data: dict[str, Any]) -> dict[str, Any]:
    """Train on `train`, report on `test`, write `out/judge.onnx` and `out/judge.json`; returns the card."""
    train, test = outcomes.mask("train"), outcomes.mask("test")
    counts = {k: int((outcomes.kinds[train] == k).sum()) for k in TASK_KINDS}
    kinds = [k for k in TASK_KINDS if counts[k] >= MIN_KIND_ROWS]
    oofs = {name: out_of_fold(outcomes.x[train], outcomes.y[train], outcomes.groups[train], name) for name in LEARNERS}
    choice = {name: mean_auroc(oof, outcomes.y[train], outcomes.datasets[train]) for name, oof in oofs.items()}
    chosen = max(LEARNERS, key=lambda name: (round(choice[name], 6), name))
    oof = oofs[chosen]
    vouched = np.isin(outcomes.kinds[train], kinds)
    oof = np.where(vouched, oof, 0.0)
    threshold = choose_threshold(oof, outcomes.y[train], target_false_accept)
    learner = make_learner(chosen).fit(outcomes.x[train], outcomes.y[train])
    scores = learner.predict_proba(outcomes.x)[:, 1]
    scores = np.where(np.isin(outcomes.kinds, kinds), scores, 0.0)
    ablations = {
        "no_samples": make_learner(chosen).fit(outcomes.x_no_samples[train], outcomes.y[train])
        .predict_proba(outcomes.x_no_samples)[:, 1],
        "two_samples": make_learner(chosen).fit(outcomes.x_two_samples[train], outcomes.y[train])
        .predict_proba(outcomes.x_two_samples)[:, 1],
    }
    blob = onnx_bytes(learner, len(FEATURE_NAMES))
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL).write_bytes(blob)
    card = {
        "format": FORMAT,
        "version": 1,
        "model": model,
        "signals_version": SIGNALS_VERSION,
        "features": list(FEATURE_NAMES),
        "settings": settings.to_json(),
        "learner": {"name": chosen, **LEARNERS[chosen],
                    "chosen_by": "mean per-dataset AUROC of out-of-fold scores on train",
                    "out_of_fold_auroc": {name: round(value, 4) for name, value in choice.items()}},
        "kinds": kinds,
        "threshold": round(threshold, 6),
        "threshold_rule": f"lowest score whose accepted-and-wrong answers are at most {target_false_accept:.1%} of "
                          f"train queries, on out-of-fold scores ({FOLDS} query-grouped folds)",
        "target_false_accept": target_false_accept,
        "data": {**data, "outcomes_sha256": outcomes.digest,
                 "graded": {s: int(outcomes.mask(s).sum()) for s in ("train", "test")},
                 "train_rows_by_kind": counts},
        "test": {"by_dataset": task_report(outcomes, scores, threshold, test, outcomes.datasets, ablations),
                 "by_kind": task_report(outcomes, scores, threshold, test, outcomes.kinds, ablations)},
        "train_out_of_fold": task_report(
            _restrict(outcomes, train), oof, threshold, np.ones(int(train.sum()), dtype=bool),
            outcomes.datasets[train], {})["all"],
        "onnx_sha256": hashlib.sha256(blob).hexdigest(),
    }
    (out / CARD).write_text(json.dumps(card, indent=2) + "\n")
    return card


def _restrict(outcomes: Outcomes, rows: np.ndarray) -> Outcomes:
    return Outcomes(outcomes.datasets[rows], outcomes.splits[rows], outcomes.kinds[rows], outcomes.groups[rows],
                    outcomes.x[rows], outcomes.x_no_samples[rows], outcomes.x_two_samples[rows], outcomes.y[rows],
                    outcomes.digest, None if outcomes.rows is None else outcomes.rows[rows])
