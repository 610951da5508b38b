"""Training a scorer: P(answer is correct | query, answer, model, earlier tiers' answers).

One calibrated scikit-learn learner per model (`per-model`) or one for all (`pooled`): logistic regression
or gradient-boosted trees. Probabilities are calibrated with Platt scaling
fitted on held-out folds (`CalibratedClassifierCV(method="sigmoid")`): isotonic calibration does
not survive the ONNX export exactly, Platt scaling does (checked by the tests).

Each training query gives every model two rows: the answer judged alone (the first tier of a cascade)
and the answer judged after one other model's answer (a later tier), the other model drawn at random.
Every fold used in training (the choice of features and regularisation, the calibration) therefore holds
out whole queries: with both rows of a query on both sides of a split, a model that memorises the query's
text looks good on its own training data.

A logistic learner chooses, per model, its features (all of them, or only the signals: the confidence,
the answer's form and the agreement with earlier tiers, without the hashed text) and its L2 strength, by
the log-loss of query-grouped folds. Hashed text helps where answers carry no confidence and fits noise
where they do: on the Zellinger sets the signals alone ranked answers better on test than the text-fed
learner (docs/scorer.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from scorer.features import SIGNALS, FeatureSpec
from scorer.fit.dataset import Grid
from scorer.fit.grid_features import after, first_tier_features, normalized_answers
from scorer.vectors import Layout, learner_input

Learner = Literal["logistic", "boosting"]
LEARNERS: tuple[str, ...] = ("logistic", "boosting")
#: Feature sets a logistic learner chooses from: every feature, or the signals without the hashed text.
FEATURE_SETS: tuple[str, ...] = ("all", "signals")
#: L2 strengths a logistic learner chooses from.
C_GRID: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
#: Query-grouped folds for the choices and for the calibration.
FOLDS = 3


@dataclass(frozen=True)
class TrainConfig:
    learner: Learner = "logistic"
    layout: Layout = "per-model"
    spec: FeatureSpec = field(default_factory=FeatureSpec)
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"learner": self.learner, "layout": self.layout, "spec": self.spec.to_json(), "seed": self.seed}


def grouped_folds(groups: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) row indices of `folds` splits that never put rows of one group on both sides."""
    unique = np.unique(groups)
    fold_of = np.random.default_rng(seed).permutation(len(unique)) % folds
    assigned = fold_of[np.searchsorted(unique, groups)]
    return [(np.flatnonzero(assigned != k), np.flatnonzero(assigned == k)) for k in range(folds)]


