"""`frugal cascade eval`: a fitted cascade on a split of a data file, against every single model, the
frontier fitted on train, and a published reference where one exists. Nothing here tunes anything."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from router.cascade_file import CascadeFile, point_to_yaml
from router.fit.evaluation import AnswerScorer, best_single, evaluate_points, query_costs, replay, single_models
from router.fit.reference import (
    ZELLINGER_MODELS,
    ReferencePoint,
    frugalgpt_points,
    reference_dir,
    upper_envelope,
    zellinger_points,
)
from router.tiers import CascadePoint
from scorer.fit.dataset import Grid


def accuracy_at(cost_usd: float, train_frontier: Sequence[CascadePoint],
                on_split: Sequence[CascadePoint]) -> float | None:
    """Our accuracy at `cost_usd` on the split: the frontier point chosen on train (the most accurate on
    train) among those whose cost on the split is within `cost_usd`. None when none is that cheap."""
    best: tuple[float, float] | None = None
    for fitted, seen in zip(train_frontier, on_split, strict=True):
        if seen.cost_usd <= cost_usd + 1e-15 and (best is None or fitted.accuracy > best[0]):
            best = (fitted.accuracy, seen.accuracy)
    return None if best is None else best[1]


def compare_with_reference(reference: Sequence[ReferencePoint], train_frontier: Sequence[CascadePoint],
                           on_split: Sequence[CascadePoint]) -> dict[str, Any]:
    """At how many of the published points our accuracy at the same cost is at least theirs."""
    met = 0
    rows = []
    for point in reference:
        ours = accuracy_at(point.cost_usd, train_frontier, on_split)
        ok = ours is not None and ours >= point.accuracy - 1e-9
        met += ok
        rows.append({"cost_usd": point.cost_usd, "reference_accuracy": point.accuracy, "our_accuracy": ours,
                     "at_or_above": ok})
    return {"points": len(reference), "at_or_above": met, "share": met / len(reference) if reference else None,
            "detail": rows}


def evaluate(grid: Grid, cascade: CascadeFile, scorer: AnswerScorer, split: str, data_file: str | Path,
             plot: str | Path | None = None) -> dict[str, Any]:
    part = grid.split(split)
    fitted_models = cascade.meta.get("search", {}).get("models") or list(part.models)
    part = part.with_models([m for m in part.models if m in fitted_models])
    cost = query_costs(part, cascade.prices)
    run = replay(cascade.chosen.tiers, part, cost, scorer)
    chosen = run.point
    singles = single_models(part, cost)
    best = best_single(singles)
    frontier = evaluate_points(cascade.frontier, part, cost, scorer)
    # FrugalGPT's other question: the best accuracy at the best model's cost (chosen on train).
    best_train = next((p for p in cascade.singles if p.models == best.models), None)
    at_best_cost = None
    if best_train is not None:
        within = [(f, s) for f, s in zip(cascade.frontier, frontier, strict=True) if f.cost_usd <= best_train.cost_usd]
        if within:
            fitted, seen = max(within, key=lambda fs: fs[0].accuracy)
            at_best_cost = {**point_to_yaml(seen), "train_accuracy": round(fitted.accuracy, 6)}
    report: dict[str, Any] = {
        "dataset": grid.name,
        "split": split,
        "queries": len(part),
        "cost_basis": "tokens x prices" if cascade.prices else "cost_usd of the data",
        "chosen": point_to_yaml(chosen),
        "best_single": point_to_yaml(best),
        "accuracy_gap_points": round(100 * (chosen.accuracy - best.accuracy), 3),
        "cost_ratio_vs_best": round(chosen.cost_usd / best.cost_usd, 4) if best.cost_usd else None,
        "best_accuracy_at_best_model_cost": at_best_cost,
        "single_models": [point_to_yaml(p) for p in singles],
        "frontier": [point_to_yaml(p) for p in frontier],
    }
    folder = reference_dir(data_file)
    reference = upper_envelope(zellinger_points(folder, grid.name))
    if reference and set(part.models) <= set(ZELLINGER_MODELS):
        report["zellinger_continuous_optimization"] = compare_with_reference(reference, cascade.frontier, frontier)
    frugal = frugalgpt_points(folder, grid.name)
    if frugal:
        report["frugalgpt_published_2024_models"] = [
            {"method": p.label, "cost_usd": p.cost_usd, "accuracy": p.accuracy} for p in frugal]
    if plot is not None:
        from router.fit.plot import plot_frontier  # noqa: PLC0415

        plot_frontier(plot, f"{grid.name} ({split}, {len(part)} queries)", frontier, singles, chosen,
                      reference if "zellinger_continuous_optimization" in report else (),
                      "Zellinger & Thomson, continuous optimization (envelope)",
                      [p for p in frugal if p.label == "FrugalGPT"], "FrugalGPT paper (2024 models, other grid)")
        report["plot"] = str(plot)
    return report
