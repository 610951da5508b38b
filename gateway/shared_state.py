"""The shared-state Redis (docs/distributed.md): one client per role, a timeout on every call, and what a
mechanism does when Redis fails (its failure policy), counted for Prometheus."""

from __future__ import annotations

import logging
import time
from typing import Literal

from prometheus_client import CollectorRegistry, Counter
from redis import asyncio as aioredis

from workers.redis_client import redis_client

log = logging.getLogger("frugal.state")

FailurePolicy = Literal["open", "closed"]

#: What a failed Redis call looks like (down, refused, timed out, or a reply that was not understood).
REDIS_FAILURES: tuple[type[BaseException], ...] = (aioredis.RedisError, OSError, TimeoutError)


def state_client(url: str, timeout_s: float) -> aioredis.Redis:
    """A client whose every call gives up after `timeout_s` (connecting included); it reconnects by itself
    once Redis is back (workers/redis_client.py)."""
    return redis_client(url, timeout_s)


async def answers(client: aioredis.Redis) -> bool:
    """Whether Redis answers a PING within the client's timeout."""
    try:
        return bool(await client.ping())
    except REDIS_FAILURES:
        return False


class StateErrors:
    """Failed calls to the shared state, by mechanism and by what was done about them (a warning in the log at
    most every `log_every_s` per mechanism)."""

    def __init__(self, registry: CollectorRegistry, log_every_s: float = 30.0) -> None:
        self.counter = Counter("frugal_state_errors", "Calls to the shared-state Redis that failed, by mechanism "
                               "and by the failure policy applied (open: went on without it; closed: refused)",
                               ["mechanism", "policy"], registry=registry)
        self._log_every_s = log_every_s
        self._logged: dict[str, float] = {}

    def report(self, mechanism: str, policy: FailurePolicy, exc: BaseException) -> None:
        self.counter.labels(mechanism, policy).inc()
        now = time.monotonic()
        if now - self._logged.get(mechanism, -1e9) >= self._log_every_s:
            self._logged[mechanism] = now
            log.warning("shared state unavailable for %s (%s: %s); failing %s", mechanism, type(exc).__name__,
                        exc, policy)
