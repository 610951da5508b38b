"""Published accuracy-cost curves to compare with (the data pack's `reference/` folder).

- Zellinger & Thomson (arXiv 2501.09345), `zellinger_cascade_comparison.csv`: test curves of cascades of
  the five Llama models, costs in USD per million queries.
- FrugalGPT (Chen, Zaharia, Zou), `frugalgpt_summary_<DS>.csv`: the published 2024 summary: the FrugalGPT
  cascade at 20 budgets and single 2024-generation models (not the models of the pack's grid).
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

#: Data pack dataset name -> Zellinger benchmark name.
ZELLINGER = {"zellinger_mmlu": "mmlu", "zellinger_triviaqa": "triviaqa"}
#: Data pack dataset name -> FrugalGPT summary name.
FRUGALGPT = {"overruling": "OVERRULING"}
ZELLINGER_MODELS = ("llama3.2-1b", "llama3.2-3b", "llama3.1-8b", "llama3.1-70b", "llama3.1-405b")


@dataclass(frozen=True)
class ReferencePoint:
    cost_usd: float
    accuracy: float
    label: str


def reference_dir(data_file: str | Path) -> Path:
    """`reference/` beside the `cascade/` folder that holds `data_file`."""
    return Path(data_file).resolve().parent.parent / "reference"


def zellinger_points(folder: Path, dataset: str, method: str = "continuous_optimization") -> list[ReferencePoint]:
    """Every published test point of every cascade for `dataset`, cost in USD per query."""
    benchmark = ZELLINGER.get(dataset)
    path = folder / "zellinger_cascade_comparison.csv"
    if benchmark is None or not path.is_file():
        return []
    csv.field_size_limit(sys.maxsize)
    points = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["benchmark"] != benchmark or row["method"] != method:
                continue
            for cost, accuracy in json.loads(row["curve_json"]):
                points.append(ReferencePoint(float(cost) / 1e6, float(accuracy), row["cascade_models"]))
    return points


def upper_envelope(points: list[ReferencePoint]) -> list[ReferencePoint]:
    """The best published accuracy at each cost (points by increasing cost, increasing accuracy)."""
    out: list[ReferencePoint] = []
    for point in sorted(points, key=lambda p: (p.cost_usd, -p.accuracy)):
        if not out or point.accuracy > out[-1].accuracy:
            out.append(point)
    return out


def frugalgpt_points(folder: Path, dataset: str) -> list[ReferencePoint]:
    """FrugalGPT's published test points (its cascade and single 2024 models), cost in USD per query."""
    name = FRUGALGPT.get(dataset)
    path = folder / f"frugalgpt_summary_{name}.csv"
    if name is None or not path.is_file():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [ReferencePoint(float(r["Test_cost"]), float(r["Test_acc"]), r["Method"]) for r in rows]
