"""The decision trace: what the router tried for one request, what it cost, and what answered.

Born here, read by the gateway (response headers, ledger, metrics) and, later, the dashboard.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class Attempt:
    """One call to one model."""

    model: str
    #: "ok", a `workers.errors.FailureKind` value, or "skipped_cooldown".
    outcome: str
    latency_s: float = 0.0
    cost_usd: float = 0.0
    status: int | None = None
    message: str | None = None


@dataclass(slots=True)
class DecisionTrace:
    route: str
    attempts: list[Attempt] = field(default_factory=list)
    #: The model whose answer was returned, if any.
    model: str | None = None

    @property
    def models_tried(self) -> list[str]:
        seen: list[str] = []
        for attempt in self.attempts:
            if attempt.outcome != "skipped_cooldown" and attempt.model not in seen:
                seen.append(attempt.model)
        return seen

    @property
    def cost_usd(self) -> float:
        return sum(a.cost_usd for a in self.attempts)

    @property
    def retries(self) -> int:
        """Calls that repeated a model already tried."""
        calls = [a.model for a in self.attempts if a.outcome != "skipped_cooldown"]
        return len(calls) - len(set(calls))

    @property
    def fallbacks(self) -> int:
        """Moves to a later model of the route after an earlier one failed."""
        return max(0, len(self.models_tried) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "model": self.model,
            "attempts": [asdict(a) for a in self.attempts],
        }
