"""Features of a whole grid of labelled answers at once, for training and offline scoring (the serving path
featurizes one answer at a time: `scorer.features.featurize`)."""

from __future__ import annotations

import numpy as np

from scorer.features import SIGNALS, FeatureSpec, featurize_many, normalized_answer
from scorer.fit.dataset import Grid

_HAS_PREV = SIGNALS.index("has_previous")


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
