"""Fitting the semantic cache's match verifier (`gateway.cache.verifier`): gradient-boosted trees over the
verifier's pair features, exported as plain numbers that the serving path evaluates without scikit-learn."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from gateway.cache.verifier import FEATURES, MIN_SIMILARITY

#: The learner's settings (scikit-learn's HistGradientBoostingClassifier), chosen by the cross-validated
#: false-hit floor on the fit part.
TREES = {"max_iter": 60, "learning_rate": 0.1, "max_leaf_nodes": 7, "min_samples_leaf": 40}
FOLDS = 5


def fit(rows: np.ndarray, duplicate: np.ndarray, groups: np.ndarray, extra_rows: np.ndarray | None = None,
        extra_duplicate: np.ndarray | None = None, folds: int = FOLDS) -> tuple[dict[str, Any], np.ndarray]:
    """Fit the trees on `rows` (features of pairs at or above `MIN_SIMILARITY`) and `extra_rows` (pairs of
    other sets, always in training). Returns the exported model and out-of-fold probabilities of `rows`
    (folds by `groups`, so that no text is on both sides of a fold), from which the threshold is chosen
    without scoring a pair with a model that saw it."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import GroupKFold

    extra_x = extra_rows if extra_rows is not None else np.zeros((0, rows.shape[1]))
    extra_y = extra_duplicate if extra_duplicate is not None else np.zeros(0, dtype=bool)

    def fitted(x: np.ndarray, y: np.ndarray) -> HistGradientBoostingClassifier:
        return HistGradientBoostingClassifier(**TREES, random_state=0).fit(np.vstack([x, extra_x]),
                                                                          np.concatenate([y, extra_y]))

    out_of_fold = np.zeros(len(rows))
    for train, test in GroupKFold(folds).split(rows, duplicate, groups):
        out_of_fold[test] = fitted(rows[train], duplicate[train]).predict_proba(rows[test])[:, 1]
    return export(fitted(rows, duplicate)), out_of_fold


def export(model: Any) -> dict[str, Any]:
    """A fitted HistGradientBoostingClassifier as plain numbers (binary, numeric features, no missing values)."""
    trees = [[[int(n["feature_idx"]), float(n["num_threshold"]), int(n["left"]), int(n["right"]),
               float(n["value"]), int(n["is_leaf"])] for n in predictors[0].nodes]
             for predictors in model._predictors]
    return {"features": list(FEATURES), "min_similarity": MIN_SIMILARITY, "learner": TREES,
            "baseline": float(model._baseline_prediction.ravel()[0]), "trees": trees}


def write_verifier(model: dict[str, Any], path: Path) -> None:
    """Write an exported model where the serving path reads it (`gateway/cache/verifier.json` is the shipped
    one), with the command that makes it."""
    path.write_text(json.dumps(model | {"command": "frugal cache calibrate --verifier-out "
                                                   "gateway/cache/verifier.json"}) + "\n")
