"""Scoring with ONNX Runtime: what the gateway runs on every cascade tier but the last.

Loads a folder written by `scorer.fit.export.save`. Imports neither scikit-learn nor skl2onnx, so a serving
process carries only numpy and onnxruntime.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scorer.features import FEATURE_VERSION, FeatureSpec, Previous, featurize
from scorer.vectors import Layout, check_layout, learner_input


class ScorerError(ValueError):
    """The scorer folder cannot be used."""


class OnnxScorer:
    """P(correct) for one answer, from a saved scorer."""

    def __init__(self, folder: str | Path) -> None:
        import onnxruntime as ort  # noqa: PLC0415

        self.folder = Path(folder)
        path = self.folder / "scorer.json"
        try:
            manifest: dict[str, Any] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ScorerError(f"cannot read scorer manifest {path}: {exc}") from exc
        if manifest.get("format") != "frugal-scorer":
            raise ScorerError(f"{path} is not a frugal scorer manifest")
        self.manifest = manifest
        self.spec = FeatureSpec.from_json(manifest["spec"])
        if self.spec.version != FEATURE_VERSION:
            raise ScorerError(f"{path}: trained on feature vectors of version {self.spec.version}, and this build "
                              f"computes version {FEATURE_VERSION}; train it again (frugal scorer train or "
                              "frugal cascade fit)")
        self.layout: Layout = check_layout(manifest["layout"])
        self.models: tuple[str, ...] = tuple(manifest["models"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # one small model: threads only add hand-over latency
        options.inter_op_num_threads = 1
        sessions: dict[str, Any] = {}
        self._sessions: dict[str, Any] = {}
        self._constants: dict[str, float] = {}
        for model, entry in manifest["models"].items():
            if "constant" in entry:
                self._constants[model] = float(entry["constant"])
                continue
            name = entry["onnx"]
            if name not in sessions:
                try:
                    sessions[name] = ort.InferenceSession(str(self.folder / name), options,
                                                          providers=["CPUExecutionProvider"])
                except Exception as exc:  # onnxruntime raises its own exception types
                    raise ScorerError(f"cannot load {self.folder / name}: {exc}") from exc
            self._sessions[model] = sessions[name]

    def knows(self, model: str) -> bool:
        return model in self.models

    def train_accuracy(self, model: str) -> float:
        """The model's accuracy on the scorer's training data (0.5 for a model it was not trained on)."""
        entry = self.manifest["models"].get(model)
        return float(entry["train_accuracy"]) if entry else 0.5

    def uses_confidence(self, model: str) -> bool:
        entry = self.manifest["models"].get(model)
        return bool(entry and entry["uses_confidence"])

    def predict(self, model: str, features: np.ndarray) -> np.ndarray:
        """P(correct) for rows of features (N, spec.size) of `model`'s answers."""
        if model in self._constants:
            return np.full(features.shape[0], self._constants[model], dtype=np.float32)
        session = self._sessions.get(model)
        if session is None:
            raise ScorerError(f"the scorer in {self.folder} was not trained for model {model!r}")
        x = learner_input(self.layout, features.astype(np.float32, copy=False), self.models.index(model),
                          len(self.models))
        return session.run(["probabilities"], {session.get_inputs()[0].name: x})[0][:, 1]

    def score(self, query: str, answer: str, model: str, confidence: float | None = None,
              previous: Sequence[tuple[str, str]] = ()) -> float:
        """P(correct) of `model`'s `answer` to `query`; `previous`: (model, answer) of earlier tiers."""
        before = [Previous(text, self.train_accuracy(name)) for name, text in previous]
        features = featurize(self.spec, query, answer, confidence, before)
        return float(self.predict(model, features[None, :])[0])
