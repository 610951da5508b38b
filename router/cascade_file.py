"""`cascade.yaml`: a fitted cascade (the chosen tiers and thresholds, the scorer folder, the whole
frontier found on train). Written by `frugal cascade fit`, read by `frugal cascade eval` and the gateway."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from router.tiers import CascadePoint, Tier

FORMAT = "frugal-cascade"


class CascadeFileError(ValueError):
    """The cascade file cannot be used; the message says why."""


def point_to_yaml(point: CascadePoint) -> dict[str, Any]:
    return {
        "tiers": [{"model": t.model, **({"threshold": t.threshold} if t.threshold is not None else {})}
                  for t in point.tiers],
        "accuracy": round(point.accuracy, 6),
        "cost_usd": float(f"{point.cost_usd:.6g}"),
        "shares": [round(s, 6) for s in point.shares],
    }


def tiers_from_yaml(raw: Any, where: str) -> tuple[Tier, ...]:
    if not isinstance(raw, list) or not raw:
        raise CascadeFileError(f"{where}: tiers must be a non-empty list")
    tiers = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise CascadeFileError(f"{where}: tier {i} needs a model name")
        threshold = entry.get("threshold")
        last = i == len(raw) - 1
        if not last and not isinstance(threshold, int | float):
            raise CascadeFileError(f"{where}: tier {i} ({entry['model']}) needs a numeric threshold")
        tiers.append(Tier(entry["model"], None if last else float(threshold)))
    return tuple(tiers)


def point_from_yaml(raw: Any, where: str) -> CascadePoint:
    if not isinstance(raw, dict):
        raise CascadeFileError(f"{where}: must be a mapping")
    tiers = tiers_from_yaml(raw.get("tiers"), where)
    return CascadePoint(tiers, float(raw.get("accuracy", float("nan"))), float(raw.get("cost_usd", float("nan"))),
                        tuple(float(s) for s in raw.get("shares", ())))


@dataclass
class CascadeFile:
    chosen: CascadePoint
    #: The scorer folder (absolute once loaded).
    scorer: Path
    frontier: list[CascadePoint] = field(default_factory=list)
    singles: list[CascadePoint] = field(default_factory=list)
    dataset: str = ""
    #: USD per million tokens (input, output) per model, when costs were computed from tokens.
    prices: dict[str, tuple[float, float]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        scorer = Path(self.scorer)
        try:
            scorer_ref = str(scorer.resolve().relative_to(path.parent.resolve()))
        except ValueError:
            scorer_ref = str(scorer.resolve())
        doc = {
            "format": FORMAT,
            "version": 1,
            "dataset": self.dataset,
            "scorer": scorer_ref,
            **self.meta,
            "prices_per_million": {m: list(p) for m, p in self.prices.items()} if self.prices else None,
            "chosen": point_to_yaml(self.chosen),
            "single_models": [point_to_yaml(p) for p in self.singles],
            "frontier": [point_to_yaml(p) for p in self.frontier],
        }
        path.write_text(yaml.safe_dump(doc, sort_keys=False, width=120))
        return path

    @classmethod
    def read(cls, path: str | Path) -> CascadeFile:
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise CascadeFileError(f"cannot read cascade file {path}: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CascadeFileError(f"{path}: not a frugal cascade file (format: {FORMAT})")
        scorer = Path(str(doc.get("scorer") or ""))
        if not scorer.is_absolute():
            scorer = path.parent / scorer
        prices = doc.get("prices_per_million")
        known = {"format", "version", "dataset", "scorer", "prices_per_million", "chosen", "single_models", "frontier"}
        return cls(
            chosen=point_from_yaml(doc.get("chosen"), f"{path}: chosen"),
            scorer=scorer,
            frontier=[point_from_yaml(p, f"{path}: frontier[{i}]") for i, p in enumerate(doc.get("frontier") or [])],
            singles=[point_from_yaml(p, f"{path}: single_models[{i}]")
                     for i, p in enumerate(doc.get("single_models") or [])],
            dataset=str(doc.get("dataset") or ""),
            prices={m: (float(p[0]), float(p[1])) for m, p in prices.items()} if prices else None,
            meta={k: v for k, v in doc.items() if k not in known},
        )


def models_of(points: Sequence[CascadePoint]) -> list[str]:
    seen: list[str] = []
    for point in points:
        for model in point.models:
            if model not in seen:
                seen.append(model)
    return seen
