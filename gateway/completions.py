"""`POST /v1/chat/completions` and `POST /v1/completions`: authenticate, limit, validate, route, answer,
record. Every request, whatever its outcome, is recorded exactly once (`Recorder.finish`)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.auth import KeyStore
from gateway.cache.directives import parse_cache_control
from gateway.cache.entry import CachedResponse
from gateway.cache.response_cache import CacheLookup, ResponseCache
from gateway.errors import APIError, model_not_found, rate_limited
from gateway.ids import RequestIds
from gateway.ratelimit import RateLimiter
from gateway.recorder import Recorder, RequestRecord
from gateway.requests import ParsedRequest, parse_request, read_json
from gateway.responses import SSEWriter, completion_body
from router.cascade import CascadeRunner
from router.fallback import FallbackRouter, OpenedStream, RouteFailed, RouteUnavailable
from router.trace import Attempt, DecisionTrace
from workers.backend import Choice, GenerationRequest, GenerationResult, RequestKind, StreamChunk, TokenLogprob
from workers.errors import BackendError, FailureKind
from workers.remote import complete_usage

log = logging.getLogger("frugal.gateway")

#: Status recorded for a stream the client abandoned (nginx's convention; never sent on the wire).
CLIENT_CLOSED = 499


def error_for(failure: RouteFailed | RouteUnavailable | BackendError) -> APIError:
    """The client-facing error for a routing failure."""
    if isinstance(failure, RouteUnavailable):
        return APIError(503, str(failure), type="api_error", code="models_cooling_down",
                        retry_after_s=failure.retry_after_s)
    if isinstance(failure, RouteFailed):
        kind, message, retry_after = failure.kind, failure.last.message, failure.retry_after_s
    else:
        kind, message, retry_after = failure.kind, failure.message, failure.retry_after_s
    if kind == FailureKind.BAD_REQUEST:
        return APIError(400, f"The model provider rejected the request: {message}", code="upstream_bad_request")
    if kind == FailureKind.CONTEXT_WINDOW:
        return APIError(400, f"The prompt is too long for the model: {message}", param="messages",
                        code="context_length_exceeded")
    if kind == FailureKind.TIMEOUT:
        return APIError(504, f"The model provider did not answer in time: {message}", type="api_error",
                        code="upstream_timeout")
    if kind == FailureKind.OVERLOADED:
        return APIError(503, f"The model is overloaded: {message}", type="server_error", code="model_overloaded",
                        retry_after_s=retry_after or 1.0)
    if kind == FailureKind.RATE_LIMITED:
        return APIError(429, f"The model provider is rate limiting: {message}", type="rate_limit_error",
                        code="upstream_rate_limited", retry_after_s=retry_after or 1.0)
    return APIError(502, f"The model provider failed: {message}", type="api_error", code="upstream_error")


def cascade_headers(trace: DecisionTrace) -> dict[str, str]:
    """The cascade's decision, tier by tier (comma-separated in tier order; `-` where not applicable)."""

    def number(value: float | None, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    headers = {
        "x-frugal-tiers": ",".join(t.model for t in trace.tiers),
        "x-frugal-tier-outcomes": ",".join(t.outcome for t in trace.tiers),
        "x-frugal-scores": ",".join(number(t.score) for t in trace.tiers),
        "x-frugal-thresholds": ",".join(number(t.threshold) for t in trace.tiers),
        "x-frugal-tier-costs-usd": ",".join(f"{t.cost_usd:.10f}" for t in trace.tiers),
        "x-frugal-tier-latencies-ms": ",".join(f"{t.latency_s * 1000:.1f}" for t in trace.tiers),
    }
    accepted = trace.accepted_tier
    if accepted is not None:
        headers["x-frugal-tier-accepted"] = str(accepted)
    if trace.saved_usd is not None:
        headers["x-frugal-saved-usd"] = f"{trace.saved_usd:.10f}"
    return headers


def compression_headers(trace: DecisionTrace) -> dict[str, str]:
    """`x-frugal-compression`: per model that answered, what compression did (docs/compression.md)."""
    return {"x-frugal-compression": ",".join(f"{c.model}:{c.outcome}:{c.ratio:.3f}" for c in trace.compressions),
            "x-frugal-compression-tokens-removed": str(sum(c.tokens_removed for c in trace.compressions))}


def _response_id(kind: RequestKind, record: RequestRecord) -> str:
    """The `id` of a response body, OpenAI-style, from the request id (so logs, ledger and client agree)."""
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{record.request_id}"


class SettledStreamingResponse(StreamingResponse):
    """A streaming response that always runs `settle` when it ends, however it ends (shielded from
    cancellation), so a stream is accounted for even if its body never started."""

    def __init__(self, content: AsyncIterator[bytes], settle: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._settle = settle

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._settle()


class CompletionsEndpoint:
    def __init__(self, *, keys: KeyStore, limiter: RateLimiter, router: FallbackRouter, cascades: CascadeRunner,
                 recorder: Recorder, max_body_bytes: int, default_timeout_s: float, store_content: bool,
                 cache: ResponseCache | None = None) -> None:
        self.keys = keys
        self.limiter = limiter
        self.router = router
        self.cascades = cascades
        self.recorder = recorder
        self.max_body_bytes = max_body_bytes
        self.default_timeout_s = default_timeout_s
        self.store_content = store_content
        self.cache = cache
        self.ids = RequestIds()

    async def handle(self, request: Request, kind: RequestKind) -> Response:
        record = self.recorder.start(self.ids.next(), kind)
        handed_to_stream = False
        try:
            client = self.keys.authenticate(request)
            record.key_id = client.key_id
            wait_s = self.limiter.acquire(client.key_id, client.requests_per_minute)
            if wait_s:
                raise rate_limited(f"Rate limit reached for key '{client.key_id}': "
                                   f"{client.requests_per_minute} requests per minute.", wait_s)
            body = await read_json(request, self.max_body_bytes)
            parsed = parse_request(kind, body)
            record.route, record.stream, record.user = parsed.model, parsed.stream, parsed.user
            if self.store_content:
                record.prompt = body.get("messages") if kind == "chat" else body.get("prompt")
            cascade = self.cascades.get(parsed.model)
            models = self.router.resolve(parsed.model)
            if models is None and cascade is None:
                raise model_not_found(parsed.model)
            record.route_label = parsed.model
            record.trace = trace = DecisionTrace(route=parsed.model)
            record.cascade = cascade
            generation = parsed.generation
            generation.timeout_s = self.default_timeout_s
            generation.tenant = client.key_id
            generation.compress = request.headers.get("x-frugal-compress", "").strip().lower() != "off"
            lookup = None
            if self.cache is not None:
                directives = parse_cache_control(request.headers.get("cache-control"))
                # an opted-out request is sent another prompt than a compressed one: another answer
                variant = None if generation.compress else {"compress": False}
                lookup = await self.cache.lookup(client.key_id, parsed.model, generation, directives,
                                                 variant)
                record.cache = lookup.result
                if lookup.entry is not None:
                    return self._cached(kind, parsed, lookup, lookup.entry, record)
            if parsed.stream:
                if cascade is not None:
                    opened = await self.cascades.open_stream(cascade, generation, trace)
                else:
                    opened = await self.router.open_stream(models or [], generation, trace)
                record.ttft_s = time.perf_counter() - record.started
                handed_to_stream = True
                return self._streaming_response(kind, parsed, opened, record, lookup)
            if cascade is not None:
                result = await self.cascades.generate(cascade, generation, trace)
            else:
                result = await self.router.generate(models or [], generation, trace)
            response = self._complete(kind, result, record)
            if lookup is not None:
                await self._save(lookup, CachedResponse.from_result(result, record.cost_usd))
            return response
        except (RouteFailed, RouteUnavailable) as failure:
            error = error_for(failure)
            record.status, record.error_code = error.status, error.code
            return error.response(self._headers(record))
        except APIError as error:
            record.status, record.error_code = error.status, error.code
            return error.response({"x-request-id": record.request_id})
        finally:
            if not handed_to_stream:
                self.recorder.finish(record)

    def _headers(self, record: RequestRecord) -> dict[str, str]:
        headers = {"x-request-id": record.request_id}
        trace = record.trace
        if trace is not None:
            headers["x-frugal-route"] = trace.route
            headers["x-frugal-models-tried"] = ",".join(trace.models_tried)
            if trace.model:
                headers["x-frugal-model"] = trace.model
            if trace.tiers:
                headers.update(cascade_headers(trace))
            if trace.compressions:
                headers.update(compression_headers(trace))
        if record.cache != "none":
            headers["x-frugal-cache"] = record.cache
        return headers

    async def _save(self, lookup: CacheLookup, entry: CachedResponse) -> None:
        """Store an answer in the cache; a failing cache never fails the request that was answered."""
        assert self.cache is not None
        try:
            await self.cache.save(lookup, entry)
        except Exception:
            log.exception("storing an answer in the response cache failed")

    def _cached(self, kind: RequestKind, parsed: ParsedRequest, lookup: CacheLookup, entry: CachedResponse,
                record: RequestRecord) -> Response:
        """Answer from the cache: nothing is spent; what the answer cost when it was made is saved. A
        streaming request gets the cached answer as a stream (its whole body is known: one write)."""
        record.usage = entry.usage
        record.cost_usd = 0.0
        record.cache_saved_usd = entry.cost_usd
        record.status = 200
        age_s = entry.age_s()
        cache_info: dict[str, object] = {"result": lookup.result, "saved_usd": entry.cost_usd, "age_s": round(age_s, 3)}
        if lookup.similarity is not None:
            cache_info["similarity"] = round(lookup.similarity, 6)
        record.trace = DecisionTrace(route=parsed.model, model=entry.model, cache=cache_info)
        if self.store_content:
            record.response = entry.choices[0].text if entry.choices else ""
        headers = self._headers(record)
        headers["x-frugal-cost-usd"] = f"{0.0:.10f}"
        headers["x-frugal-saved-usd"] = f"{entry.cost_usd:.10f}"
        headers["age"] = str(int(age_s))
        if lookup.similarity is not None:
            headers["x-frugal-cache-similarity"] = f"{lookup.similarity:.4f}"
        response_id = _response_id(kind, record)
        if not parsed.stream:
            body = completion_body(kind, response_id, int(time.time()), entry.model, entry.choices, entry.usage)
            return Response(body, media_type="application/json", headers=headers)
        writer = SSEWriter(kind, response_id, int(time.time()), entry.model, parsed.include_usage)
        frames = [writer.role(len(entry.choices))] if kind == "chat" else []
        frames += [writer.chunk(StreamChunk(c.index, c.text, c.finish_reason or "stop", c.logprobs))
                   for c in entry.choices]
        if writer.include_usage:
            frames.append(writer.usage(entry.usage))
        frames.append(SSEWriter.DONE)
        record.ttft_s = time.perf_counter() - record.started
        return Response(b"".join(frames), media_type="text/event-stream",
                        headers={**headers, "cache-control": "no-cache"})

    def _complete(self, kind: RequestKind, result: GenerationResult, record: RequestRecord) -> Response:
        assert record.trace is not None
        record.usage = result.usage
        record.cost_usd = record.trace.cost_usd
        record.status = 200
        if self.store_content:
            record.response = result.text
        headers = self._headers(record)
        headers["x-frugal-cost-usd"] = f"{record.cost_usd:.10f}"
        content = completion_body(kind, _response_id(kind, record),
                                  int(time.time()), result.model, result.choices, result.usage)
        return Response(content, media_type="application/json", headers=headers)

    def _streaming_response(self, kind: RequestKind, parsed: ParsedRequest, opened: OpenedStream,
                            record: RequestRecord, lookup: CacheLookup | None) -> StreamingResponse:
        writer = SSEWriter(kind, _response_id(kind, record),
                           int(time.time()), opened.model, parsed.include_usage)
        n = int(parsed.generation.params.get("n", 1))
        async def settle() -> None:
            # The body generator records the request in its `finally`; but a client that leaves before
            # the first frame is sent can cancel the response before the generator ever starts.
            await opened.rest.aclose()
            if not record.recorded:
                record.client_disconnected = True
                record.status, record.error_code = CLIENT_CLOSED, "client_closed"
                self._bill_partial(record, opened.model, parsed.generation, [], outcome="client_closed")
                self.recorder.finish(record)

        return SettledStreamingResponse(self._frames(writer, n, opened, parsed.generation, record, lookup), settle,
                                        media_type="text/event-stream",
                                        headers={**self._headers(record), "cache-control": "no-cache"})

    async def _frames(self, writer: SSEWriter, n: int, opened: OpenedStream, generation: GenerationRequest,
                      record: RequestRecord, lookup: CacheLookup | None) -> AsyncIterator[bytes]:
        texts: list[str] = []
        answer = _StreamedAnswer(n) if lookup is not None and lookup.write else None
        finished = False
        try:
            if writer.kind == "chat":
                yield writer.role(n)
            chunk = opened.first
            while True:
                if chunk.usage is not None:
                    record.usage = chunk.usage
                if chunk.text or chunk.finish_reason or chunk.logprobs:
                    texts.append(chunk.text)
                    if answer is not None:
                        answer.add(chunk)
                    yield writer.chunk(chunk)
                try:
                    chunk = await anext(opened.rest)
                except StopAsyncIteration:
                    break
            record.cost_usd = record.trace.cost_usd if record.trace else 0.0
            if record.cascade is not None and record.trace is not None:
                self.cascades.settle(record.cascade, record.trace, record.usage)
            if writer.include_usage:
                yield writer.usage(record.usage)
            record.status = 200
            finished = True
            if answer is not None and lookup is not None:
                await self._save(lookup, CachedResponse(opened.model, answer.choices(), record.usage,
                                                        record.cost_usd))
            yield SSEWriter.DONE
        except BackendError as failure:
            error = error_for(failure)
            record.status, record.error_code = error.status, error.code
            self._bill_partial(record, opened.model, generation, texts)
            yield SSEWriter.error(error.body())
            yield SSEWriter.DONE
        except BaseException:
            # Cancelled by a client that went away (or the server stopping): record what was streamed.
            if not finished:
                record.client_disconnected = True
                record.status, record.error_code = CLIENT_CLOSED, "client_closed"
                self._bill_partial(record, opened.model, generation, texts, outcome="client_closed")
            raise
        finally:
            if self.store_content:
                record.response = "".join(texts)
            with anyio.CancelScope(shield=True):
                await opened.rest.aclose()
            self.recorder.finish(record)

    def _bill_partial(self, record: RequestRecord, model: str, generation: GenerationRequest, texts: list[str],
                      outcome: str | None = None) -> None:
        """Usage and cost of a stream that ended early: the provider bills what it generated, so we
        count it (with a tokenizer, as the provider's own count never arrived)."""
        if record.usage.total_tokens == 0:
            record.usage = complete_usage(None, generation, ["".join(texts)])
        trace = record.trace
        if trace is None:
            return
        if any(a.model == model and a.outcome == "ok" for a in trace.attempts):
            record.cost_usd = trace.cost_usd  # a cascade tier's answer, generated and billed in full already
            return
        price = self.router.backends[model].price
        cost = price.cost(record.usage.prompt_tokens, record.usage.completion_tokens)
        last = trace.attempts[-1] if trace.attempts else None
        if outcome is None and last is not None and last.model == model:
            last.cost_usd = cost  # the router already recorded this call's failure
        else:
            trace.attempts.append(Attempt(model, outcome or "failed_midstream",
                                          time.perf_counter() - record.started, cost))
        record.cost_usd = trace.cost_usd


class _StreamedAnswer:
    """A streamed answer put back together, choice by choice, for the cache."""

    def __init__(self, n: int) -> None:
        self._texts: list[list[str]] = [[] for _ in range(n)]
        self._finish: list[str | None] = [None] * n
        self._logprobs: list[list[TokenLogprob] | None] = [None] * n

    def add(self, chunk: StreamChunk) -> None:
        if not 0 <= chunk.index < len(self._texts):
            return
        self._texts[chunk.index].append(chunk.text)
        if chunk.finish_reason:
            self._finish[chunk.index] = chunk.finish_reason
        if chunk.logprobs:
            self._logprobs[chunk.index] = (self._logprobs[chunk.index] or []) + chunk.logprobs

    def choices(self) -> list[Choice]:
        return [Choice(i, "".join(parts), self._finish[i], self._logprobs[i]) for i, parts in enumerate(self._texts)]
