"""Recorded answers of real LLMs (the cascade data pack, schema in its MANIFEST.md), indexed for lookup."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import orjson


@dataclass(frozen=True, slots=True)
class Recording:
    """One model's recorded answer to one query."""

    answer: str | None
    input_tokens: int | None
    output_tokens: int | None
    confidence: float | None
    correct: float | None
    cost_usd: float | None


class RecordedAnswers:
    """query text -> model -> Recording, from one or more `<dataset>.jsonl.gz` files."""

    def __init__(self) -> None:
        self._by_query: dict[str, dict[str, Recording]] = {}
        #: query_id -> (query text, model -> Recording): tells apart repeated prompts recorded separately.
        self._by_id: dict[str, tuple[str, dict[str, Recording]]] = {}
        self.models: set[str] = set()
        self.datasets: set[str] = set()

    def __len__(self) -> int:
        return len(self._by_query)

    @classmethod
    def load(cls, paths: Iterable[str | Path]) -> RecordedAnswers:
        answers = cls()
        for path in paths:
            answers.add_file(Path(path))
        return answers

    def add_file(self, path: Path) -> None:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            for line in handle:
                if line.strip():
                    self.add(orjson.loads(line))

    def add(self, row: dict) -> None:
        model = str(row["model"])
        self.models.add(model)
        if row.get("dataset"):
            self.datasets.add(str(row["dataset"]))
        recording = Recording(
            answer=row.get("answer"),
            input_tokens=row.get("input_tokens"),
            output_tokens=row.get("output_tokens"),
            confidence=row.get("confidence"),
            correct=row.get("correct"),
            cost_usd=row.get("cost_usd"),
        )
        self._by_query.setdefault(row["query"], {})[model] = recording
        if row.get("query_id") is not None:
            self._by_id.setdefault(str(row["query_id"]), (row["query"], {}))[1][model] = recording

    def find(self, model: str, candidates: Iterable[str], query_id: str | None = None) -> Recording | None:
        """The recording of `model` for the first candidate query text that was recorded. A `query_id`
        whose recorded query is one of the candidates picks that very recording (a prompt recorded twice
        may have two different answers)."""
        candidates = list(candidates)
        by_id = self._by_id.get(query_id) if query_id is not None else None
        if by_id is not None and by_id[0] in candidates and model in by_id[1]:
            return by_id[1][model]
        for query in candidates:
            recorded = self._by_query.get(query)
            if recorded is not None:
                return recorded.get(model)
        return None


def deterministic_answer(model: str, prompt: str) -> str:
    """The answer for a prompt nobody recorded: fixed for (model, prompt), and says what it is."""
    digest = hashlib.sha256(f"{model}\x00{prompt}".encode()).hexdigest()[:12]
    return f"Stand-in answer {digest} from {model}: no recorded answer for this prompt."
