"""Whether a candidate judge or threshold may replace the current one (docs/learning.md, "The promotion rule").

The labelled answers are split by time: the oldest `1 - test_share` train the candidate, the newest test both
artifacts (answers of one query stay on one side). On the test part each artifact accepts the answers whose
score reaches its threshold, and two figures are weighed (each answer by 1 / its sampling rate):

- false-accept rate: the weighted share of bad answers among those it accepts;
- accept share: the weighted share of answers it keeps on the cheap tier (what saves money).

The candidate is promoted when the test part holds at least `min_test` labelled answers, its false-accept
rate is at most the route's target, and either the current one is shown to be above the target (the
Wilson 95% interval of its false accepts lies wholly above it: one wrong answer in one accepted is not
evidence) or the candidate's accept share is higher. Anything else is refused, and nothing is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.estimates import wilson
from gateway.fit.ledger_data import LabelledAnswer


def time_split(answers: Sequence[LabelledAnswer], test_share: float) -> tuple[list[int], list[int]]:
    """Indices of train (older) and test (newer) answers; a group met in test is dropped from train."""
    order = sorted(range(len(answers)), key=lambda i: answers[i].created_at)
    cut = int(round(len(order) * (1 - test_share)))
    test = order[cut:]
    test_groups = {answers[i].group for i in test}
    train = [i for i in order[:cut] if answers[i].group not in test_groups]
    return train, test


@dataclass(frozen=True)
class Figures:
    false_accept: float | None
    accept_share: float
    n: int
    accepted: int
    #: Accepted answers labelled bad (a count, unweighted).
    bad: int = 0

    @property
    def above_target_low(self) -> float:
        """The low end of the Wilson 95% interval of the false-accept rate (0 when nothing was accepted)."""
        interval = wilson(self.bad, self.accepted)
        return 0.0 if interval is None else interval[1]

    def to_json(self) -> dict[str, Any]:
        return {"false_accept": None if self.false_accept is None else round(self.false_accept, 4),
                "false_accept_low": round(self.above_target_low, 4), "accept_share": round(self.accept_share, 4),
                "labelled": self.n, "accepted": self.accepted, "accepted_bad": self.bad}


def evaluate(scores: np.ndarray, good: np.ndarray, weights: np.ndarray, threshold: float) -> Figures:
    accepted = scores >= threshold
    total = float(weights.sum())
    kept = float(weights[accepted].sum())
    bad = float(weights[accepted & ~good].sum())
    return Figures(bad / kept if kept else None, kept / total if total else 0.0, len(scores), int(accepted.sum()),
                   int((accepted & ~good).sum()))


def choose_threshold(scores: np.ndarray, good: np.ndarray, weights: np.ndarray, target: float,
                     confident: bool = True) -> float:
    """The threshold keeping the largest weighted share of answers whose false-accept rate is within `target`;
    1.0 (accept almost nothing) when no threshold is. `confident`: within it means the Wilson 95% interval's
    high end of the false accepts (counted) is at most `target` as well as the weighted estimate, so that a
    threshold fitted on few labels does not sit on the edge and miss the target on the next ones."""
    best, best_share = 1.0, -1.0
    for t in np.unique(scores):
        figures = evaluate(scores, good, weights, float(t))
        if figures.false_accept is None or figures.false_accept > target or figures.accept_share <= best_share:
            continue
        if confident and (interval := wilson(figures.bad, figures.accepted)) is not None and interval[2] > target:
            continue
        best, best_share = float(t), figures.accept_share
    return best


@dataclass
class Decision:
    promote: bool
    reason: str
    current: Figures | None = None
    candidate: Figures | None = None

    def to_json(self) -> dict[str, Any]:
        return {"promote": self.promote, "reason": self.reason,
                "current": self.current.to_json() if self.current else None,
                "candidate": self.candidate.to_json() if self.candidate else None}


def decide(current: Figures, candidate: Figures, target: float, min_test: int) -> Decision:
    """The promotion rule (module docstring)."""
    if candidate.n < min_test:
        return Decision(False, f"not enough held-out labels: {candidate.n} < {min_test}", current, candidate)
    if candidate.false_accept is not None and candidate.false_accept > target:
        return Decision(False, f"the candidate's false-accept rate {candidate.false_accept:.3f} is above the target "
                        f"{target}", current, candidate)
    if current.false_accept is not None and current.above_target_low > target:
        return Decision(True, f"the current false-accept rate {current.false_accept:.3f} is above the target {target} "
                        f"(95% interval from {current.above_target_low:.3f}); the candidate's is within it", current,
                        candidate)
    if candidate.accept_share > current.accept_share:
        return Decision(True, f"within the target, it keeps more answers on the cheap tier "
                        f"({candidate.accept_share:.3f} against {current.accept_share:.3f})", current, candidate)
    return Decision(False, f"not better: accept share {candidate.accept_share:.3f} against "
                    f"{current.accept_share:.3f} at the target {target}", current, candidate)
