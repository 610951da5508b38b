"""Evaluating cascades on labelled outcomes: the chosen one query by query, exactly as the gateway runs
it, and every frontier point at once."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from router.tiers import CascadePoint, Tier
from scorer.features import FeatureSpec
from scorer.fit.dataset import Grid
from scorer.fit.grid_scores import Predictor, score_grid


class AnswerScorer(Predictor, Protocol):
    """What evaluation needs of a scorer (`scorer.runtime.OnnxScorer` is one)."""

    spec: FeatureSpec

    def score(self, query: str, answer: str, model: str, confidence: float | None = None,
              previous: Sequence[tuple[str, str]] = ()) -> float: ...


def query_costs(grid: Grid, prices: dict[str, tuple[float, float]] | None) -> np.ndarray:
    """(Q, M) USD per query: the data's `cost_usd`, or tokens at `prices` (USD per million, in/out)."""
    if prices is None:
        if np.isnan(grid.cost_usd).any():
            raise ValueError(f"{grid.name}: some rows have no cost_usd; give prices to cost them from tokens")
        return grid.cost_usd
    missing = [m for m in grid.models if m not in prices]
    if missing:
        raise ValueError(f"no prices for {', '.join(missing)}")
    price_in = np.array([prices[m][0] for m in grid.models]) / 1e6
    price_out = np.array([prices[m][1] for m in grid.models]) / 1e6
    if np.isnan(grid.input_tokens).any() or np.isnan(grid.output_tokens).any():
        raise ValueError(f"{grid.name}: token counts are missing, so costs cannot come from prices")
    return grid.input_tokens * price_in + grid.output_tokens * price_out


@dataclass
class Replay:
    """A cascade run over a grid, query by query."""

    point: CascadePoint
    #: Per query, the index of the tier whose answer was returned.
    answered_by: np.ndarray
    #: Per query, the scores of the tiers that were scored.
    scores: list[list[float]]


def replay(tiers: Sequence[Tier], grid: Grid, cost: np.ndarray, scorer: AnswerScorer) -> Replay:
    """Run the cascade on every query: what the gateway does, with recorded answers in place of calls."""
    columns = [grid.models.index(t.model) for t in tiers]
    answered_by = np.zeros(len(grid), dtype=int)
    correct = np.zeros(len(grid))
    spend = np.zeros(len(grid))
    all_scores: list[list[float]] = []
    for q in range(len(grid)):
        previous: list[tuple[str, str]] = []
        scores: list[float] = []
        for k, (tier, j) in enumerate(zip(tiers, columns, strict=True)):
            spend[q] += cost[q, j]
            answer = grid.answers[q][j]
            if tier.threshold is None or k == len(tiers) - 1:
                break
            confidence = grid.confidence[q, j]
            score = scorer.score(grid.queries[q], answer, tier.model,
                                 None if math.isnan(confidence) else float(confidence), previous)
            scores.append(score)
            if score >= tier.threshold:
                break
            previous.append((tier.model, answer))
        answered_by[q] = k
        correct[q] = grid.correct[q, columns[k]]
        all_scores.append(scores)
    shares = tuple(float(np.mean(answered_by == k)) for k in range(len(tiers)))
    point = CascadePoint(tuple(tiers), float(correct.mean()), float(spend.mean()), shares)
    return Replay(point, answered_by, all_scores)


def evaluate_points(points: Sequence[CascadePoint], grid: Grid, cost: np.ndarray,
                    scorer: AnswerScorer) -> list[CascadePoint]:
    """Each point's cascade on `grid` (vectorised: features computed once per model)."""
    index = {m: j for j, m in enumerate(grid.models)}
    pairs = sorted({(index[p.tiers[0].model], index[p.tiers[1].model]) for p in points if len(p.tiers) >= 3})
    needed = sorted({m for p in points for m in p.models})
    sub = grid.with_models(needed)
    sub_index = {m: j for j, m in enumerate(sub.models)}
    scores = score_grid(scorer, scorer.spec, sub,
                        [(sub_index[grid.models[a]], sub_index[grid.models[b]]) for a, b in pairs])
    out = []
    for point in points:
        cols = [sub_index[m] for m in point.models]
        q = len(sub)
        undecided = np.ones(q, dtype=bool)
        correct = np.zeros(q)
        spend = np.zeros(q)
        shares = []
        for k, (tier, j) in enumerate(zip(point.tiers, cols, strict=True)):
            spend += undecided * cost[:, index[tier.model]]
            if k == len(point.tiers) - 1:
                accept = undecided
            else:
                s = scores.first[:, j] if k == 0 else scores.second[(cols[0], j)]
                if k > 1:
                    raise ValueError("vectorised evaluation covers cascades of up to 3 tiers")
                accept = undecided & (s >= tier.threshold)
            correct += accept * sub.correct[:, j]
            shares.append(float(accept.mean()))
            undecided &= ~accept
        out.append(CascadePoint(point.tiers, float(correct.mean()), float(spend.mean()), tuple(shares)))
    return out


def single_models(grid: Grid, cost: np.ndarray) -> list[CascadePoint]:
    return [CascadePoint((Tier(m),), float(grid.correct[:, j].mean()), float(cost[:, j].mean()), (1.0,))
            for j, m in enumerate(grid.models)]


def best_single(singles: Sequence[CascadePoint]) -> CascadePoint:
    """The most accurate single model (the cheaper one on a tie)."""
    return max(singles, key=lambda p: (round(p.accuracy, 12), -p.cost_usd))
