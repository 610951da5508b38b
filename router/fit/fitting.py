"""`frugal cascade fit`: cross-fit the scorer on train, search the cascades, keep the frontier, choose one,
train the final scorer on all of train, and write `cascade.yaml` with the scorer folder beside it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from router.cascade_file import CascadeFile
from router.fit.evaluation import best_single, query_costs, single_models
from router.fit.optimizer import Order, choose, crossfit, pareto, search, second_tier_pairs, sequences
from scorer.fit.dataset import Grid
from scorer.fit.export import save
from scorer.fit.quality import quality
from scorer.fit.train import TrainConfig, fit


@dataclass(frozen=True)
class FitOptions:
    models: Sequence[str] | None = None
    max_depth: int = 3
    order: Order = "cost"
    budget_usd: float | None = None
    target_accuracy: float | None = None
    folds: int = 5
    grid_size: int = 24
    prices: dict[str, tuple[float, float]] | None = None
    scorer: TrainConfig = TrainConfig()


def fit_cascade(grid: Grid, out: str | Path, options: FitOptions = FitOptions(), scorer_dir: str | Path | None = None,
                progress: Callable[[str], None] | None = None) -> CascadeFile:
    """Fit on `grid`'s train split; write `out` (cascade.yaml) and the scorer folder (default: beside it)."""
    if not 1 <= options.max_depth <= 3:
        raise ValueError("--max-depth must be 1, 2 or 3")
    train = grid.split("train")
    if options.models:
        train = train.with_models(options.models)
    cost = query_costs(train, options.prices)
    seqs = sequences(train.models, cost.mean(axis=0), options.max_depth, options.order)
    oof = crossfit(train, options.scorer, second_tier_pairs(seqs), options.folds, progress)
    if progress:
        progress(f"searching {len(seqs)} model sequences")
    frontier = pareto(search(train.models, oof, train.correct, cost, seqs, options.grid_size))
    singles = single_models(train, cost)
    target = options.target_accuracy
    if options.budget_usd is None and target is None:
        target = best_single(singles).accuracy  # FrugalGPT's question: the best model's accuracy, for less
    chosen = choose(frontier, budget_usd=options.budget_usd, target_accuracy=target)
    if progress:
        progress("training the final scorer on all of train")
    final = fit(train, options.scorer)
    out = Path(out)
    folder = Path(scorer_dir) if scorer_dir else out.with_name(out.stem + ".scorer")
    save(final, folder, extra={"dataset": grid.name,
                               "out_of_fold_train": quality(oof.first, train.correct, train.models)})
    cascade = CascadeFile(
        chosen=chosen, scorer=folder, frontier=frontier, singles=singles, dataset=grid.name, prices=options.prices,
        meta={"objective": {"budget_usd": options.budget_usd, "target_accuracy": target},
              "search": {"max_depth": options.max_depth, "order": options.order, "folds": options.folds,
                         "grid_size": options.grid_size, "train_queries": len(train),
                         "models": list(train.models)}},
    )
    cascade.write(out)
    return cascade


def mean_cost(grid: Grid, prices: dict[str, tuple[float, float]] | None) -> np.ndarray:
    return query_costs(grid, prices).mean(axis=0)


def read_prices(path: Path) -> dict[str, tuple[float, float]]:
    """A prices file, `model: [input, output]` in USD per million tokens; ValueError when it is not one."""
    raw = yaml.safe_load(path.read_text())
    try:
        return {str(m): (float(p[0]), float(p[1])) for m, p in raw.items()}
    except (AttributeError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"{path}: expected 'model: [input, output]' in USD per million tokens") from exc
