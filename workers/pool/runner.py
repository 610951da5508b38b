"""The worker's side of a request: claim it once, generate on the model's engine, write the events.

Each Celery task runs in one of the worker's threads (the threads pool) but only waits there: its request
runs on the worker's one event loop, as in the gateway's process, and every request shares the model's one
engine, whose thread batches the sequences of all of them together (continuous batching, the prefix cache).
Events go out through an outbox: one thread sends whatever accumulated in one pipelined round trip, so a
decode step of 8 streams costs one write to Redis, not 8, and no thread wakes per token but the loop's and
the outbox's.
"""

from __future__ import annotations

import asyncio
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
        #: Running requests by id: their work on the loop, and whether they were cancelled.
        self._watched: dict[str, tuple[asyncio.Task[Any], threading.Event]] = {}
        self._outbox: list[tuple[str, dict[str, bytes | str], bool]] = []
        self._outbox_ready = threading.Condition()
        self._stop = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._threads = [threading.Thread(target=self._loop.run_forever, name="requests", daemon=True),
                         threading.Thread(target=self._send_outbox, name="outbox", daemon=True),
                         threading.Thread(target=self._watch_cancellations, name="cancellations", daemon=True)]

    def start(self) -> None:
        """Start the requests' event loop, the outbox and the cancellation watch."""
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._outbox_ready:
            self._outbox_ready.notify()
        self._loop.call_soon_threadsafe(self._loop.stop)
        for thread in self._threads:
            thread.join(timeout=10)

    # -- events ------------------------------------------------------------------------------------------
    def emit(self, request_id: str, event: str, data: Any = None, *, first: bool = False) -> None:
        """Queue an event of the request's stream (`first`: also give the stream its TTL); sent in order."""
        with self._outbox_ready:
            self._outbox.append((protocol.stream_key(request_id), {"e": event, "d": protocol.dumps(data)}, first))
            if len(self._outbox) == 1:
                self._outbox_ready.notify()

    def _send_outbox(self) -> None:
        while True:
            with self._outbox_ready:
                while not self._outbox and not self._stop.is_set():
                    self._outbox_ready.wait()
                batch, self._outbox = self._outbox, []
            if not batch and self._stop.is_set():
                return
            pipe = self.redis.pipeline(transaction=False)
            for key, fields, first in batch:
                pipe.xadd(key, fields, maxlen=self.stream_maxlen, approximate=True)
                if first:
                    pipe.expire(key, int(self.stream_ttl_s))
            try:
                pipe.execute()
            except redis.RedisError:  # the gateways cannot read either; their timeouts end the requests
                log.warning("could not send %d events to Redis", len(batch))

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
            work = self._serve(backend, request_id, mode, protocol.request_from_dict(request))
            outcome = asyncio.run_coroutine_threadsafe(work, self._loop).result()
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
        cancelled = threading.Event()
        with self._lock:
            self._watched[request_id] = (work, cancelled)
        try:
            if mode == "generate":
                result = await backend.generate(request)
                self.emit(request_id, "result", dataclasses.asdict(result))
            else:
                async for chunk in backend.stream(request):
                    if chunk.usage is not None:
                        self.emit(request_id, "end", dataclasses.asdict(chunk))
                    else:
                        self.emit(request_id, "chunk", protocol.chunk_to_dict(chunk))
            return "ok"
        except asyncio.CancelledError:
            if cancelled.is_set():
                return "cancelled"  # the engine's sequences were cancelled on the way out
            raise
        finally:
            with self._lock:
                self._watched.pop(request_id, None)

    def _watch_cancellations(self) -> None:
        """Every `cancel_poll_s`, look for the cancel keys of all running requests at once (one round trip,
        however many) and cancel the work of those whose client went away."""
        while not self._stop.wait(self.cancel_poll_s):
            with self._lock:
                watched = list(self._watched.items())
            if not watched:
                continue
            try:
                pipe = self.redis.pipeline(transaction=False)
                for request_id, _ in watched:
                    pipe.exists(protocol.cancel_key(request_id))
                found = pipe.execute()
            except redis.RedisError:
                continue  # Redis is away: go on generating; the stream's TTL bounds the waste
            for (_, (work, cancelled)), gone in zip(watched, found, strict=True):
                if gone and not cancelled.is_set():
                    cancelled.set()
                    self._loop.call_soon_threadsafe(work.cancel)
