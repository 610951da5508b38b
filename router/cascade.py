"""Cascade routes: tier 1 answers; the scorer judges the answer; below the tier's threshold the next tier
answers; the last tier is always accepted.

Each tier is one model called through the `ModelPool` (so retries, timeouts and cooldowns apply per tier).
A tier that fails is passed over; if every later tier fails too, the best-scored answer already received is
returned rather than an error. Streaming: the tiers before the accepted one are generated in full and
scored (they must be, to be judged); an accepted earlier answer is sent at once, and when the cascade
reaches the last tier, that tier is streamed token by token. Once the answer is complete, the route
settles: each tier's cost and latency, and the saving against the route's most expensive model.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Protocol, TypeVar

from router.failures import RouteFailed, RouteIncapable, RouteUnavailable
from router.pool import ModelPool
from router.stream import RouteStream
from router.tiers import Tier
from router.trace import DecisionTrace, TierDecision
from workers.backend import GenerationRequest, GenerationResult, Usage
from workers.errors import BackendError, FailureKind
from workers.openai_format import content_text


class Scorer(Protocol):
    """P(correct) of an answer (`scorer.runtime.OnnxScorer` is one)."""

    def score(self, query: str, answer: str, model: str, confidence: float | None = None,
              previous: Sequence[tuple[str, str]] = ()) -> float: ...

    def uses_confidence(self, model: str) -> bool: ...


T = TypeVar("T")

#: A rejected answer kept in case every later tier fails: (score, answer, its tier's decision).
_Best = tuple[float, GenerationResult, TierDecision]


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


class CascadeRoute:
    """A `Route` whose tiers are judged by `scorer`."""

    def __init__(self, name: str, tiers: Sequence[Tier], scorer: Scorer, pool: ModelPool) -> None:
        self.name = name
        self.tiers = tuple(tiers)
        self.scorer = scorer
        self._pool = pool

    @property
    def models(self) -> list[str]:
        return [t.model for t in self.tiers]

    async def _judged_tiers(self, request: GenerationRequest,
                            trace: DecisionTrace) -> tuple[GenerationResult | None, _Best | None]:
        """Call and score the tiers before the last: the first accepted answer (or None), and the best
        rejected one (tier failures are recorded and passed over)."""
        query = query_text(request)
        asked_logprobs = bool(request.params.get("logprobs"))
        previous: list[tuple[str, str]] = []
        best: _Best | None = None
        for tier in self.tiers[:-1]:
            wants = self.scorer.uses_confidence(tier.model) and not asked_logprobs
            if not self._pool.can_take(tier.model, request):
                trace.tiers.append(TierDecision(tier.model, "skipped", threshold=tier.threshold, reason="capability"))
                continue
            try:
                result = await self._pool.generate([tier.model], _with_logprobs(request) if wants else request,
                                                   trace)
            except (RouteFailed, RouteUnavailable):
                trace.tiers.append(TierDecision(tier.model, "failed", threshold=tier.threshold))
                continue
            score = self.scorer.score(query, result.text, tier.model, confidence_of(result), previous)
            accepted = tier.threshold is not None and score >= tier.threshold
            decision = TierDecision(tier.model, "accepted" if accepted else "rejected", score, tier.threshold)
            trace.tiers.append(decision)
            if wants:
                result = _without_logprobs(result)
            if accepted:
                trace.model = tier.model
                return result, best
            trace.model = None  # the pool named it; it was not accepted
            previous.append((tier.model, result.text))
            if best is None or score > best[0]:
                best = (score, result, decision)
        return None, best

    async def generate(self, request: GenerationRequest, trace: DecisionTrace) -> GenerationResult:
        result, best = await self._judged_tiers(request, trace)
        if result is None:
            result = await self._last_tier(trace, best, lambda models: self._pool.generate(models, request, trace))
        self._settle(trace, result.usage)
        return result

    async def open_stream(self, request: GenerationRequest, trace: DecisionTrace) -> RouteStream:
        """A stream of the accepted answer; the route settles when it has finished."""
        accepted, best = await self._judged_tiers(request, trace)
        stream: RouteStream | None = None
        if accepted is None:
            last = await self._last_tier(trace, best, lambda models: self._pool.open_stream(models, request, trace))
            if isinstance(last, RouteStream):
                stream = last
            else:
                accepted = last
        if stream is None:
            assert accepted is not None
            stream = RouteStream.replay(accepted, trace=trace, request=request, price=self._pool.price(accepted.model))
        self._tally(trace)
        stream.on_finish(lambda usage: self._settle(trace, usage))
        return stream

    async def _last_tier(self, trace: DecisionTrace, best: _Best | None,
                         call: Callable[[list[str]], Awaitable[T]]) -> T | GenerationResult:
        """The last tier's answer (always accepted); if it fails, the best-scored earlier answer."""
        last = self.tiers[-1]
        try:
            out = await call([last.model])
        except (RouteFailed, RouteUnavailable, RouteIncapable) as failure:
            skipped = isinstance(failure, RouteIncapable)
            trace.tiers.append(TierDecision(last.model, "skipped" if skipped else "failed",
                                            reason="capability" if skipped else None))
            if best is None:
                if skipped and any(t.outcome == "failed" for t in trace.tiers):
                    # some tier could take the request but failed: that, not the request, is the problem
                    raise RouteFailed(trace, [BackendError(FailureKind.UNKNOWN, f"{last.model}: cannot take this "
                                                           "request and every earlier tier failed")]) from failure
                raise
            best[2].outcome = "fallback_accepted"
            trace.model = best[2].model
            return best[1]
        trace.tiers.append(TierDecision(last.model, "accepted"))
        return out

    @staticmethod
    def _tally(trace: DecisionTrace) -> None:
        """Each tier's cost and latency, from the calls made so far."""
        for tier in trace.tiers:
            calls = [a for a in trace.attempts if a.model == tier.model]
            tier.cost_usd = sum(a.cost_usd for a in calls)
            tier.latency_s = sum(a.latency_s for a in calls)

    def _settle(self, trace: DecisionTrace, usage: Usage) -> None:
        """Once the answer is complete: each tier's cost and latency, and the saving against the route's
        most expensive model for the answer returned (its usage at that model's prices)."""
        self._tally(trace)
        reference = max(self._pool.price(t.model).cost(usage.prompt_tokens, usage.completion_tokens)
                        for t in self.tiers)
        trace.saved_usd = reference - trace.cost_usd
