"""Executing a route: each model in order, retries with backoff on retryable failures, cooldowns.

A concrete model is a route of one. The first model that answers wins; a failure that says the request
itself is wrong (upstream 400) stops the route at once, since every model would reject it.
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
from router.trace import Attempt, DecisionTrace
from workers.backend import Backend, GenerationRequest, GenerationResult, StreamChunk
from workers.errors import CLIENT_FAULT, NOT_UNHEALTHY, BackendError, FailureKind

T = TypeVar("T")


class RouteFailed(Exception):
    """Every model of the route failed (or the request was refused upstream as invalid)."""

    def __init__(self, trace: DecisionTrace, errors: list[BackendError]) -> None:
        last = errors[-1]
        super().__init__(last.message)
        self.trace = trace
        self.errors = errors
        self.last = last

    @property
    def kind(self) -> FailureKind:
        """The failure that best describes the whole route to a client."""
        kinds = {e.kind for e in self.errors}
        if kinds & CLIENT_FAULT:
            return next(e.kind for e in self.errors if e.kind in CLIENT_FAULT)
        if kinds == {FailureKind.RATE_LIMITED}:
            return FailureKind.RATE_LIMITED
        return self.last.kind

    @property
    def retry_after_s(self) -> float | None:
        hints = [e.retry_after_s for e in self.errors if e.retry_after_s is not None]
        return min(hints) if hints else None


class RouteUnavailable(Exception):
    """Every model of the route is in cooldown."""

    def __init__(self, trace: DecisionTrace, retry_after_s: float) -> None:
        super().__init__(f"all models of {trace.route!r} are cooling down after repeated failures")
        self.trace = trace
        self.retry_after_s = retry_after_s


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


@dataclass(slots=True)
class OpenedStream:
    """A stream whose first chunk has arrived: from here on the route is committed to `model`."""

    model: str
    first: StreamChunk
    rest: AsyncIterator[StreamChunk]


class FallbackRouter:
    """Runs routes over a set of backends."""

    def __init__(
        self,
        backends: dict[str, Backend],
        routes: dict[str, list[str]],
        *,
        max_retries: dict[str, int],
        timeouts: dict[str, float],
        retry: RetryPolicy,
        cooldown: Cooldown,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        compression: CompressionRules | None = None,
    ) -> None:
        self.backends = backends
        self.routes = routes
        self.max_retries = max_retries
        self.timeouts = timeouts
        self.retry = retry
        self.cooldown = cooldown
        self._sleep = sleep
        self.compression = compression

    def resolve(self, name: str) -> list[str] | None:
        """The models behind a model or route name; None when the name is unknown."""
        if name in self.routes:
            return self.routes[name]
        if name in self.backends:
            return [name]
        return None

    def _for(self, model: str, request: GenerationRequest) -> GenerationRequest:
        """`request` with `model`'s own timeout."""
        timeout = self.timeouts.get(model)
        return request if timeout is None or timeout == request.timeout_s else replace(request, timeout_s=timeout)

    async def _compressed(self, model: str, request: GenerationRequest, trace: DecisionTrace,
                          done: dict[str, CompressionOutcome | None]) -> CompressionOutcome | None:
        """The compression that applies before `model` (docs/compression.md), computed once per model of a
        route call (retries reuse it)."""
        if self.compression is None:
            return None
        if model not in done:
            done[model] = await self.compression.apply(trace.route, model, self.backends[model].price, request)
        return done[model]

    def _answered(self, model: str, compressed: CompressionOutcome | None, trace: DecisionTrace) -> None:
        if compressed is not None:
            trace.compressions.append(trace_record(model, compressed, self.backends[model].price))

    def _runnable(self, models: list[str], trace: DecisionTrace) -> list[str]:
        runnable = []
        for model in models:
            if self.cooldown.remaining(model) > 0:
                trace.attempts.append(Attempt(model, "skipped_cooldown"))
            else:
                runnable.append(model)
        if not runnable:
            raise RouteUnavailable(trace, min(self.cooldown.remaining(m) for m in models) or 1.0)
        return runnable

    def _failed(self, model: str, error: BackendError, started: float, trace: DecisionTrace) -> None:
        trace.attempts.append(Attempt(model, error.kind.value, time.perf_counter() - started,
                                      status=error.status, message=error.message[:300]))
        if error.kind not in NOT_UNHEALTHY:
            self.cooldown.failed(model)

    async def _run(self, models: list[str], trace: DecisionTrace,
                   call: Callable[[str, float], Awaitable[T]]) -> T:
        """Call models in route order until one succeeds: retryable failures are retried on the same
        model (with backoff, unless it went into cooldown), others move on to the next model, and a
        failure that blames the request ends the route."""
        errors: list[BackendError] = []
        for model in self._runnable(models, trace):
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

        return await self._run(models, trace, call)

    async def open_stream(self, models: list[str], request: GenerationRequest,
                          trace: DecisionTrace) -> OpenedStream:
        """Start streaming from the first model that produces a first chunk (retrying and falling back
        until then); failures after that end the stream and are recorded by `_guard`."""

        compressions: dict[str, CompressionOutcome | None] = {}

        async def call(model: str, started: float) -> OpenedStream:
            compressed = await self._compressed(model, request, trace, compressions)
            attempt = self._for(model, compressed.request if compressed else request)
            iterator = aiter(self.backends[model].stream(attempt))
            try:
                async with asyncio.timeout(attempt.timeout_s):
                    first = await anext(iterator)
            except TimeoutError as exc:
                await _close(iterator)
                raise BackendError(FailureKind.TIMEOUT,
                                   f"{model}: no first token within {attempt.timeout_s:g} s") from exc
            except StopAsyncIteration as exc:
                raise BackendError(FailureKind.SERVER, f"{model}: stream ended before any chunk") from exc
            except BaseException:
                await _close(iterator)
                raise
            trace.model = model
            self._answered(model, compressed, trace)
            return OpenedStream(model, first, self._guard(model, iterator, attempt, trace, started))

        return await self._run(models, trace, call)

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
            await _close(iterator)
        self.cooldown.succeeded(model)
        trace.attempts.append(Attempt(model, "ok", time.perf_counter() - started, cost))


async def _close(iterator: AsyncIterator[StreamChunk]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()