def text_mask(n_columns: int, features: int) -> np.ndarray:
    """Columns of the hashed query and answer text in a learner input of `n_columns`: after the signals, up
    to the end of the `features`-long feature vector (a pooled input's model code and crossed signals
    follow it and are kept)."""
    mask = np.zeros(n_columns, dtype=bool)
    mask[len(SIGNALS):features] = True
    return mask


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def choose_logistic(x: np.ndarray, y: np.ndarray, text: np.ndarray,
                    splits: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """The feature set and C of `C_GRID` with the lowest held-out log-loss over `splits` (ties: the simpler,
    i.e. the signals and the smaller C): {"features", "C", "cv_log_loss"}."""
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    best: dict[str, Any] | None = None
    for features in reversed(FEATURE_SETS):  # signals first: the simpler one wins a tie
        xs = _masked(x, text) if features == "signals" else x
        for c in C_GRID:
            losses = []
            for train, held in splits:
                if len(np.unique(y[train])) < 2:
                    losses.append(_log_loss(y[held], np.full(len(held), y[train].mean())))
                    continue
                model = LogisticRegression(C=c, max_iter=3000).fit(xs[train], y[train])
                losses.append(_log_loss(y[held], model.predict_proba(xs[held])[:, 1]))
            loss = float(np.mean(losses))
            if best is None or loss < best["cv_log_loss"] - 1e-12:
                best = {"features": features, "C": c, "cv_log_loss": round(loss, 6)}
    assert best is not None
    return best


def _masked(x: np.ndarray, columns: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[:, columns] = 0.0
    return out


def fit_estimator(learner: Learner, x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int,
                  features: int) -> tuple[Any, dict[str, Any]]:
    """A fitted calibrated scikit-learn classifier for rows `x` (query `groups`; the first `features` columns
    are the feature vector), and what was chosen."""
    from sklearn.calibration import CalibratedClassifierCV  # noqa: PLC0415
    from sklearn.ensemble import GradientBoostingClassifier  # noqa: PLC0415
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    splits = grouped_folds(groups, FOLDS, seed)
    # Calibration needs both labels in each fold's training part; tiny data falls back to plain folds.
    calibration: Any = splits if all(len(np.unique(y[t])) == 2 for t, _ in splits) else FOLDS
    if learner == "logistic":
        # No StandardScaler in front: skl2onnx 1.20 exports a scaler pipeline inside
        # CalibratedClassifierCV wrongly (probabilities off by up to 0.5, measured); the features are
        # already on comparable scales (hashed groups L2-normalised, signals logs and flags).
        text = text_mask(x.shape[1], features)
        choice = choose_logistic(x, y, text, splits)
        xs = _masked(x, text) if choice["features"] == "signals" else x
        estimator = CalibratedClassifierCV(LogisticRegression(C=choice["C"], max_iter=3000), method="sigmoid",
                                           cv=calibration).fit(xs, y)
        if choice["features"] == "signals":
            # Trained on zeros, the text weights are zero already (L2 from a zero start); make it exact, so
            # that serving, which sees the text, computes what was chosen.
            for calibrated in estimator.calibrated_classifiers_:
                calibrated.estimator.coef_[:, text] = 0.0
        return estimator, choice
    if learner == "boosting":
        base = GradientBoostingClassifier(n_estimators=120, max_depth=3, learning_rate=0.08, subsample=0.8,
                                          max_features="sqrt", random_state=seed)
        return CalibratedClassifierCV(base, method="sigmoid", cv=calibration).fit(x, y), {"features": "all"}
    raise ValueError(f"learner must be one of {', '.join(LEARNERS)}, not {learner!r}")


@dataclass
class TrainedScorer:
    """scikit-learn learners, ready to predict or to export (`scorer.fit.export`)."""

    config: TrainConfig
    models: tuple[str, ...]
    #: Accuracy of each model on the training queries (a feature of later tiers: how good the previous was).
    accuracies: dict[str, float]
    uses_confidence: dict[str, bool]
    #: model -> fitted estimator, or a constant probability when the model was always right (or wrong).
    learners: dict[str, Any]
    #: The pooled learner (layout "pooled"), else None.
    pooled: Any = None
    #: model (or "pooled") -> what its learner chose: feature set, C, held-out log-loss.
    choices: dict[str, dict[str, Any]] = field(default_factory=dict)

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
    """Per model index: (features, labels), two rows per query (alone, after one other model): row i and
    row Q + i are query i's (`query_groups`)."""
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


def query_groups(rows: int, queries: int) -> np.ndarray:
    """The query of each training row of `training_rows` (rows = queries or 2 x queries)."""
    return np.arange(rows) % queries


def fit(grid: Grid, config: TrainConfig = TrainConfig(),
        progress: Callable[[str], None] | None = None) -> TrainedScorer:
    """Train on every query of `grid` (pass the train split)."""
    from sklearn.exceptions import ConvergenceWarning  # noqa: PLC0415
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    accuracy = np.nanmean(grid.correct, axis=0)
    rows = training_rows(grid, config, accuracy, np.random.default_rng(config.seed))
    learners: dict[str, Any] = {}
    choices: dict[str, dict[str, Any]] = {}
    pooled = None
    # One thread: the learners are small, and OpenMP threads fighting over two cores cost 30x (measured).
    # A C that does not converge is simply not chosen: its warning is noise here.
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if config.layout == "pooled":
            xs, ys, gs = [], [], []
            for j, (x, y) in rows.items():
                xs.append(learner_input("pooled", x, j, len(grid.models)))
                ys.append(y)
                gs.append(query_groups(len(y), len(grid)))
            pooled, choices["pooled"] = fit_estimator(config.learner, np.vstack(xs), np.concatenate(ys),
                                                      np.concatenate(gs), config.seed, config.spec.size)
        for j, model in enumerate(grid.models):
            x, y = rows[j]
            if np.all(y == y[0]):
                learners[model] = float(y[0])
            elif config.layout == "per-model":
                if progress:
                    progress(f"{model}: {len(y)} rows")
                learners[model], choices[model] = fit_estimator(config.learner, x, y, query_groups(len(y), len(grid)),
                                                                config.seed, config.spec.size)
            else:
                learners[model] = None
    return TrainedScorer(config=config, models=grid.models,
                         accuracies={m: float(a) for m, a in zip(grid.models, accuracy, strict=True)},
                         uses_confidence=grid.has_confidence(), learners=learners, pooled=pooled, choices=choices)
