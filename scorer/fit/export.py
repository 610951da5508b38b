"""Saving a trained scorer as ONNX models plus a manifest (`scorer.json`), the form the gateway loads."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from scorer.fit.train import TrainedScorer
from scorer.vectors import input_size

MANIFEST = "scorer.json"
FORMAT = "frugal-scorer"
VERSION = 1


def _onnx_bytes(estimator: Any, n_inputs: int) -> bytes:
    from skl2onnx import to_onnx  # noqa: PLC0415

    sample = np.zeros((1, n_inputs), dtype=np.float32)
    return to_onnx(estimator, sample, options={"zipmap": False}).SerializeToString()


def _file_name(index: int, model: str) -> str:
    return f"{index:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', model)[:60]}.onnx"


def save(trained: TrainedScorer, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `folder/scorer.json` and one ONNX file per model (or one pooled file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = trained.config
    n_inputs = input_size(config.spec, config.layout, len(trained.models))
    models: dict[str, Any] = {}
    pooled_file = None
    if trained.pooled is not None:
        pooled_file = "pooled.onnx"
        (folder / pooled_file).write_bytes(_onnx_bytes(trained.pooled, n_inputs))
    for index, model in enumerate(trained.models):
        learner = trained.learners[model]
        entry: dict[str, Any] = {"train_accuracy": trained.accuracies[model],
                                 "uses_confidence": trained.uses_confidence[model]}
        if model in trained.choices:
            entry["choice"] = trained.choices[model]  # features and C chosen by query-grouped folds
        if isinstance(learner, float):
            entry["constant"] = learner
        elif learner is not None:
            entry["onnx"] = _file_name(index, model)
            (folder / entry["onnx"]).write_bytes(_onnx_bytes(learner, n_inputs))
        else:
            entry["onnx"] = pooled_file
        models[model] = entry
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **config.to_json(),
        "models": models,
        **({"pooled_choice": trained.choices["pooled"]} if "pooled" in trained.choices else {}),
        **(extra or {}),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder
