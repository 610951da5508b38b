"""A cascade's shape: its tiers (model and acceptance threshold), and a fitted cascade with how it did.

Value types shared by serving (`router.cascade`, `router.cascade_file`) and fitting (`router.fit`); they
import nothing, so the serving path never loads the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tier:
    model: str
    #: Accept this tier's answer when its score >= threshold; None for the last tier (always accepted).
    threshold: float | None = None


@dataclass(frozen=True)
class CascadePoint:
    """A cascade and how it did on a set of queries."""

    tiers: tuple[Tier, ...]
    accuracy: float
    cost_usd: float
    #: Share of queries answered by each tier.
    shares: tuple[float, ...]

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(t.model for t in self.tiers)
