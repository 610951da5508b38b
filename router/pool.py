"""Calling models: each model of a list in order, retries with backoff on retryable failures, cooldowns,
per-model timeouts and prompt compression. Routes (`router.fallback`, `router.cascade`) are built on it.

The first model that answers wins; a failure that says the request itself is wrong (upstream 400) stops at
once, since every model would reject it. Every call, failed or not, is an `Attempt` in the decision trace.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from router.compression import CompressionOutcome, CompressionRules, trace_record
from router.cooldown import Cooldown
from router.failures import RouteFailed, RouteIncapable, RouteUnavailable
from router.stream import RouteStream, close_iterator
from router.trace import Attempt, DecisionTrace
from workers.backend import Backend, GenerationRequest, GenerationResult, StreamChunk
from workers.errors import CLIENT_FAULT, NOT_UNHEALTHY, BackendError, FailureKind
from workers.pricing import TokenPrice

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    backoff_base_s: float = 0.25
    backoff_max_s: float = 4.0

    def delay(self, retry: int, hint_s: float | None, rand: Callable[[], float] = random.random) -> float:
        """Exponential backoff with full jitter; an upstream Retry-After is honoured up to the cap."""
        backoff = min(self.backoff_max_s, self.backoff_base_s * (2**retry)) * rand()
        if hint_s is not None:
            backoff = max(backoff, hint_s)
        return min(backoff, self.backoff_max_s)


class ModelPool:
    """The configured models (their backends) and how each is called."""

    def __init__(
        self,
        backends: dict[str, Backend],
        *,
        max_retries: dict[str, int],
        timeouts: dict[str, float],
        retry: RetryPolicy,
        cooldown: Cooldown,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        compression: CompressionRules | None = None,
        capabilities: dict[str, frozenset[str]] | None = None,
    ) -> None:
        self.backends = backends
        #: What each model can take beyond text; a model not named here is assumed to take anything.
        self.capabilities = capabilities or {}
        self.max_retries = max_retries
        self.timeouts = timeouts
        self.retry = retry
        self.cooldown = cooldown
        self._sleep = sleep
        self.compression = compression

    def price(self, model: str) -> TokenPrice:
        return self.backends[model].price

    def _for(self, model: str, request: GenerationRequest) -> GenerationRequest:
        """`request` with `model`'s own timeout."""
        timeout = self.timeouts.get(model)
        return request if timeout is None or timeout == request.timeout_s else replace(request, timeout_s=timeout)

    async def _compressed(self, model: str, request: GenerationRequest, trace: DecisionTrace,
                          done: dict[str, CompressionOutcome | None]) -> CompressionOutcome | None:
        """The compression that applies before `model` (docs/compression.md), computed once per model of a
        call (retries reuse it)."""
        if self.compression is None:
            return None
        if model not in done:
            done[model] = await self.compression.apply(trace.route, model, self.price(model), request)
        return done[model]

    def _answered(self, model: str, compressed: CompressionOutcome | None, trace: DecisionTrace) -> None:
        if compressed is not None:
            trace.compressions.append(trace_record(model, compressed, self.price(model)))

    def can_take(self, model: str, request: GenerationRequest) -> bool:
        """Whether `model` declares everything the request needs (tools, images, audio, files)."""
        return request.needs <= self.capabilities.get(model, request.needs)

    def skip_reason(self, model: str, request: GenerationRequest) -> str | None:
        """Why `model` cannot be called for `request` now, or None: "capability" (the request needs what it
        cannot take), "no_key" (its API key is not set), "cooldown" (it failed repeatedly just now)."""
        if not self.can_take(model, request):
            return "capability"
        if getattr(self.backends[model], "missing_key_env", None):
            return "no_key"
        if self.cooldown.remaining(model) > 0:
            return "cooldown"
        return None

    def _runnable(self, models: list[str], request: GenerationRequest, trace: DecisionTrace) -> list[str]:
        capable = []
        for model in models:
            if self.can_take(model, request):
                capable.append(model)
            else:
                trace.attempts.append(Attempt(model, "skipped_capability"))
        if not capable:
            missing = frozenset().union(*(request.needs - self.capabilities.get(m, frozenset()) for m in models))
            raise RouteIncapable(trace, missing)
        runnable = []
        for model in capable:
            if self.cooldown.remaining(model) > 0:
                trace.attempts.append(Attempt(model, "skipped_cooldown"))
            else:
                runnable.append(model)
        if not runnable:
            raise RouteUnavailable(trace, min(self.cooldown.remaining(m) for m in capable) or 1.0)
        return runnable

    def _failed(self, model: str, error: BackendError, started: float, trace: DecisionTrace) -> None:
        trace.attempts.append(Attempt(model, error.kind.value, time.perf_counter() - started,
                                      status=error.status, message=error.message[:300]))
        if error.kind not in NOT_UNHEALTHY:
            self.cooldown.failed(model)

    async def _run(self, models: list[str], request: GenerationRequest, trace: DecisionTrace,
                   call: Callable[[str, float], Awaitable[T]]) -> T:
        """Call models in order until one succeeds: retryable failures are retried on the same model (with
        backoff, unless it went into cooldown), others move on to the next model, and a failure that blames
        the request ends the call."""
        errors: list[BackendError] = []
        for model in self._runnable(models, request, trace):
            for retry in range(self.max_retries.get(model, 0) + 1):
                if retry:
                    if self.cooldown.remaining(model) > 0:
                        break
                    await self._sleep(self.retry.delay(retry - 1, errors[-1].retry_after_s))
                started = time.perf_counter()
                try:
                    return await call(model, started)
                except BackendError as error:
                    errors.append(error)
                    self._failed(model, error, started, trace)
                    if error.kind in CLIENT_FAULT:
                        raise RouteFailed(trace, errors) from error
                    if not error.retryable:
                        break
        raise RouteFailed(trace, errors)

    async def generate(self, models: list[str], request: GenerationRequest,
                       trace: DecisionTrace) -> GenerationResult:
        """The first answer of `models`, in order."""
        compressions: dict[str, CompressionOutcome | None] = {}

        async def call(model: str, started: float) -> GenerationResult:
            compressed = await self._compressed(model, request, trace, compressions)
            attempt = self._for(model, compressed.request if compressed else request)
            try:
                async with asyncio.timeout(attempt.timeout_s):
                    result = await self.backends[model].generate(attempt)
            except TimeoutError as exc:
                raise BackendError(FailureKind.TIMEOUT,
                                   f"{model}: no answer within {attempt.timeout_s:g} s") from exc
            self.cooldown.succeeded(model)
            trace.attempts.append(Attempt(model, "ok", result.latency_s, result.cost_usd))
            trace.model = model
            self._answered(model, compressed, trace)
            return result

        return await self._run(models, request, trace, call)

    async def open_stream(self, models: list[str], request: GenerationRequest,
                          trace: DecisionTrace) -> RouteStream:
        """Stream from the first model of `models` that produces a first chunk (retrying and falling back
        until then); a failure after that ends the stream and is recorded in the trace."""
        compressions: dict[str, CompressionOutcome | None] = {}

        async def call(model: str, started: float) -> RouteStream:
            compressed = await self._compressed(model, request, trace, compressions)
            attempt = self._for(model, compressed.request if compressed else request)
            iterator = aiter(self.backends[model].stream(attempt))
            try:
                async with asyncio.timeout(attempt.timeout_s):
                    first = await anext(iterator)
            except TimeoutError as exc:
                await close_iterator(iterator)
                raise BackendError(FailureKind.TIMEOUT,
                                   f"{model}: no first token within {attempt.timeout_s:g} s") from exc
            except StopAsyncIteration as exc:
                raise BackendError(FailureKind.SERVER, f"{model}: stream ended before any chunk") from exc
            except BaseException:
                await close_iterator(iterator)
                raise
            trace.model = model
            self._answered(model, compressed, trace)
            return RouteStream(model, first, self._guard(model, iterator, attempt, trace, started), trace=trace,
                               request=attempt, price=self.price(model), started=started)

        return await self._run(models, request, trace, call)

    async def _guard(self, model: str, iterator: AsyncIterator[StreamChunk], request: GenerationRequest,
                     trace: DecisionTrace, started: float) -> AsyncIterator[StreamChunk]:
        """The rest of a stream, with a per-chunk deadline; its outcome goes into the trace."""
        cost = 0.0
        try:
            while True:
                try:
                    async with asyncio.timeout(request.timeout_s):
                        chunk = await anext(iterator)
                except StopAsyncIteration:
                    break
                except TimeoutError as exc:
                    raise BackendError(FailureKind.TIMEOUT,
                                       f"{model}: stream stalled for {request.timeout_s:g} s") from exc
                if chunk.cost_usd is not None:
                    cost = chunk.cost_usd
                yield chunk
        except BackendError as error:
            self._failed(model, error, started, trace)
            raise
        finally:
            await close_iterator(iterator)
        self.cooldown.succeeded(model)
        trace.attempts.append(Attempt(model, "ok", time.perf_counter() - started, cost))

