"""The one way Frugal makes an asyncio Redis client (the gateway's shared state, caches and budgets; the worker
pool's broker, state and streams): every call bounded by a timeout, and a connection that Redis closed (a
restart) retried once on a fresh connection instead of failing the call.

Without that retry, redis-py (8.x) gives a client made by `from_url` no retry at all: after a Redis restart,
each idle pooled connection fails the first call made on it, one by one, for as long as the pool takes to
cycle through them (tens of seconds at low concurrency). Only `ConnectionError` is retried (a refused
connection fails again at once, so a Redis that is down costs no extra wait); timeouts are not, so a hung
Redis still costs one `timeout_s` per call, and a circuit breaker keeps that from happening to every call:
after `Breaker.failures` calls in a row fail (time out or cannot connect), the client answers every call at once
with `RedisSkipped` (a ConnectionError, so each mechanism applies its failure policy) for `Breaker.open_s`, then
lets one call through to see whether Redis is back. A command whose reply was lost after Redis ran it may run
twice; the budget scripts that must not are idempotent per request (gateway/tenants/counters.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("frugal.redis")

#: Connections per client. redis-py's default (100) refuses the 101st concurrent call with MaxConnectionsError:
#: a gateway at a few hundred concurrent requests (each a rate-limit and budget call, pooled streams each
#: holding one) would fail calls for no reason of Redis's.
MAX_CONNECTIONS = 2048


class RedisSkipped(RedisConnectionError):
    """Not asked: Redis failed the calls before this one (the breaker is open)."""


class Breaker:
    """Closed: calls go to Redis. Open (after `failures` failed calls in a row): calls fail at once for `open_s`.
    Then one call at a time goes through; its success closes the breaker, its failure opens it again."""

    def __init__(self, name: str, failures: int = 3, open_s: float = 1.0) -> None:
        self.name = name
        self.failures = failures
        self.open_s = open_s
        self._failed = 0
        self._open_until = 0.0
        self._probing = False
        #: Times it opened, and calls answered without asking Redis, since start.
        self.opened = 0
        self.skipped = 0

    def admit(self) -> bool:
        """Whether this call goes to Redis (True: report how it went with `succeeded` or `failed`)."""
        if self._failed < self.failures:
            return True
        if self._probing or time.monotonic() < self._open_until:
            self.skipped += 1
            return False
        self._probing = True  # one call tries Redis again
        return True

    def succeeded(self) -> None:
        if self._failed >= self.failures:
            log.warning("Redis %s answers again", self.name)
        self._failed, self._probing = 0, False

    def failed(self) -> None:
        self._failed += 1
        self._probing = False
        if self._failed >= self.failures:
            if self._open_until < time.monotonic():
                self.opened += 1
                log.warning("Redis %s failed %d calls in a row: not asked for %.1f s (circuit open)",
                            self.name, self._failed, self.open_s)
            self._open_until = time.monotonic() + self.open_s


class GuardedRedis(aioredis.Redis):
    """An asyncio Redis client whose commands pass through a `Breaker` (pipelines do not)."""

    breaker: Breaker | None = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        breaker = self.breaker
        if breaker is None:
            return await super().execute_command(*args, **options)
        if not breaker.admit():
            raise RedisSkipped(f"Redis {breaker.name} is not asked for a moment: it failed the calls before this one")
        try:
            result = await super().execute_command(*args, **options)
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError):
            breaker.failed()
            raise
        except BaseException:
            breaker._probing = False  # a cancelled or refused call says nothing about Redis: let another try
            raise
        breaker.succeeded()
        return result


def redis_client(url: str, timeout_s: float, *, read_timeout_s: float | None = None,
                 max_connections: int = MAX_CONNECTIONS, breaker: bool = True,
                 trip_after: int = 3) -> aioredis.Redis:
    """A client whose calls give up after `timeout_s` (connecting included; `read_timeout_s` for replies, when
    a command blocks in Redis longer than that), retrying once a connection Redis had closed, and behind a
    circuit breaker (`breaker`; off for clients that block in Redis on purpose, e.g. stream reads) that opens
    after `trip_after` failed calls in a row."""
    client = GuardedRedis.from_url(
        url, socket_timeout=read_timeout_s if read_timeout_s is not None else timeout_s,
        socket_connect_timeout=timeout_s, health_check_interval=0, retry_on_timeout=False,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        retry_on_error=[RedisConnectionError], max_connections=max_connections)
    if breaker:
        client.breaker = Breaker(_where(url), failures=trip_after)
    return client


def _where(url: str) -> str:
    """host:port/db of a Redis URL, without credentials (for logs)."""
    return url.rsplit("@", 1)[-1].split("://", 1)[-1]
