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
    #: "ok", a `workers.errors.FailureKind` value, "client_closed", or a skip: "skipped_cooldown" (the model
    #: is cooling down) or "skipped_capability" (the request needs what the model cannot do).
    outcome: str
    latency_s: float = 0.0
    cost_usd: float = 0.0
    status: int | None = None
    message: str | None = None

    @property
    def called(self) -> bool:
        """Whether the model was called (not skipped)."""
        return not self.outcome.startswith("skipped_")


@dataclass(slots=True)
class TierDecision:
    """One tier of a cascade: its answer's score against its threshold, and what it cost."""

    model: str
    #: "accepted", "rejected", "failed" (no answer after retries), "skipped" (not called: `reason` says why),
    #: or "fallback_accepted" (every later tier failed, so the best-scored rejected answer was returned).
    outcome: str
    score: float | None = None
    threshold: float | None = None
    cost_usd: float = 0.0
    latency_s: float = 0.0
    #: Why the cascade went past this tier: "score" (rejected by its judge), "error", "timeout",
    #: "capacity" (its queue was full), "context_length" (the prompt does not fit it), "capability" (the
    #: request needs tools, images, audio or files it cannot take), "no_key" (its API key is not set) or
    #: "cooldown" (it failed repeatedly just now). None for the tier that answered.
    reason: str | None = None
    #: Tiers judged by a judge: which judge (its version), and the features it read (for retraining it).
    judge: str | None = None
    features: list[float] | None = None


@dataclass(slots=True)
class CompressionRecord:
    """Prompt compression before one model that answered (docs/compression.md). Tokens are counted by the
    local scoring model's tokenizer, so `saved_usd` (removed tokens x the model's input price) is an estimate."""

    model: str
    #: "compressed", or why not: "opted_out", "too_short", "nothing_compressible".
    outcome: str
    tokens_before: int = 0
    tokens_after: int = 0
    ratio: float = 1.0
    latency_s: float = 0.0
    saved_usd: float = 0.0

    @property
    def tokens_removed(self) -> int:
        return self.tokens_before - self.tokens_after


@dataclass(slots=True)
class DecisionTrace:
    route: str
    attempts: list[Attempt] = field(default_factory=list)
    #: The model whose answer was returned, if any.
    model: str | None = None
    #: Cascade routes: each tier tried, in order (empty for other routes).
    tiers: list[TierDecision] = field(default_factory=list)
    #: Cascade routes: whether the answer returned was accepted (by a judge, or as the last tier's); False
    #: when it is the best of the rejected answers because no higher tier could answer.
    accepted: bool | None = None
    #: Cascade routes: what the route's most expensive model would have cost for the answer returned,
    #: minus what the cascade cost (negative when the cascade cost more).
    saved_usd: float | None = None
    #: Answered from the response cache: result ("hit" / "semantic-hit"), what it saved, the entry's age
    #: and, for semantic hits, the similarity of the matched question.
    cache: dict[str, Any] | None = None
    #: Prompt compression applied (or declined) before the models that answered.
    compressions: list[CompressionRecord] = field(default_factory=list)
    #: Cascade routes: the version of the route's artifacts (judges, thresholds) that decided.
    version: str | None = None
    #: Cascade routes: each tier's answer text while the request lives (what audits compare); never
    #: serialised into the ledger.
    answers: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def cache_hit(cls, route: str, model: str, cache: dict[str, Any]) -> DecisionTrace:
        """A request answered from the response cache: no model was called (`cache` says which entry)."""
        return cls(route=route, model=model, cache=cache)

    def absorb(self, other: DecisionTrace) -> None:
        """Add what another call of the same request did (a further prompt of a legacy completion): its
        attempts, tiers and compression; the model is the last one that answered; savings add up."""
        self.attempts += other.attempts
        self.tiers += other.tiers
        self.compressions += other.compressions
        self.model = other.model or self.model
        self.version = other.version or self.version
        if other.accepted is not None:
            self.accepted = other.accepted if self.accepted is None else self.accepted and other.accepted
        if other.saved_usd is not None:
            self.saved_usd = (self.saved_usd or 0.0) + other.saved_usd

    @property
    def accepted_tier(self) -> int | None:
        """1-based number of the tier whose answer was returned (cascade routes)."""
        for number, tier in enumerate(self.tiers, start=1):
            if tier.outcome in ("accepted", "fallback_accepted"):
                return number
        return None

    @property
    def models_tried(self) -> list[str]:
        seen: list[str] = []
        for attempt in self.attempts:
            if attempt.called and attempt.model not in seen:
                seen.append(attempt.model)
        return seen

    @property
    def cost_usd(self) -> float:
        return sum(a.cost_usd for a in self.attempts)

    @property
    def retries(self) -> int:
        """Calls that repeated a model already tried."""
        calls = [a.model for a in self.attempts if a.called]
        return len(calls) - len(set(calls))

    @property
    def fallbacks(self) -> int:
        """Moves to a later model of the route after an earlier one failed."""
        return max(0, len(self.models_tried) - 1)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "route": self.route,
            "model": self.model,
            "attempts": [asdict(a) for a in self.attempts],
        }
        if self.cache is not None:
            body["cache"] = self.cache
        if self.version is not None:
            body["version"] = self.version
        if self.tiers:
            body["tiers"] = [asdict(t) for t in self.tiers]
            body["accepted_tier"] = self.accepted_tier
            body["accepted"] = self.accepted
            body["saved_usd"] = self.saved_usd
        if self.compressions:
            body["compression"] = [asdict(c) for c in self.compressions]
        return body
