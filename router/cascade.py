"""Cascade routes: tier 1 answers; a judge scores the answer; below the tier's threshold the next tier
answers; the last tier is always accepted.

A tier is judged by its own judge when it has one (a local model's judge reads the answer's log-probs and
self-consistency samples, `router.judge`), else by the route's scorer where it knows the model; a tier that
nothing judges is accepted. Each tier is one model called through the `ModelPool` (so retries, timeouts and
cooldowns apply per tier). A tier that cannot be called is skipped, one that fails is passed over; each
escalation has a reason (`TierDecision.reason`: score, error, timeout, capacity, context_length, capability,
no_key, cooldown). When no tier accepted an answer but some tier answered, the best-scored answer is returned
marked not accepted (`DecisionTrace.accepted`), or, with `on_unaccepted: error`, the route refuses (503).

Streaming: the tiers before the accepted one are generated in full and
scored (they must be, to be judged); an accepted earlier answer is sent at once, and when the cascade
reaches the last tier, that tier is streamed token by token. Once the answer is complete, the route
settles: each tier's cost and latency, and the saving against the route's most expensive model.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Literal, Protocol, TypeVar

from router.failures import NoAcceptedAnswer, RouteFailed, RouteIncapable, RouteUnavailable
from router.judge import TierJudge, judge_request, signals_of
from router.pool import ModelPool
from router.stream import RouteStream
from router.tiers import Tier
from router.trace import DecisionTrace, TierDecision
from workers.backend import GenerationRequest, GenerationResult, Usage
from workers.errors import BackendError, FailureKind
from workers.openai_format import content_text
from workers.pricing import TokenPrice


class Scorer(Protocol):
    """P(correct) of an answer (`scorer.runtime.OnnxScorer` is one)."""

    def score(self, query: str, answer: str, model: str, confidence: float | None = None,
              previous: Sequence[tuple[str, str]] = ()) -> float: ...

    def uses_confidence(self, model: str) -> bool: ...

    def knows(self, model: str) -> bool: ...


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


def _trim_alternatives(result: GenerationResult, request: GenerationRequest) -> GenerationResult:
    """The log-probs with only as many alternatives per token as the client asked for (a judge asks more)."""
    key = "top_logprobs" if request.kind == "chat" else "logprobs"
    keep = int(request.params.get(key) or 0)
    return replace(result, choices=[replace(c, logprobs=[replace(lp, top=lp.top[:keep]) for lp in c.logprobs])
                                    if c.logprobs else c for c in result.choices])


#: What a cascade does when no tier accepted an answer but some tier answered (every higher tier was
#: unusable or failed): return the best answer marked `accepted: false`, or refuse with a 503.
OnUnaccepted = Literal["answer", "error"]

#: Why a tier was passed over, from the failure of its call.
_FAILURE_REASONS = {FailureKind.TIMEOUT: "timeout", FailureKind.CONTEXT_WINDOW: "context_length",
                    FailureKind.OVERLOADED: "capacity"}


def failure_reason(failure: RouteFailed | RouteUnavailable) -> str:
    """A failed tier's escalation reason: "timeout", "context_length", "capacity", or "error"."""
    if isinstance(failure, RouteUnavailable):
        return "cooldown"
    return _FAILURE_REASONS.get(failure.last.kind, "error")


def content_version(tiers: Sequence[Tier], judges: Mapping[str, TierJudge]) -> str:
    """8 hex digits that change whenever a tier, a threshold or a judge does."""
    parts = [f"{t.model}|{t.threshold!r}|{getattr(judges.get(t.model), 'version', '')}" for t in tiers]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]


