"""Training a scorer: P(answer is correct | query, answer, model, earlier tiers' answers).

One calibrated scikit-learn learner per model (`per-model`) or one for all (`pooled`): logistic regression
or gradient-boosted trees. Probabilities are calibrated with Platt scaling
fitted on held-out folds (`CalibratedClassifierCV(method="sigmoid", cv=3)`): isotonic calibration does
not survive the ONNX export exactly, Platt scaling does (checked by the tests).

Each training query gives every model two rows: the answer judged alone (the first tier of a cascade)
and the answer judged after one other model's answer (a later tier), the other model drawn at random.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from scorer.dataset import Grid
from scorer.features import FeatureSpec
from scorer.vectors import Layout, after, first_tier_features, learner_input, normalized_answers

Learner = Literal["logistic", "boosting"]
LEARNERS: tuple[str, ...] = ("logistic", "boosting")


@dataclass(frozen=True)
class TrainConfig:
    learner: Learner = "boosting"
    layout: Layout = "per-model"
    spec: FeatureSpec = field(default_factory=FeatureSpec)
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"learner": self.learner, "layout": self.layout, "spec": self.spec.to_json(), "seed": self.seed}


def make_estimator(learner: Learner, seed: int) -> Any:
    """A fresh calibrated scikit-learn classifier."""
    from sklearn.calibration import CalibratedClassifierCV  # noqa: PLC0415
    from sklearn.ensemble import GradientBoostingClassifier  # noqa: PLC0415
    from sklearn.linear_model import LogisticRegressionCV  # noqa: PLC0415

    if learner == "logistic":
        # No StandardScaler in front: skl2onnx 1.20 exports a scaler pipeline inside
        # CalibratedClassifierCV wrongly (probabilities off by up to 0.5, measured); the features are
        # already on comparable scales (hashed groups L2-normalised, signals logs and flags).
        # The regularisation is chosen per model by 3-fold log-loss on the training rows: the best fixed
        # C differed by dataset (out-of-fold AUROC on train, docs/scorer.md).
        base: Any = LogisticRegressionCV(Cs=[0.1, 1.0, 10.0], cv=3, scoring="neg_log_loss", max_iter=3000,
                                         l1_ratios=(0.0,), use_legacy_attributes=False)
    elif learner == "boosting":
        base = GradientBoostingClassifier(n_estimators=120, max_depth=3, learning_rate=0.08, subsample=0.8,
                                          max_features="sqrt", random_state=seed)
    else:
        raise ValueError(f"learner must be one of {', '.join(LEARNERS)}, not {learner!r}")
    return CalibratedClassifierCV(base, method="sigmoid", cv=3)


@dataclass
class TrainedScorer:
    """scikit-learn learners, ready to predict or to export (`scorer.export`)."""

    config: TrainConfig
    models: tuple[str, ...]
    #: Accuracy of each model on the training queries (a feature of later tiers: how good the previous was).
    accuracies: dict[str, float]
    uses_confidence: dict[str, bool]
    #: model -> fitted estimator, or a constant probability when the model was always right (or wrong).
    learners: dict[str, Any]
    #: The pooled learner (layout "pooled"), else None.
    pooled: Any = None

    def train_accuracy(self, model: str) -> float:
        return self.accuracies.get(model, 0.5)

    def predict(self, model: str, features: np.ndarray) -> np.ndarray:
        """P(correct) for rows of features (N, spec.size) of `model`'s answers."""
        j = self.models.index(model)
        constant = self.learners.get(model)
        if isinstance(constant, float):
            return np.full(features.shape[0], constant)
        estimator = self.pooled if self.config.layout == "pooled" else constant
        x = learner_input(self.config.layout, features, j, len(self.models))
        return estimator.predict_proba(x)[:, 1]


def training_rows(grid: Grid, config: TrainConfig, accuracy: np.ndarray,
                  rng: np.random.Generator) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per model index: (features, labels), two rows per query (alone, after one other model)."""
    norm = normalized_answers(grid)
    n_models = len(grid.models)
    rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for j in range(n_models):
        alone = first_tier_features(config.spec, grid, j)
        labels = grid.correct[:, j]
        if n_models > 1:
            others = rng.integers(0, n_models - 1, size=len(grid))
            others = others + (others >= j)  # any model but j
            agrees = norm[np.arange(len(grid)), others] == norm[:, j]
            later = after(alone, agrees, accuracy[others])
            rows[j] = (np.vstack([alone, later]), np.concatenate([labels, labels]))
        else:
            rows[j] = (alone, labels)
    return rows


def fit(grid: Grid, config: TrainConfig = TrainConfig(),
        progress: Callable[[str], None] | None = None) -> TrainedScorer:
    """Train on every query of `grid` (pass the train split)."""
    from sklearn.exceptions import ConvergenceWarning  # noqa: PLC0415
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    accuracy = np.nanmean(grid.correct, axis=0)
    rows = training_rows(grid, config, accuracy, np.random.default_rng(config.seed))
    learners: dict[str, Any] = {}
    pooled = None
    # One thread: the learners are small, and OpenMP threads fighting over two cores cost 30x (measured).
    # A C that does not converge in the inner search is simply not chosen: its warning is noise here.
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if config.layout == "pooled":
            xs, ys = [], []
            for j, (x, y) in rows.items():
                xs.append(learner_input("pooled", x, j, len(grid.models)))
                ys.append(y)
            pooled = make_estimator(config.learner, config.seed).fit(np.vstack(xs), np.concatenate(ys))
        for j, model in enumerate(grid.models):
            x, y = rows[j]
            if np.all(y == y[0]):
                learners[model] = float(y[0])
            elif config.layout == "per-model":
                if progress:
                    progress(f"{model}: {len(y)} rows")
                learners[model] = make_estimator(config.learner, config.seed).fit(x, y)
            else:
                learners[model] = None
    return TrainedScorer(config=config, models=grid.models,
                         accuracies={m: float(a) for m, a in zip(grid.models, accuracy, strict=True)},
                         uses_confidence=grid.has_confidence(), learners=learners, pooled=pooled)
