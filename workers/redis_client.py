"""The one way Frugal makes an asyncio Redis client (the gateway's shared state, caches and budgets; the worker
pool's broker, state and streams): every call bounded by a timeout, and a connection that Redis closed (a
restart) retried once on a fresh connection instead of failing the call.

Without that retry, redis-py (8.x) gives a client made by `from_url` no retry at all: after a Redis restart,
each idle pooled connection fails the first call made on it, one by one, for as long as the pool takes to
cycle through them (tens of seconds at low concurrency). Only `ConnectionError` is retried (a refused
connection fails again at once, so a Redis that is down costs no extra wait); timeouts are not, so a hung
Redis still costs one `timeout_s` per call. A command whose reply was lost after Redis ran it may run twice;
the budget scripts that must not are idempotent per request (gateway/tenants/counters.py).
"""

from __future__ import annotations

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

#: Connections per client. redis-py's default (100) refuses the 101st concurrent call with MaxConnectionsError:
#: a gateway at a few hundred concurrent requests (each a rate-limit and budget call, pooled streams each
#: holding one) would fail calls for no reason of Redis's.
MAX_CONNECTIONS = 2048


def redis_client(url: str, timeout_s: float, *, read_timeout_s: float | None = None,
                 max_connections: int = MAX_CONNECTIONS) -> aioredis.Redis:
    """A client whose calls give up after `timeout_s` (connecting included; `read_timeout_s` for replies, when
    a command blocks in Redis longer than that), retrying once a connection Redis had closed."""
    return aioredis.Redis.from_url(
        url, socket_timeout=read_timeout_s if read_timeout_s is not None else timeout_s,
        socket_connect_timeout=timeout_s, health_check_interval=0, retry_on_timeout=False,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        retry_on_error=[RedisConnectionError], max_connections=max_connections)
