"""The local judge at serving time: P(correct) of a local model's answer, from its own signals.

Loads a folder written by `frugal judge build` (`scorer.fit.judge_build`): `judge.onnx` (the learner, with
its feature scaling inside) and `judge.json` (the card: the model it was trained for, the request settings
its signals need, the chosen threshold and how it did). Imports neither scikit-learn nor skl2onnx.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from scorer.answers import task_kind
from scorer.signals import FEATURE_NAMES, SIGNALS_VERSION, AnswerSignals, Embed, JudgeSettings, features

CARD = "judge.json"
MODEL = "judge.onnx"
FORMAT = "frugal-judge"
#: Judges shipped with the package, by local model name (package data: `scorer/judges/<name>/`).
PACKAGED = "scorer.judges"


class JudgeError(ValueError):
    """The judge folder cannot be used."""


def packaged_judge(model: str) -> Path | None:
    """The judge shipped for a local model (`smollm2-135m-instruct`), or None."""
    folder = resources.files(PACKAGED) / model.removeprefix("local/")
    path = Path(str(folder))
    return path if (path / CARD).is_file() else None


def read_card(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CARD
    try:
        card: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise JudgeError(f"cannot read the judge card {path}: {exc}") from exc
    if card.get("format") != FORMAT:
        raise JudgeError(f"{path} is not a frugal judge card")
    return card


class LocalJudge:
    """Scores a local tier's answers; `settings` say what the tier must be asked for."""

    def __init__(self, folder: str | Path, embed: Embed | None = None) -> None:
        import onnxruntime as ort  # noqa: PLC0415

        self.folder = Path(folder)
        self.card = read_card(self.folder)
        if self.card.get("signals_version") != SIGNALS_VERSION or tuple(self.card["features"]) != FEATURE_NAMES:
            raise JudgeError(f"{self.folder}: trained on other signals (version {self.card.get('signals_version')}, "
                             f"this build computes {SIGNALS_VERSION}); build it again with `frugal judge build`")
        onnx_bytes = (self.folder / MODEL).read_bytes()
        if hashlib.sha256(onnx_bytes).hexdigest() != self.card["onnx_sha256"]:
            raise JudgeError(f"{self.folder / MODEL} does not match its card (sha256)")
        self.settings = JudgeSettings.from_json(self.card["settings"])
        #: Which judge this is (its ONNX file's SHA-256, first 12 digits): recorded with every score it gives.
        self.version = str(self.card["onnx_sha256"])[:12]
        self.threshold = float(self.card["threshold"])
        self.model = str(self.card["model"])
        #: The kinds of task the judge has seen graded outcomes for; it never vouches for others.
        self.kinds = frozenset(self.card["kinds"])
        self._use_samples = self.settings.samples > 0
        self._embed = embed
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        outputs = [o.name for o in self._session.get_outputs()]
        self._output = "probabilities" if "probabilities" in outputs else outputs[-1]

    def score(self, query: str, signals: AnswerSignals) -> float:
        """P(correct) of the answer; 0 for a query of a kind the judge has not seen graded."""
        return self.assess(query, signals)[0]

    def assess(self, query: str, signals: AnswerSignals) -> tuple[float, np.ndarray]:
        """The score and the features it was computed from (kept in the trace, so that a judge can be
        trained again on a deployment's own labelled traffic: `frugal judge retrain`)."""
        vector = features(query, signals, self._embed, self._use_samples)
        if task_kind(query) not in self.kinds:
            return 0.0, vector
        return self.score_features(vector.reshape(1, -1))[0], vector

    def score_features(self, rows: np.ndarray) -> list[float]:
        """P(correct) for feature rows (one per answer, `FEATURE_NAMES` order); 0 for rows of a kind the judge
        never vouches for."""
        rows = np.asarray(rows, dtype=np.float32).reshape(-1, len(FEATURE_NAMES))
        (probabilities,) = self._session.run([self._output], {self._input: rows})
        scores = np.asarray(probabilities)[:, -1].astype(float)
        kinds = [name.removeprefix("kind_") for name in FEATURE_NAMES if name.startswith("kind_")]
        first = FEATURE_NAMES.index(f"kind_{kinds[0]}")
        for i, row in enumerate(rows):
            kind = kinds[int(np.argmax(row[first:first + len(kinds)]))]
            if kind not in self.kinds:
                scores[i] = 0.0
        return [float(x) for x in scores]
