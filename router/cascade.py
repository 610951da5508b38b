"""Executing a cascade route: tier 1 answers; the scorer judges the answer; below the tier's threshold the
next tier answers; the last tier is always accepted.

Each tier is one model called through the `FallbackRouter` (so retries, timeouts and cooldowns apply per
tier). A tier that fails is passed over; if every later tier fails too, the best-scored answer already
received is returned rather than an error. Streaming: the tiers before the accepted one are generated in
full and scored (they must be, to be judged); an accepted earlier answer is sent at once, and when the
cascade reaches the last tier, that tier is streamed token by token.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

from router.fallback import FallbackRouter, OpenedStream, RouteFailed, RouteUnavailable
from router.optimizer import Tier
from router.trace import DecisionTrace, TierDecision
from workers.backend import GenerationRequest, GenerationResult, StreamChunk, Usage
from workers.openai_format import content_text


class Scorer(Protocol):
    """P(correct) of an answer (`scorer.runtime.OnnxScorer` is one)."""

    def score(self, query: str, answer: str, model: str, confidence: float | None = None,
              previous: Sequence[tuple[str, str]] = ()) -> float: ...

    def uses_confidence(self, model: str) -> bool: ...


T = TypeVar("T")

#: A rejected answer kept in case every later tier fails: (score, answer, its tier's decision).
_Best = tuple[float, GenerationResult, TierDecision]


@dataclass(frozen=True)
class CascadeRoute:
    name: str
    tiers: tuple[Tier, ...]
    scorer: Scorer


def query_text(request: GenerationRequest) -> str:
    """The query as the scorer was trained on it: the prompt, or the last user message, preceded by the
    system prompt as `System: ...\\n\\nUser: ...` when there is one (the data pack's convention)."""
    if request.kind == "completion":
        return request.prompt
    user = next((content_text(m.get("content")) for m in reversed(request.messages) if m.get("role") == "user"), "")
    system = [content_text(m.get("content")) for m in request.messages if m.get("role") in ("system", "developer")]
    return f"System: {system[0]}\n\nUser: {user}" if system else user


def confidence_of(result: GenerationResult) -> float | None:
    """The answer's log-probability (sum over its tokens), when the provider returned token log-probs."""
    choice = result.choices[0] if result.choices else None
    if choice is None or not choice.logprobs:
        return None
    total = math.fsum(lp.logprob for lp in choice.logprobs)
    return total if math.isfinite(total) else None


def _with_logprobs(request: GenerationRequest) -> GenerationRequest:
    params = dict(request.params)
    params["logprobs"] = True if request.kind == "chat" else max(1, int(params.get("logprobs") or 0))
    return replace(request, params=params)


def _without_logprobs(result: GenerationResult) -> GenerationResult:
    return replace(result, choices=[replace(c, logprobs=None) for c in result.choices])


async def _replayed(result: GenerationResult) -> AsyncIterator[StreamChunk]:
    """A finished answer as a stream: its text at once, the finish, then usage and cost."""
    for choice in result.choices:
        yield StreamChunk(choice.index, choice.text, None, choice.logprobs)
        yield StreamChunk(choice.index, "", choice.finish_reason or "stop")
    yield StreamChunk(usage=result.usage, cost_usd=result.cost_usd)


class CascadeRunner:
    """Runs cascade routes over the fallback router's backends."""

    def __init__(self, router: FallbackRouter, routes: dict[str, CascadeRoute]) -> None:
        self.router = router
        self.routes = routes

    def get(self, name: str) -> CascadeRoute | None:
        return self.routes.get(name)

    async def _judged_tiers(self, route: CascadeRoute, request: GenerationRequest,
                            trace: DecisionTrace) -> tuple[GenerationResult | None, _Best | None]:
        """Call and score the tiers before the last: the first accepted answer (or None), and the best
        rejected one (tier failures are recorded and passed over)."""
        query = query_text(request)
        asked_logprobs = bool(request.params.get("logprobs"))
        previous: list[tuple[str, str]] = []
        best: _Best | None = None
        for tier in route.tiers[:-1]:
            wants = route.scorer.uses_confidence(tier.model) and not asked_logprobs
            try:
                result = await self.router.generate([tier.model], _with_logprobs(request) if wants else request,
                                                    trace)
            except (RouteFailed, RouteUnavailable):
                trace.tiers.append(TierDecision(tier.model, "failed", threshold=tier.threshold))
                continue
            score = route.scorer.score(query, result.text, tier.model, confidence_of(result), previous)
            accepted = tier.threshold is not None and score >= tier.threshold
            decision = TierDecision(tier.model, "accepted" if accepted else "rejected", score, tier.threshold)
            trace.tiers.append(decision)
            if wants:
                result = _without_logprobs(result)
            if accepted:
                trace.model = tier.model
                return result, best
            trace.model = None  # the fallback router named it; it was not accepted
            previous.append((tier.model, result.text))
            if best is None or score > best[0]:
                best = (score, result, decision)
        return None, best

    async def generate(self, route: CascadeRoute, request: GenerationRequest,
                       trace: DecisionTrace) -> GenerationResult:
        result, best = await self._judged_tiers(route, request, trace)
        if result is None:
            result = await self._last_tier(route, trace, best,
                                           lambda models: self.router.generate(models, request, trace))
        self.settle(route, trace, result.usage)
        return result

    async def open_stream(self, route: CascadeRoute, request: GenerationRequest,
                          trace: DecisionTrace) -> OpenedStream:
        """A stream of the accepted answer; `settle` must be called with its usage once it has ended."""
        accepted, best = await self._judged_tiers(route, request, trace)
        if accepted is None:
            last = await self._last_tier(route, trace, best,
                                         lambda models: self.router.open_stream(models, request, trace))
            if isinstance(last, OpenedStream):
                self.tally(trace)
                return last
            accepted = last
        self.tally(trace)
        chunks = _replayed(accepted)
        return OpenedStream(accepted.model, await anext(chunks), chunks)

    async def _last_tier(self, route: CascadeRoute, trace: DecisionTrace, best: _Best | None,
                         call: Callable[[list[str]], Awaitable[T]]) -> T | GenerationResult:
        """The last tier's answer (always accepted); if it fails, the best-scored earlier answer."""
        last = route.tiers[-1]
        try:
            out = await call([last.model])
        except (RouteFailed, RouteUnavailable):
            trace.tiers.append(TierDecision(last.model, "failed"))
            if best is None:
                raise
            best[2].outcome = "fallback_accepted"
            trace.model = best[2].model
            return best[1]
        trace.tiers.append(TierDecision(last.model, "accepted"))
        return out

    @staticmethod
    def tally(trace: DecisionTrace) -> None:
        """Each tier's cost and latency, from the calls made so far."""
        for tier in trace.tiers:
            calls = [a for a in trace.attempts if a.model == tier.model]
            tier.cost_usd = sum(a.cost_usd for a in calls)
            tier.latency_s = sum(a.latency_s for a in calls)

    def settle(self, route: CascadeRoute, trace: DecisionTrace, usage: Usage) -> None:
        """Once the answer is complete: each tier's cost and latency, and the saving against the route's
        most expensive model for the answer returned (its usage at that model's prices)."""
        self.tally(trace)
        prices = [self.router.backends[t.model].price for t in route.tiers]
        reference = max(p.cost(usage.prompt_tokens, usage.completion_tokens) for p in prices)
        trace.saved_usd = reference - trace.cost_usd
