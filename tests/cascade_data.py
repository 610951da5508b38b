"""Synthetic labelled outcomes for the scorer and optimizer tests: three models of rising skill and cost
answer multiple-choice questions whose difficulty shows in their text; log-probs track correctness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tests.harness import write_dataset

MODELS = (("cheap", 0.35, 1e-5), ("mid", 0.65, 5e-5), ("big", 0.9, 4e-4))
LETTERS = "ABCD"


def synthetic_rows(queries: int = 240, seed: int = 0, dataset: str = "synthetic") -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(queries):
        hard = rng.random() < 0.5
        topic = "quantum thermodynamics proof" if hard else "simple arithmetic fact"
        gold = LETTERS[rng.integers(4)]
        query = f"Question {q} about {topic} number {rng.integers(1000)}: pick A, B, C or D."
        split = "train" if q % 2 == 0 else "test"
        for name, skill, price in MODELS:
            p_right = skill * (0.55 if hard else 1.0) + (0.0 if hard else 0.1)
            right = rng.random() < min(p_right, 0.98)
            answer = gold if right else rng.choice([c for c in LETTERS if c != gold])
            confidence = float(np.log(np.clip(rng.normal(0.85 if right else 0.45, 0.15), 0.02, 1.0)))
            tokens_in, tokens_out = 40 + q % 7, 1
            rows.append({"dataset": dataset, "split": split, "query_id": f"q{q}", "query": query, "gold": gold,
                         "model": name, "answer": answer, "correct": float(right),
                         "cost_usd": price * (tokens_in + tokens_out) / 40, "input_tokens": tokens_in,
                         "output_tokens": tokens_out, "confidence": confidence})
    return rows


def synthetic_file(path: Path, queries: int = 240, seed: int = 0) -> Path:
    return write_dataset(path, synthetic_rows(queries, seed))
