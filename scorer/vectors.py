"""From features to the learner's input, one answer at a time (a whole grid of answers: `scorer.fit.grid_features`).

`per-model` scorers see the feature vector as is. A `pooled` scorer (one learner for every model) sees it
followed by the model's one-hot code and the signals multiplied by that code, so that e.g. the weight of
a log-prob can differ between models in a linear learner.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from scorer.features import SIGNALS, FeatureSpec

Layout = Literal["per-model", "pooled"]
LAYOUTS: tuple[str, ...] = ("per-model", "pooled")

_N = len(SIGNALS)


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


def check_layout(layout: str) -> Layout:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    return layout  # type: ignore[return-value]