class CascadeRoute:
    """A `Route` whose tiers are judged: by the tier's own judge (`judges`, e.g. a local model's), else by
    `scorer` where it knows the model; a tier neither judges is accepted, as the last tier always is."""

    def __init__(self, name: str, tiers: Sequence[Tier], scorer: Scorer | None, pool: ModelPool, *,
                 judges: Mapping[str, TierJudge] | None = None, on_unaccepted: OnUnaccepted = "answer",
                 label: str = "config") -> None:
        self.name = name
        self.tiers = tuple(tiers)
        self.scorer = scorer
        self.judges = dict(judges or {})
        self.on_unaccepted = on_unaccepted
        self._pool = pool
        #: Which artifacts decide (recorded on every request): where they came from ("config", or an artifact
        #: version such as "v0003") and a hash of the tiers, thresholds and judges.
        self.version = f"{label}-{content_version(self.tiers, self.judges)}"

    @property
    def models(self) -> list[str]:
        return [t.model for t in self.tiers]

    @property
    def top_model(self) -> str:
        """The last tier's model: the reference an audit asks."""
        return self.tiers[-1].model

    def price(self, model: str) -> TokenPrice:
        return self._pool.price(model)

    async def ask_top(self, request: GenerationRequest, trace: DecisionTrace) -> GenerationResult:
        """The top tier's answer to `request`, outside the cascade (a shadow audit: `gateway.audits`)."""
        return await self._pool.generate([self.top_model], request, trace)

    async def _answer_and_score(self, tier: Tier, request: GenerationRequest, trace: DecisionTrace, query: str,
                                previous: list[tuple[str, str]]) -> tuple[GenerationResult, TierDecision]:
        """The tier's answer (as the client may see it) and its decision so far: the score by the tier's
        judge (with the judge's version and the features it read), else by the route's scorer when it knows
        the model, else None (nothing judges it). Raises the pool's failures."""
        asked_logprobs = bool(request.params.get("logprobs"))
        judge = self.judges.get(tier.model)
        decision = TierDecision(tier.model, "rejected", threshold=tier.threshold)
        if judge is not None:
            result = await self._pool.generate([tier.model], judge_request(request, judge.settings), trace)
            score, features = judge.assess(query, signals_of(result))
            decision.score, decision.judge = score, judge.version
            decision.features = [round(float(f), 5) for f in features]
            return (_trim_alternatives(result, request) if asked_logprobs else _without_logprobs(result)), decision
        if self.scorer is None or not self.scorer.knows(tier.model):
            return await self._pool.generate([tier.model], request, trace), decision
        wants = self.scorer.uses_confidence(tier.model) and not asked_logprobs
        result = await self._pool.generate([tier.model], _with_logprobs(request) if wants else request, trace)
        decision.score = self.scorer.score(query, result.text, tier.model, confidence_of(result), previous)
        return (_without_logprobs(result) if wants else result), decision

    async def _judged_tiers(self, request: GenerationRequest,
                            trace: DecisionTrace) -> tuple[GenerationResult | None, _Best | None]:
        """Call and judge the tiers before the last: the first accepted answer (or None), and the best
        rejected one. A tier that cannot be called is skipped and one that fails is passed over, each with
        its reason; a tier nothing judges is accepted."""
        query = query_text(request)
        previous: list[tuple[str, str]] = []
        best: _Best | None = None
        for tier in self.tiers[:-1]:
            skip = self._pool.skip_reason(tier.model, request)
            if skip is not None:
                trace.tiers.append(TierDecision(tier.model, "skipped", threshold=tier.threshold, reason=skip))
                continue
            try:
                result, decision = await self._answer_and_score(tier, request, trace, query, previous)
            except (RouteFailed, RouteUnavailable) as failure:
                trace.tiers.append(TierDecision(tier.model, "failed", threshold=tier.threshold,
                                                reason=failure_reason(failure)))
                continue
            score = decision.score
            accepted = score is None or (tier.threshold is not None and score >= tier.threshold)
            decision.outcome, decision.reason = ("accepted", None) if accepted else ("rejected", "score")
            trace.tiers.append(decision)
            trace.answers[tier.model] = result.text
            if accepted:
                trace.model = tier.model
                trace.accepted = True
                return result, best
            trace.model = None  # the pool named it; it was not accepted
            previous.append((tier.model, result.text))
            if best is None or (score or 0.0) > best[0]:
                best = (score or 0.0, result, decision)
        return None, best

    async def generate(self, request: GenerationRequest, trace: DecisionTrace) -> GenerationResult:
        trace.version = self.version
        result, best = await self._judged_tiers(request, trace)
        if result is None:
            result = await self._last_tier(request, trace, best,
                                           lambda models: self._pool.generate(models, request, trace))
        self._settle(trace, result.usage)
        return result

    async def open_stream(self, request: GenerationRequest, trace: DecisionTrace) -> RouteStream:
        """A stream of the accepted answer; the route settles when it has finished."""
        trace.version = self.version
        accepted, best = await self._judged_tiers(request, trace)
        stream: RouteStream | None = None
        if accepted is None:
            last = await self._last_tier(request, trace, best,
                                         lambda models: self._pool.open_stream(models, request, trace))
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

    async def _last_tier(self, request: GenerationRequest, trace: DecisionTrace, best: _Best | None,
                         call: Callable[[list[str]], Awaitable[T]]) -> T | GenerationResult:
        """The last tier's answer (always accepted); when it cannot be called or fails, the best-scored
        earlier answer, marked not accepted (or, with `on_unaccepted: error`, a 503)."""
        last = self.tiers[-1]
        skip = self._pool.skip_reason(last.model, request)
        if best is not None and skip in ("no_key", "cooldown"):
            trace.tiers.append(TierDecision(last.model, "skipped", reason=skip))
            return self._unaccepted(trace, best)
        try:
            out = await call([last.model])
        except (RouteFailed, RouteUnavailable, RouteIncapable) as failure:
            incapable = isinstance(failure, RouteIncapable)
            trace.tiers.append(TierDecision(last.model, "skipped" if incapable else "failed",
                                            reason="capability" if incapable else failure_reason(failure)))
            if best is None:
                if incapable and any(t.outcome == "failed" for t in trace.tiers):
                    # some tier could take the request but failed: that, not the request, is the problem
                    raise RouteFailed(trace, [BackendError(FailureKind.UNKNOWN, f"{last.model}: cannot take this "
                                                           "request and every earlier tier failed")]) from failure
                raise
            return self._unaccepted(trace, best)
        trace.tiers.append(TierDecision(last.model, "accepted"))
        trace.accepted = True
        return out

    def _unaccepted(self, trace: DecisionTrace, best: _Best) -> GenerationResult:
        """No tier accepted an answer: the best-scored one, marked not accepted, or `NoAcceptedAnswer`."""
        if self.on_unaccepted == "error":
            raise NoAcceptedAnswer(trace)
        best[2].outcome = "fallback_accepted"
        trace.model = best[2].model
        trace.accepted = False
        return best[1]

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
