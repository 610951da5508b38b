"""From features to the learner's input, for one model or for a whole grid of answers at once.

`per-model` scorers see the feature vector as is. A `pooled` scorer (one learner for every model) sees it
followed by the model's one-hot code and the signals multiplied by that code, so that e.g. the weight of
a log-prob can differ between models in a linear learner.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from scorer.dataset import Grid
from scorer.features import SIGNALS, FeatureSpec, featurize_many, normalized_answer

Layout = Literal["per-model", "pooled"]
LAYOUTS: tuple[str, ...] = ("per-model", "pooled")

_N = len(SIGNALS)
_HAS_PREV = SIGNALS.index("has_previous")


def input_size(spec: FeatureSpec, layout: Layout, n_models: int) -> int:
    if layout == "per-model":
        return spec.size
    return spec.size + n_models + _N * n_models


def learner_input(layout: Layout, features: np.ndarray, model_index: int, n_models: int) -> np.ndarray:
    """Rows of features (N, spec.size) as the learner of `layout` takes them."""
    if layout == "per-model":
        return features
    rows = features.shape[0]
    onehot = np.zeros((rows, n_models), dtype=np.float32)
    onehot[:, model_index] = 1.0
    crossed = np.zeros((rows, _N * n_models), dtype=np.float32)
    crossed[:, model_index * _N:(model_index + 1) * _N] = features[:, :_N]
    return np.hstack([features, onehot, crossed])


def normalized_answers(grid: Grid) -> np.ndarray:
    """(Q, M) array of answers in the form compared for agreement."""
    return np.array([[normalized_answer(a) for a in row] for row in grid.answers], dtype=object)


def first_tier_features(spec: FeatureSpec, grid: Grid, model_index: int) -> np.ndarray:
    """Features of every query's answer from one model, with no tier before it."""
    return featurize_many(spec, grid.queries, [row[model_index] for row in grid.answers],
                          grid.confidence[:, model_index])


def after(features: np.ndarray, agrees: np.ndarray, previous_accuracy: float | np.ndarray) -> np.ndarray:
    """`first_tier_features` rows as they are when one tier answered before (its answers agree or not).

    Equal to featurizing with `previous=[Previous(answer, previous_accuracy)]`, without redoing the text."""
    out = features.copy()
    agree = agrees.astype(np.float32)
    out[:, _HAS_PREV] = 1.0
    out[:, _HAS_PREV + 1] = agree
    out[:, _HAS_PREV + 2] = previous_accuracy
    out[:, _HAS_PREV + 3] = previous_accuracy * agree
    out[:, _HAS_PREV + 4] = agree
    return out


def check_layout(layout: str) -> Layout:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    return layout  # type: ignore[return-value]

