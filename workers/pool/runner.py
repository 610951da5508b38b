"""The worker's side of a request: claim it once, generate on the model's engine, write the events.

Each Celery task runs in one of the worker's threads (the threads pool) and drives its request on a small
event loop of its own, while every request of the worker shares the model's one engine: the engine's thread
batches the sequences of all running tasks together (continuous batching, the prefix cache), exactly as in
the gateway's process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import redis

from workers.backend import GenerationRequest
from workers.errors import BackendError, FailureKind
from workers.local.backend import LocalBackend
from workers.pool import protocol

log = logging.getLogger("frugal.worker")

#: Weight of the newest measurement in the workers' moving average of waits.
_WAIT_ALPHA = 0.3

#: Taking a request, in one round trip: claim it (a second delivery finds the claim), unless its client has
#: cancelled it; then the `start` event, the stream's TTL and the workers' queue wait (read by the gateways
#: for backpressure; it expires when nothing starts for a while).
#: KEYS: claim, cancel, stream, wait. ARGV: worker id, TTL s, start payload, wait s, stream max length.
_TAKE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 'duplicate' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'cancelled' end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'e', 'start', 'd', ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[2])
redis.call('SET', KEYS[4], ARGV[4], 'EX', 10)
return 'started'
"""


class PoolRunner:
    """Runs requests for the local models of one worker process (`backends` by queue)."""

    def __init__(self, backends: Mapping[str, LocalBackend], client: redis.Redis, worker_id: str, *,
                 stream_ttl_s: float = 300.0, stream_maxlen: int = 10_000, cancel_poll_s: float = 0.05) -> None:
        self.backends = dict(backends)
        self.redis = client
        self.worker_id = worker_id
        self.stream_ttl_s = stream_ttl_s
        self.stream_maxlen = stream_maxlen
        self.cancel_poll_s = cancel_poll_s
        #: Requests by outcome (ok, error, cancelled, duplicate, expired), streamed tokens, waits: for metrics.
        self.counts: Counter[str] = Counter()
        self.wait_seconds: dict[str, float] = {}
        self.running = 0
        self._lock = threading.Lock()
        self._take = client.register_script(_TAKE)

    # -- events ------------------------------------------------------------------------------------------
    def emit(self, request_id: str, event: str, data: Any = None, *, first: bool = False) -> None:
        key = protocol.stream_key(request_id)
        fields = {"e": event, "d": protocol.dumps(data)}
        if first:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xadd(key, fields, maxlen=self.stream_maxlen, approximate=True)
            pipe.expire(key, int(self.stream_ttl_s))
            pipe.execute()
        else:
            self.redis.xadd(key, fields, maxlen=self.stream_maxlen, approximate=True)

    def error(self, request_id: str, error: BackendError, *, first: bool = False) -> None:
        self.emit(request_id, "error", {"kind": error.kind.value, "message": error.message, "status": error.status,
                                        "retry_after_s": error.retry_after_s}, first=first)

    def expired(self, request_id: str) -> None:
        """Celery dropped the task unrun (it waited longer than its `expires`): tell whoever still waits."""
        self._count("expired")
        self.error(request_id, BackendError(FailureKind.OVERLOADED, "the request waited too long in the worker "
                                            "queue and was dropped", status=503), first=True)

    def _count(self, outcome: str, n: int = 1) -> None:
        with self._lock:
            self.counts[outcome] += n

    # -- a request -----------------------------------------------------------------------------------
    def run(self, request_id: str, queue: str, mode: str, request: dict[str, Any], enqueued_at: float) -> str:
        """Answer one request; returns its outcome (for the task's log and the tests)."""
        backend = self.backends.get(queue)
        if backend is None:
            self._count("error")
            self.error(request_id, BackendError(FailureKind.NOT_FOUND, f"no model of this worker serves {queue}"),
                       first=True)
            return "error"
        wait = self._observe_wait(queue, max(0.0, time.time() - enqueued_at))
        taken = self._take(keys=[protocol.claim_key(request_id), protocol.cancel_key(request_id),
                                 protocol.stream_key(request_id), protocol.wait_key(queue)],
                           args=[self.worker_id, int(self.stream_ttl_s), protocol.dumps({"worker": self.worker_id}),
                                 f"{wait:.4f}", self.stream_maxlen]).decode()
        if taken != "started":  # "duplicate": delivered twice, the first delivery runs it; or "cancelled"
            self._count(taken)
            return taken
        with self._lock:
            self.running += 1
        try:
            outcome = asyncio.run(self._serve(backend, request_id, mode, protocol.request_from_dict(request)))
        except BackendError as exc:
            outcome = "error"
            self.error(request_id, exc)
        except Exception as exc:  # the engine failed: the gateway hears of it instead of waiting
            log.exception("request %s failed", request_id)
            outcome = "error"
            self.error(request_id, BackendError(FailureKind.SERVER, f"the local engine failed: {exc}"))
        finally:
            with self._lock:
                self.running -= 1
        self._count(outcome)
        return outcome

    def _observe_wait(self, queue: str, wait_s: float) -> float:
        """The moving average of the queue's wait, with `wait_s` in it."""
        with self._lock:
            previous = self.wait_seconds.get(queue)
            average = wait_s if previous is None else previous + _WAIT_ALPHA * (wait_s - previous)
            self.wait_seconds[queue] = average
        return average

    async def _serve(self, backend: LocalBackend, request_id: str, mode: str, request: GenerationRequest) -> str:
        work = asyncio.current_task()
        assert work is not None
        cancelled = asyncio.Event()
        watcher = asyncio.get_running_loop().create_task(self._watch_cancel(request_id, work, cancelled))
        try:
            if mode == "generate":
                result = await backend.generate(request)
                self.emit(request_id, "result", dataclasses.asdict(result))
            else:
                async for chunk in backend.stream(request):
                    if chunk.usage is not None:
                        self.emit(request_id, "end", dataclasses.asdict(chunk))
                    else:
                        self.emit(request_id, "chunk", dataclasses.asdict(chunk))
                        self._count("streamed_chunks")
            return "ok"
        except asyncio.CancelledError:
            if cancelled.is_set():
                return "cancelled"  # the engine's sequences were cancelled on the way out
            raise
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch_cancel(self, request_id: str, work: asyncio.Task[Any], cancelled: asyncio.Event) -> None:
        """Cancel the request's work when its cancel key appears (its client went away)."""
        key = protocol.cancel_key(request_id)
        while True:
            await asyncio.sleep(self.cancel_poll_s)
            try:
                gone = self.redis.exists(key)  # ~0.1 ms; this loop serves this request alone
            except redis.RedisError:
                continue  # Redis is away: go on generating; the stream's TTL bounds the waste
            if gone:
                cancelled.set()
                work.cancel()
                return
