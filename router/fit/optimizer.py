"""The FrugalGPT optimizer: which models form the cascade, in which order, and each tier's threshold.

Given train-split outcomes (correctness and cost of every model on every query) and scorer probabilities
predicted out-of-fold (`crossfit`), `search` evaluates every ordered set of up to `max_depth` models and a
grid of thresholds per tier, exactly (no sampling), and `pareto` keeps the accuracy-cost frontier.

A cascade answers with tier 1; tier i's answer is accepted when its score is at least its threshold;
otherwise tier i+1 is called; the last tier is always accepted. A query's cost is the sum of the costs of
the tiers called.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from router.tiers import CascadePoint, Tier
from scorer.fit.dataset import Grid
from scorer.fit.grid_scores import GridScores, score_grid
from scorer.fit.train import TrainConfig, fit

Order = Literal["cost", "any"]


def sequences(models: Sequence[str], mean_cost: np.ndarray, max_depth: int, order: Order) -> list[tuple[int, ...]]:
    """Ordered model index tuples of length 1..max_depth: increasing mean cost (`cost`), or every order."""
    by_cost = sorted(range(len(models)), key=lambda j: (mean_cost[j], models[j]))
    out: list[tuple[int, ...]] = []
    for depth in range(1, max_depth + 1):
        if order == "cost":
            out.extend(itertools.combinations(by_cost, depth))
        else:
            out.extend(itertools.permutations(by_cost, depth))
    return out


def second_tier_pairs(seqs: Sequence[tuple[int, ...]]) -> list[tuple[int, int]]:
    """The (tier 1, tier 2) pairs whose second-tier scores a search over `seqs` needs (depth 3 only)."""
    return sorted({(s[0], s[1]) for s in seqs if len(s) >= 3})


def crossfit(train: Grid, config: TrainConfig, pairs: Sequence[tuple[int, int]], folds: int = 5,
             progress: Callable[[str], None] | None = None) -> GridScores:
    """Out-of-fold scores on `train`: each fold is scored by a scorer trained on the other folds, so no
    answer is ever scored by a scorer that saw it."""
    rng = np.random.default_rng(config.seed)
    assignment = rng.permutation(len(train)) % folds
    parts = []
    for k in range(folds):
        held = np.flatnonzero(assignment == k)
        if progress:
            progress(f"cross-fitting fold {k + 1}/{folds}")
        trained = fit(train.take(np.flatnonzero(assignment != k)), config)
        parts.append((held, score_grid(trained, config.spec, train.take(held), pairs)))
    return GridScores.gather(parts, len(train))


def thresholds(scores: np.ndarray, n: int) -> np.ndarray:
    """Up to `n` candidate thresholds: score values at evenly spaced quantiles, excluding the smallest
    score (accepting every answer is the single model, already a candidate)."""
    values = np.unique(np.quantile(scores, np.linspace(0, 1, n + 2)[1:-1], method="lower"))
    return values[values > scores.min()]


def _points_depth1(j: int, models: Sequence[str], correct: np.ndarray, cost: np.ndarray) -> list[CascadePoint]:
    return [CascadePoint((Tier(models[j]),), float(correct[:, j].mean()), float(cost[:, j].mean()), (1.0,))]


def _points_depth2(a: int, b: int, models: Sequence[str], scores: GridScores, correct: np.ndarray,
                   cost: np.ndarray, n: int) -> list[CascadePoint]:
    t1 = thresholds(scores.first[:, a], n)
    accept = (scores.first[None, :, a] >= t1[:, None]).astype(np.float64)  # (G, Q)
    q = correct.shape[0]
    acc = (accept @ correct[:, a] + (1 - accept) @ correct[:, b]) / q
    spend = cost[:, a].mean() + ((1 - accept) @ cost[:, b]) / q
    share = accept.mean(axis=1)
    return [CascadePoint((Tier(models[a], float(t)), Tier(models[b])), float(acc[i]), float(spend[i]),
                         (float(share[i]), float(1 - share[i]))) for i, t in enumerate(t1)]


def _points_depth3(a: int, b: int, c: int, models: Sequence[str], scores: GridScores, correct: np.ndarray,
                   cost: np.ndarray, n: int) -> list[CascadePoint]:
    second = scores.second[(a, b)]
    t1 = thresholds(scores.first[:, a], n)
    t2 = thresholds(second, n)
    a1 = (scores.first[None, :, a] >= t1[:, None]).astype(np.float64)  # (G1, Q)
    a2 = (second[None, :] >= t2[:, None]).astype(np.float64)  # (G2, Q)
    q = correct.shape[0]
    later_correct = a2 * correct[None, :, b] + (1 - a2) * correct[None, :, c]  # (G2, Q)
    later_cost = cost[None, :, b] + (1 - a2) * cost[None, :, c]
    acc = (a1 @ correct[:, a])[:, None] / q + ((1 - a1) @ later_correct.T) / q  # (G1, G2)
    spend = cost[:, a].mean() + ((1 - a1) @ later_cost.T) / q
    share1 = a1.mean(axis=1)
    share2 = ((1 - a1) @ a2.T) / q
    points = []
    for i, j in _pareto_cells(acc, spend):
        tiers = (Tier(models[a], float(t1[i])), Tier(models[b], float(t2[j])), Tier(models[c]))
        shares = (float(share1[i]), float(share2[i, j]), float(1 - share1[i] - share2[i, j]))
        points.append(CascadePoint(tiers, float(acc[i, j]), float(spend[i, j]), shares))
    return points


def _pareto_cells(acc: np.ndarray, spend: np.ndarray) -> list[tuple[int, int]]:
    """Grid cells not dominated by another cell of the same grid (keeps the search's memory small)."""
    flat = np.lexsort((-acc.ravel(), spend.ravel()))
    best = -np.inf
    cells = []
    for k in flat:
        if acc.flat[k] > best:
            best = acc.flat[k]
            cells.append(divmod(int(k), acc.shape[1]))
    return cells


def search(models: Sequence[str], scores: GridScores, correct: np.ndarray, cost: np.ndarray,
           seqs: Sequence[tuple[int, ...]], grid_size: int = 24) -> list[CascadePoint]:
    """Every cascade of `seqs` at every threshold combination of the grid (the dominated ones of each
    depth-3 grid already dropped)."""
    points: list[CascadePoint] = []
    for seq in seqs:
        if len(seq) == 1:
            points += _points_depth1(seq[0], models, correct, cost)
        elif len(seq) == 2:
            points += _points_depth2(*seq, models, scores, correct, cost, grid_size * 2)
        elif len(seq) == 3:
            points += _points_depth3(*seq, models, scores, correct, cost, grid_size)
        else:
            raise ValueError("the optimizer searches cascades of up to 3 tiers")
    return points


def pareto(points: Sequence[CascadePoint]) -> list[CascadePoint]:
    """The frontier: by increasing cost, each point more accurate than every cheaper one."""
    frontier: list[CascadePoint] = []
    for point in sorted(points, key=lambda p: (p.cost_usd, -p.accuracy, len(p.tiers))):
        if not frontier or point.accuracy > frontier[-1].accuracy + 1e-12:
            frontier.append(point)
    return frontier


def choose(frontier: Sequence[CascadePoint], *, budget_usd: float | None = None,
           target_accuracy: float | None = None) -> CascadePoint:
    """The most accurate point within `budget_usd`, or the cheapest reaching `target_accuracy` (when
    nothing reaches it: the most accurate point)."""
    if budget_usd is not None:
        affordable = [p for p in frontier if p.cost_usd <= budget_usd]
        if not affordable:
            return min(frontier, key=lambda p: p.cost_usd)
        return max(affordable, key=lambda p: (p.accuracy, -p.cost_usd))
    if target_accuracy is not None:
        reaching = [p for p in frontier if p.accuracy >= target_accuracy - 1e-12]
        if reaching:
            return min(reaching, key=lambda p: p.cost_usd)
    return max(frontier, key=lambda p: (p.accuracy, -p.cost_usd))
