"""The gateway's side of a pooled local model: a `Backend` that enqueues one Celery task per request and reads
the answer back from the request's Redis Stream (workers.pool.protocol).

Failures are the router's to act on, as for any backend: a broker or state Redis that is down fails the call
at once (`CONNECTION`: the cascade escalates, reason `error`); a queue longer than `max_queue_depth`, or
workers whose measured wait exceeds `max_wait_s`, refuses the request before it is enqueued (`OVERLOADED`:
the cascade escalates, reason `capacity`); a worker that stops refreshing its heartbeat mid-request fails the
call (`SERVER`). A caller that goes away sets the request's cancel key, so the worker frees its sequences.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson
from redis import asyncio as aioredis

from workers.backend import GenerationRequest, GenerationResult, StreamChunk
from workers.errors import BackendError, FailureKind
from workers.pool import protocol
from workers.pricing import TokenPrice
from workers.redis_client import redis_client

log = logging.getLogger("frugal.pool")

_REDIS_FAILURES = (aioredis.RedisError, OSError)
#: Stream reads in a row whose reply came too late before a request fails.
_LATE_READS = 3


@dataclass(frozen=True)
class PoolSettings:
    queue: str
    max_queue_depth: int = 16
    max_wait_s: float = 2.0
    expires_s: float = 30.0
    enqueue_timeout_s: float = 1.0
    worker_timeout_s: float = 3.0
    probe_interval_s: float = 0.25
    #: Seconds any one call to the state Redis may take (reading the stream blocks for up to a second more).
    redis_timeout_s: float = 0.25


class PooledBackend:
    """`Backend` over the Celery queue of a local model (`frugal worker --model ...` consumes it)."""

    def __init__(self, name: str, settings: PoolSettings, *, broker_url: str, state_url: str,
                 price: TokenPrice | None = None) -> None:
        from workers.pool.app import celery_app  # noqa: PLC0415 (Celery only when a model is pooled)

        self.name = name
        self.price = price or TokenPrice()
        self.settings = settings
        from kombu import Exchange, Queue  # noqa: PLC0415

        self._app = celery_app(broker_url, timeout_s=settings.enqueue_timeout_s)
        # Published on the default (anonymous) exchange: the message goes straight onto the queue's list, with no
        # binding to look up or declare, so a broker that restarted empty takes the next request as it is.
        self._queue = Queue(settings.queue, Exchange(""), routing_key=settings.queue, no_declare=True)
        timeout = settings.redis_timeout_s
        self._broker = redis_client(broker_url, timeout)
        self._state = redis_client(state_url, timeout)
        self._block_ms = int(min(1.0, settings.worker_timeout_s / 3) * 1000)
        # Reading a stream blocks in Redis for up to `_block_ms`: its socket waits that long and a bit more.
        self._streams = redis_client(state_url, timeout, read_timeout_s=self._block_ms / 1000 + timeout,
                                     breaker=False)
        # Handing a task to Celery is a blocking call (kombu): done on threads of its own, never on the loop.
        self._enqueuer = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"enqueue-{name}")
        self._probed_at = -1.0  # never
        self._probe: asyncio.Task[None] | None = None
        self._depth, self._wait = 0, 0.0
        self._pending_cancels: set[asyncio.Task[None]] = set()

    # -- before enqueueing -------------------------------------------------------------------------------
    async def _read_load(self) -> tuple[int, float]:
        depth = await self._broker.llen(self.settings.queue)
        wait = await self._state.get(protocol.wait_key(self.settings.queue))
        return int(depth), float(wait) if wait else 0.0

    async def _refresh_load(self) -> None:
        try:
            self._depth, self._wait = await self._read_load()
        except _REDIS_FAILURES:  # unknown: the enqueue or the stream will fail fast and say why
            self._depth, self._wait = 0, 0.0
        finally:
            self._probe = None

    async def _admit(self) -> None:
        """Refuse (OVERLOADED) when the queue or the workers' wait is past its bound. The load is read in the
        background at most every `probe_interval_s`, for all requests; only the very first request waits for
        a reading."""
        now = time.monotonic()
        if self._probe is None and now - self._probed_at >= self.settings.probe_interval_s:
            first = self._probed_at < 0
            self._probed_at = now
            self._probe = asyncio.get_running_loop().create_task(self._refresh_load())
            if first:
                await asyncio.shield(self._probe)
        s = self.settings
        # The workers' wait is measured when a task starts: with nothing queued it is stale (a backlog that has
        # drained), and refusing on it would keep the idle pool refused until the reading expires.
        if self._depth > s.max_queue_depth or (self._depth > 0 and self._wait > s.max_wait_s):
            raise BackendError(FailureKind.OVERLOADED, f"{self.name}: the worker pool is busy ({self._depth} queued, "
                               f"{self._wait:.2f} s wait)", status=503, retry_after_s=max(1.0, self._wait))

    async def _enqueue(self, request_id: str, mode: str, request: GenerationRequest) -> None:
        s = self.settings

        def send() -> None:
            self._app.send_task(protocol.TASK, args=[request_id, s.queue, mode, protocol.request_to_dict(request),
                                                     time.time()],
                                task_id=request_id, queue=self._queue, expires=s.expires_s, retry=False)

        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(s.enqueue_timeout_s):
                await loop.run_in_executor(self._enqueuer, send)
        except TimeoutError as exc:
            raise BackendError(FailureKind.CONNECTION, f"{self.name}: the broker did not take the request within "
                               f"{s.enqueue_timeout_s:g} s") from exc
        except Exception as exc:  # kombu's OperationalError, redis errors, OSError: the broker is down
            raise BackendError(FailureKind.CONNECTION, f"{self.name}: the broker is unreachable: {exc}") from exc

    # -- reading the answer --------------------------------------------------------------------------------
    async def _events(self, request_id: str) -> AsyncIterator[tuple[str, Any]]:
        """The request's events in order, until one that ends it; a worker that stops its heartbeat fails it."""
        key, last = protocol.stream_key(request_id), "0-0"
        worker: str | None = None
        late = 0
        while True:
            try:
                reply = await self._streams.xread({key: last}, count=256, block=self._block_ms)
                late = 0
            except aioredis.TimeoutError as exc:
                # The reply was late (this process was busy, or Redis): reading again from `last` loses nothing.
                # Only a Redis that stays silent fails the request (the heartbeat check below needs Redis too).
                late += 1
                if late >= _LATE_READS:
                    raise BackendError(FailureKind.CONNECTION, f"{self.name}: the worker pool's Redis did not "
                                       f"answer {late} reads in a row: {exc}") from exc
                reply = None
            except _REDIS_FAILURES as exc:
                raise BackendError(FailureKind.CONNECTION, f"{self.name}: lost the worker pool's Redis: {exc}") \
                    from exc
            if not reply:
                if worker is not None and not await self._alive(worker):
                    raise BackendError(FailureKind.SERVER, f"{self.name}: worker {worker} stopped answering "
                                       f"(its heartbeat expired mid-request)")
                continue
            for entry_id, fields in reply[0][1]:
                last = entry_id
                event = fields[b"e"].decode()
                data = orjson.loads(fields[b"d"])
                if event == "start":
                    worker = data["worker"]
                    continue
                yield event, data
                if event in ("end", "result", "error"):
                    return

    async def _alive(self, worker: str) -> bool:
        try:
            return bool(await self._state.exists(protocol.worker_key(worker)))
        except _REDIS_FAILURES as exc:
            raise BackendError(FailureKind.CONNECTION, f"{self.name}: lost the worker pool's Redis: {exc}") from exc

    @staticmethod
    def _failure(data: dict[str, Any]) -> BackendError:
        try:
            kind = FailureKind(data.get("kind"))
        except ValueError:
            kind = FailureKind.SERVER
        return BackendError(kind, data.get("message") or "the worker failed", status=data.get("status"),
                            retry_after_s=data.get("retry_after_s"))

    def _cancel(self, request_id: str) -> None:
        """Tell the worker to stop (best effort, without waiting: the caller is leaving)."""

        async def cancel() -> None:
            try:
                await self._state.set(protocol.cancel_key(request_id), "1", ex=int(self.settings.expires_s) + 60)
            except _REDIS_FAILURES:
                log.warning("%s: could not cancel request %s (Redis unreachable)", self.name, request_id)

        task = asyncio.get_running_loop().create_task(cancel())
        self._pending_cancels.add(task)
        task.add_done_callback(self._pending_cancels.discard)

    # -- the protocol ------------------------------------------------------------------------------------
    async def _answer(self, mode: str, request: GenerationRequest) -> AsyncIterator[tuple[str, Any]]:
        """Admit, enqueue, then the request's events until its last (an `error` event is raised); a caller
        that leaves before the last event cancels the request in the worker."""
        await self._admit()
        request_id = uuid.uuid4().hex
        await self._enqueue(request_id, mode, request)
        done = False
        try:
            async for event, data in self._events(request_id):
                done = event in ("end", "result", "error")
                if event == "error":
                    raise self._failure(data)
                yield event, data
        finally:
            if not done:
                self._cancel(request_id)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        started = time.perf_counter()
        async with contextlib.aclosing(self._answer("generate", request)) as events:
            async for event, data in events:
                if event == "result":
                    result = protocol.result_from_dict(data)
                    result.model = self.name
                    result.latency_s = time.perf_counter() - started
                    result.cost_usd = self.price.cost(result.usage.prompt_tokens, result.usage.completion_tokens)
                    return result
        raise BackendError(FailureKind.SERVER, f"{self.name}: the worker's answer ended without a result")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        async with contextlib.aclosing(self._answer("stream", request)) as events:  # leaving closes it at once
            async for event, data in events:
                chunk = protocol.chunk_from_dict(data)
                if event == "end" and chunk.usage is not None:
                    chunk.cost_usd = self.price.cost(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                yield chunk

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        if self._pending_cancels:
            await asyncio.gather(*self._pending_cancels, return_exceptions=True)
        self._enqueuer.shutdown(wait=False, cancel_futures=True)
        for client in (self._broker, self._state, self._streams):
            await client.aclose()
