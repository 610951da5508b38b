"""`POST /v1/chat/completions` and `POST /v1/completions`: authenticate, limit, validate, resolve the route,
answer (from the cache, in full, or as a stream), record. Every request, whatever its outcome, is recorded
exactly once (`Recorder.finish`). The route does the routing and keeps the decision trace; this handler
never looks at what kind of route it serves."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.audits import Answered, Auditor
from gateway.auth import KeyStore
from gateway.cache.directives import parse_cache_control
from gateway.cache.entry import CachedResponse
from gateway.cache.response_cache import CacheLookup, ResponseCache
from gateway.errors import APIError, error_for, model_not_found, rate_limited
from gateway.ids import RequestIds
from gateway.ratelimit import Limiter
from gateway.recorder import Recorder, RequestRecord
from gateway.requests import ParsedRequest, parse_request, read_json
from gateway.responses import SSEWriter, completion_body
from gateway.tenants.reservations import BudgetGate, Reservation
from gateway.trace_headers import trace_headers
from router.failures import RouteFailed, RouteIncapable, RouteUnavailable
from router.prompts import answer_each_prompt
from router.route import Route, Router
from router.stream import RouteStream
from router.trace import DecisionTrace
from workers.backend import GenerationRequest, GenerationResult, RequestKind, StreamChunk
from workers.errors import BackendError
from workers.openai_format import as_deltas

log = logging.getLogger("frugal.gateway")


def _prompt_lengths(parsed: ParsedRequest) -> Callable[[int], int]:
    """Completions: the length of the prompt that choice `index` answers (its `text_offset`s start there)."""
    n = int(parsed.generation.params.get("n", 1))
    return lambda index: len(parsed.prompts[min(index // n, len(parsed.prompts) - 1)])


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
    def __init__(self, *, keys: KeyStore, limiter: Limiter, router: Router, recorder: Recorder,
                 max_body_bytes: int, default_timeout_s: float, store_content: bool,
                 cache: ResponseCache | None = None, auditor: Auditor | None = None,
                 budgets: BudgetGate | None = None) -> None:
        self.keys = keys
        self.limiter = limiter
        self.router = router
        self.recorder = recorder
        self.max_body_bytes = max_body_bytes
        self.default_timeout_s = default_timeout_s
        self.store_content = store_content
        self.cache = cache
        self.auditor = auditor
        self.budgets = budgets
        self.ids = RequestIds()

    async def handle(self, request: Request, kind: RequestKind) -> Response:
        record = self.recorder.start(self.ids.next(), kind)
        handed_to_stream = False
        reservation: Reservation | None = None
        try:
            client = await self.keys.authenticate(request)
            record.key_id = client.key_id
            refusal = await self.limiter.admit(client.key_id, client.requests_per_minute, client.tokens_per_minute)
            if refusal is not None:
                raise rate_limited(f"Rate limit reached for key '{client.key_id}': "
                                   f"{refusal.per_minute} {refusal.what} per minute.", refusal.retry_after_s)
            body = await read_json(request, self.max_body_bytes)
            parsed = parse_request(kind, body)
            record.route, record.stream, record.user = parsed.model, parsed.stream, parsed.user
            if self.store_content:
                record.prompt = body.get("messages") if kind == "chat" else body.get("prompt")
            route = self.router.resolve(parsed.model)
            if route is None:
                raise model_not_found(parsed.model)
            if not client.may_call(parsed.model):
                raise APIError(403, f"This key may not call '{parsed.model}': its scope allows "
                               f"{', '.join(sorted(client.models or ())) or 'no model'}.", type="permission_error",
                               param="model", code="model_not_allowed")
            record.route_label = route.name
            record.trace = trace = DecisionTrace(route=route.name)
            generation = parsed.generation
            generation.timeout_s = self.default_timeout_s
            generation.tenant = client.key_id
            generation.compress = request.headers.get("x-frugal-compress", "").strip().lower() != "off"
            lookup = None
            if self.cache is not None:
                directives = parse_cache_control(request.headers.get("cache-control"))
                # an opted-out request is sent another prompt than a compressed one: another answer
                variant = None if generation.compress else {"compress": False}
                lookup = await self.cache.lookup(client.key_id, route.name, generation, directives, variant)
                record.cache = lookup.result
                if lookup.entry is not None:
                    return self._cached(kind, parsed, lookup, lookup.entry, record)
            if self.budgets is not None:
                budgets = await self.budgets.budgets_of(client.key_id, client.team_id)
                if budgets:
                    models = getattr(route, "models", None) or [route.name]
                    reservation = await self.budgets.reserve(record.request_id, budgets, models, generation,
                                                             parsed.prompts)
            if parsed.stream:
                stream = await route.open_stream(generation, trace)
                record.ttft_s = time.perf_counter() - record.started
                handed_to_stream = True
                after = self._after_answer(record, route, generation)
                return self._streaming_response(kind, parsed, stream, record, lookup, after, reservation)
            if len(parsed.prompts) > 1:
                result = await answer_each_prompt(route, generation, parsed.prompts, trace)
            else:
                result = await route.generate(generation, trace)
            response = self._complete(kind, parsed, result, record)
            if lookup is not None:
                await self._save(lookup, CachedResponse.from_result(result, record.cost_usd))
            if len(parsed.prompts) == 1:
                after = self._after_answer(record, route, generation)
                if after is not None:
                    response.background = BackgroundTask(after)  # runs once the body has been sent
            return response
        except (RouteFailed, RouteUnavailable, RouteIncapable) as failure:
            error = error_for(failure)
            record.failed(error.status, error.code)
            return error.response(self._headers(record))
        except APIError as error:
            record.failed(error.status, error.code)
            return error.response({"x-request-id": record.request_id})
        finally:
            if not handed_to_stream:
                self.recorder.finish(record)
                await self._settle(reservation, record)

    async def _settle(self, reservation: Reservation | None, record: RequestRecord) -> None:
        """Charge the request's budgets what the ledger records it cost, releasing its reservation."""
        if reservation is not None and self.budgets is not None:
            with anyio.CancelScope(shield=True):
                await self.budgets.settle(reservation, record.cost_usd)

    def _after_answer(self, record: RequestRecord, route: Route, generation: GenerationRequest,
                      ) -> Callable[[], Awaitable[None]] | None:
        """What runs once the client has the whole answer: audits and labels (`gateway.audits`), or None."""
        auditor = self.auditor
        if auditor is None or not auditor.applies_to(route):
            return None

        async def after() -> None:
            if record.status == 200 and record.trace is not None and record.response is not None:
                auditor.after(Answered(record.request_id, record.key_id, record.endpoint, route, generation,
                                       record.trace, record.response, record.usage.prompt_tokens))

        return after

    def _headers(self, record: RequestRecord) -> dict[str, str]:
        headers = {"x-request-id": record.request_id}
        if record.trace is not None:
            headers.update(trace_headers(record.trace))
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
        record.answered(entry.usage, 0.0, entry.choices[0].text if entry.choices else "")
        record.cache_saved_usd = entry.cost_usd
        age_s = entry.age_s()
        cache_info: dict[str, object] = {"result": lookup.result, "saved_usd": entry.cost_usd, "age_s": round(age_s, 3)}
        if lookup.similarity is not None:
            cache_info["similarity"] = round(lookup.similarity, 6)
        record.trace = DecisionTrace.cache_hit(parsed.model, entry.model, cache_info)
        headers = self._headers(record)
        headers["x-frugal-cost-usd"] = f"{0.0:.10f}"
        headers["x-frugal-saved-usd"] = f"{entry.cost_usd:.10f}"
        headers["age"] = str(int(age_s))
        if lookup.similarity is not None:
            headers["x-frugal-cache-similarity"] = f"{lookup.similarity:.4f}"
        response_id = _response_id(kind, record)
        if not parsed.stream:
            body = completion_body(kind, response_id, int(time.time()), entry.model, entry.choices, entry.usage,
                                   _prompt_lengths(parsed))
            return Response(body, media_type="application/json", headers=headers)
        writer = SSEWriter(kind, response_id, int(time.time()), entry.model, parsed.include_usage,
                           len(parsed.generation.prompt))
        frames = [writer.role(len(entry.choices))] if kind == "chat" else []
        frames += [writer.chunk(StreamChunk(c.index, c.text, c.finish_reason or "stop", c.logprobs,
                                            tool_calls=as_deltas(c.tool_calls)))
                   for c in entry.choices]
        if writer.include_usage:
            frames.append(writer.usage(entry.usage))
        frames.append(SSEWriter.DONE)
        record.ttft_s = time.perf_counter() - record.started
        return Response(b"".join(frames), media_type="text/event-stream",
                        headers={**headers, "cache-control": "no-cache"})

    def _complete(self, kind: RequestKind, parsed: ParsedRequest, result: GenerationResult,
                  record: RequestRecord) -> Response:
        assert record.trace is not None
        record.answered(result.usage, record.trace.cost_usd, result.text)
        headers = self._headers(record)
        headers["x-frugal-cost-usd"] = f"{record.cost_usd:.10f}"
        content = completion_body(kind, _response_id(kind, record), int(time.time()), result.model,
                                  result.choices, result.usage, _prompt_lengths(parsed))
        return Response(content, media_type="application/json", headers=headers)

    def _streaming_response(self, kind: RequestKind, parsed: ParsedRequest, stream: RouteStream,
                            record: RequestRecord, lookup: CacheLookup | None,
                            after: Callable[[], Awaitable[None]] | None = None,
                            reservation: Reservation | None = None) -> StreamingResponse:
        writer = SSEWriter(kind, _response_id(kind, record), int(time.time()), stream.model, parsed.include_usage,
                           len(parsed.generation.prompt))
        n = int(parsed.generation.params.get("n", 1))

        async def settle() -> None:
            # The body generator records the request in its `finally`; but a client that leaves before
            # the first frame is sent can cancel the response before the generator ever starts.
            if not record.recorded:
                record.abandoned()
            await self._record_stream(stream, record, answered=False)
            await self._settle(reservation, record)

        return SettledStreamingResponse(self._frames(writer, n, stream, record, lookup, after, reservation), settle,
                                        media_type="text/event-stream",
                                        headers={**self._headers(record), "cache-control": "no-cache"})

    async def _frames(self, writer: SSEWriter, n: int, stream: RouteStream, record: RequestRecord,
                      lookup: CacheLookup | None, after: Callable[[], Awaitable[None]] | None,
                      reservation: Reservation | None = None) -> AsyncIterator[bytes]:
        sent = False
        try:
            if writer.kind == "chat":
                yield writer.role(n)
            async for chunk in stream:
                yield writer.chunk(chunk)
            if writer.include_usage:
                yield writer.usage(stream.usage)
            record.answered(stream.usage, stream.cost_usd, stream.text)
            sent = True
            if lookup is not None and lookup.write:
                await self._save(lookup, CachedResponse(stream.model, stream.choices(), stream.usage,
                                                        stream.cost_usd))
            self.recorder.finish(record)  # journaled before the last byte (docs/reliability.md)
            yield SSEWriter.DONE
            if after is not None:  # the last frame has been sent
                await after()
        except BackendError as failure:
            error = error_for(failure)
            record.failed(error.status, error.code)
            await self._record_stream(stream, record, sent)
            yield SSEWriter.error(error.body())
            yield SSEWriter.DONE
        except BaseException:
            # Cancelled by a client that went away (or the server stopping).
            if not sent:
                record.abandoned()
            raise
        finally:
            await self._record_stream(stream, record, sent)
            await self._settle(reservation, record)

    async def _record_stream(self, stream: RouteStream, record: RequestRecord, answered: bool) -> None:
        """Close the stream (billing what an abandoned or failed one generated) and record the request, once."""
        with anyio.CancelScope(shield=True):
            await stream.aclose()
            if not record.recorded:
                if not answered:
                    record.spent(stream.usage, stream.cost_usd, stream.text)
                self.recorder.finish(record)
