"""Labelled outcomes: every model's answer to every query, with correctness and cost.

Read from the cascade data pack's `<dataset>.jsonl.gz` files (schema in shared/data/cascade/MANIFEST.md),
or from any file in the same schema (e.g. exported from the spend ledger). A `Grid` holds one dataset as
arrays indexed [query, model], so the scorer and the optimizer never loop over rows.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson


class DataError(ValueError):
    """A data file cannot be used (missing fields, an incomplete query x model grid, several datasets)."""


@dataclass(frozen=True)
class Grid:
    """One dataset: Q queries answered by M models.

    `correct`, `cost_usd`, `confidence`, `input_tokens`, `output_tokens` are float arrays of shape (Q, M);
    missing values are NaN (a missing confidence means the provider gave none).
    """

    name: str
    models: tuple[str, ...]
    query_ids: tuple[str, ...]
    queries: tuple[str, ...]
    splits: np.ndarray
    answers: tuple[tuple[str, ...], ...]
    correct: np.ndarray
    cost_usd: np.ndarray
    confidence: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    #: Each query's reference answer where the data has one (the pack's `gold`), else None.
    golds: tuple[str | None, ...] | None = None

    def __len__(self) -> int:
        return len(self.queries)

    def take(self, rows: np.ndarray | Sequence[int]) -> Grid:
        """The queries at `rows` (indices or a boolean mask), all models."""
        index = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, dtype=int)
        return Grid(
            name=self.name,
            models=self.models,
            query_ids=tuple(self.query_ids[i] for i in index),
            queries=tuple(self.queries[i] for i in index),
            splits=self.splits[index],
            answers=tuple(self.answers[i] for i in index),
            correct=self.correct[index],
            cost_usd=self.cost_usd[index],
            confidence=self.confidence[index],
            input_tokens=self.input_tokens[index],
            output_tokens=self.output_tokens[index],
            golds=tuple(self.golds[i] for i in index) if self.golds is not None else None,
        )

    def split(self, name: str) -> Grid:
        """The `train` or `test` queries."""
        mask = self.splits == name
        if not mask.any():
            raise DataError(f"{self.name}: no queries in split {name!r}")
        return self.take(mask)

    def with_models(self, models: Sequence[str]) -> Grid:
        """Only `models`, in that order."""
        unknown = [m for m in models if m not in self.models]
        if unknown:
            raise DataError(f"{self.name}: unknown models {', '.join(unknown)}; known: {', '.join(self.models)}")
        cols = [self.models.index(m) for m in models]
        return Grid(
            name=self.name,
            models=tuple(models),
            query_ids=self.query_ids,
            queries=self.queries,
            splits=self.splits,
            answers=tuple(tuple(row[c] for c in cols) for row in self.answers),
            correct=self.correct[:, cols],
            cost_usd=self.cost_usd[:, cols],
            confidence=self.confidence[:, cols],
            input_tokens=self.input_tokens[:, cols],
            output_tokens=self.output_tokens[:, cols],
            golds=self.golds,
        )

    def has_confidence(self) -> dict[str, bool]:
        """Per model: whether any answer came with a confidence (log-prob)."""
        return {m: bool(np.isfinite(self.confidence[:, j]).any()) for j, m in enumerate(self.models)}


def _number(value: object) -> float:
    if value is None:
        return math.nan
    return float(value)  # type: ignore[arg-type]


def read_rows(paths: Iterable[str | Path]) -> list[dict]:
    rows: list[dict] = []
    for path in paths:
        path = Path(path)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            rows.extend(orjson.loads(line) for line in handle if line.strip())
    return rows


def load_grid(path: str | Path) -> Grid:
    """One dataset file as a `Grid` (every query must have every model)."""
    return grid_from_rows(read_rows([path]), origin=str(path))


def grid_from_rows(rows: list[dict], origin: str = "<rows>") -> Grid:
    required = ("query_id", "query", "model", "correct")
    for field in required:
        if rows and field not in rows[0]:
            raise DataError(f"{origin}: rows lack the field {field!r}")
    names = {str(r.get("dataset") or "") for r in rows}
    if len(names) > 1:
        raise DataError(f"{origin}: several datasets in one grid: {', '.join(sorted(names))}")
    models: list[str] = []
    order: dict[str, int] = {}
    cells: dict[tuple[str, str], dict] = {}
    for row in rows:
        model, qid = str(row["model"]), str(row["query_id"])
        if model not in models:
            models.append(model)
        order.setdefault(qid, len(order))
        cells[(qid, model)] = row
    qids = sorted(order, key=order.__getitem__)
    missing = [(q, m) for q in qids for m in models if (q, m) not in cells]
    if missing:
        q, m = missing[0]
        raise DataError(f"{origin}: incomplete grid: {len(missing)} (query, model) cells missing, e.g. {q!r}, {m!r}")

    def array(field: str) -> np.ndarray:
        return np.array([[_number(cells[(q, m)].get(field)) for m in models] for q in qids], dtype=np.float64)

    first = [cells[(q, models[0])] for q in qids]
    name = names.pop() if names else ""
    return Grid(
        name=name or Path(origin).name.split(".")[0],
        models=tuple(models),
        query_ids=tuple(qids),
        queries=tuple(str(r["query"]) for r in first),
        splits=np.array([str(r.get("split") or "train") for r in first]),
        answers=tuple(tuple(str(cells[(q, m)].get("answer") or "") for m in models) for q in qids),
        correct=array("correct"),
        cost_usd=array("cost_usd"),
        confidence=array("confidence"),
        input_tokens=array("input_tokens"),
        output_tokens=array("output_tokens"),
        golds=tuple(r.get("gold") if isinstance(r.get("gold"), str) else None for r in first),
    )
