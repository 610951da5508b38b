"""How good a scorer's probabilities are, per model: AUROC (ranking), Brier score and expected calibration
error (calibration), the reliability table behind it, and the report of `frugal scorer eval`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from scorer.fit.dataset import Grid
from scorer.fit.grid_scores import score_grid

if TYPE_CHECKING:
    from scorer.runtime import OnnxScorer


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve; None when only one class is present."""
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415

    if labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, scores))


def reliability(scores: np.ndarray, labels: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Per equal-width probability bin: how many answers, mean predicted P(correct), observed accuracy."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    table = []
    for b in range(bins):
        mask = which == b
        if mask.any():
            table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(mask.sum()),
                          "predicted": float(scores[mask].mean()), "observed": float(labels[mask].mean())})
    return table


def quality(scores: np.ndarray, correct: np.ndarray, models: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per model (columns of `scores` and `correct`): AUROC, Brier, ECE, base rate, reliability table."""
    out: dict[str, dict[str, Any]] = {}
    for j, model in enumerate(models):
        s, y = scores[:, j].astype(np.float64), correct[:, j]
        table = reliability(s, y)
        ece = sum(row["n"] * abs(row["predicted"] - row["observed"]) for row in table) / len(s)
        value = auroc(s, y)
        out[model] = {"auroc": None if value is None else round(value, 4),
                      "brier": round(float(np.mean((s - y) ** 2)), 4), "ece": round(float(ece), 4),
                      "accuracy": round(float(y.mean()), 4), "n": len(s),
                      "reliability": [{k: round(v, 4) for k, v in row.items()} for row in table]}
    return out


def scorer_report(loaded: OnnxScorer, grid: Grid, split: str) -> dict[str, Any]:
    """`frugal scorer eval`: the saved scorer's quality per model on a split (first-tier scoring), with the
    AUROC of each model's own confidence over the answers that have one (what the scorer should match)."""
    part = grid.split(split).with_models([m for m in grid.models if loaded.knows(m)])
    scores = score_grid(loaded, loaded.spec, part)
    report: dict[str, Any] = {"dataset": grid.name, "split": split, "queries": len(part),
                              "models": quality(scores.first, part.correct, part.models)}
    for j, model in enumerate(part.models):
        has = ~np.isnan(part.confidence[:, j])
        own = auroc(part.confidence[has, j], part.correct[has, j]) if has.sum() > 1 else None
        report["models"][model]["confidence_auroc"] = None if own is None else round(own, 4)
        report["models"][model]["with_confidence"] = int(has.sum())
    return report
