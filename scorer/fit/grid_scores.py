"""Scores for every answer of a grid, as a cascade would see them: each model's answer judged alone (the
first tier), and judged after each other model's answer (the second tier).

Used by the optimizer (on held-out folds of train) and by evaluation (on test, with the ONNX scorer).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from scorer.features import FeatureSpec
from scorer.fit.dataset import Grid
from scorer.fit.grid_features import after, first_tier_features, normalized_answers


class Predictor(Protocol):
    def train_accuracy(self, model: str) -> float: ...

    def predict(self, model: str, features: np.ndarray) -> np.ndarray: ...


@dataclass
class GridScores:
    """`first[q, m]`: P(correct) of model m's answer to query q with no tier before it;
    `second[(a, b)][q]`: of model b's answer after model a's (model indices of the grid)."""

    first: np.ndarray
    second: dict[tuple[int, int], np.ndarray]

    def take(self, rows: np.ndarray) -> GridScores:
        return GridScores(self.first[rows], {k: v[rows] for k, v in self.second.items()})

    @staticmethod
    def gather(parts: list[tuple[np.ndarray, GridScores]], n: int) -> GridScores:
        """Reassemble scores computed on disjoint row sets (the folds of cross-fitting)."""
        first_part = parts[0][1].first
        first = np.zeros((n, first_part.shape[1]), dtype=np.float64)
        second = {k: np.zeros(n, dtype=np.float64) for k in parts[0][1].second}
        for rows, scores in parts:
            first[rows] = scores.first
            for key, values in scores.second.items():
                second[key][rows] = values
        return GridScores(first, second)


def score_grid(predictor: Predictor, spec: FeatureSpec, grid: Grid,
               pairs: Iterable[tuple[int, int]] = ()) -> GridScores:
    """Scores of every model alone, and of model b after model a for each (a, b) in `pairs`."""
    models = grid.models
    features = [first_tier_features(spec, grid, j) for j in range(len(models))]
    first = np.column_stack([predictor.predict(m, features[j]) for j, m in enumerate(models)]).astype(np.float64)
    norm = normalized_answers(grid) if pairs else None
    second: dict[tuple[int, int], np.ndarray] = {}
    for a, b in pairs:
        assert norm is not None
        agrees = norm[:, a] == norm[:, b]
        rows = after(features[b], agrees, predictor.train_accuracy(models[a]))
        second[(a, b)] = predictor.predict(models[b], rows).astype(np.float64)
    return GridScores(first, second)
