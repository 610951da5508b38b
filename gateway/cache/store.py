"""Where cached answers live: in process (LRU with TTL, bounded by entries and bytes), or in Redis when
`REDIS_URL` is set, so that every replica of the gateway shares them. A store that fails (Redis down,
timing out) behaves as empty: a cache must never fail a request, only stop saving money (logged)."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("frugal.cache")


class ResponseStore(Protocol):
    async def get(self, key: str) -> bytes | None:
        """The value stored under `key`, or None (missing, expired, or the store is unreachable)."""
        ...

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store `value` under `key` for `ttl_s` seconds (best effort)."""
        ...

    async def aclose(self) -> None: ...


class MemoryResponseStore:
    """An LRU map with a time to live per entry, bounded by entry count and by bytes."""

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 256 * 1024 * 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_held(self) -> int:
        return self._bytes

    async def get(self, key: str) -> bytes | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            value, expires_at = found
            if self.clock() >= expires_at:
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if len(value) > self.max_bytes or ttl_s <= 0:
            return
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (value, self.clock() + ttl_s)
            self._bytes += len(value)
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self.evictions += 1

    def _drop(self, key: str) -> None:
        value, _ = self._entries.pop(key)
        self._bytes -= len(value)

    async def aclose(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


class RedisResponseStore:
    """Entries as Redis strings with an expiry (`SET key value EX ttl`). Redis bounds the memory: run it
    with `maxmemory` and `maxmemory-policy allkeys-lru` (deploy/ does)."""

    def __init__(self, url: str, *, prefix: str = "frugal:cache:", timeout_s: float = 0.25) -> None:
        from workers.redis_client import redis_client  # noqa: PLC0415 (only when Redis is configured)

        self.prefix = prefix
        self._redis = redis_client(url, timeout_s)
        self._errors = ErrorLog()

    async def get(self, key: str) -> bytes | None:
        try:
            value = await self._redis.get(self.prefix + key)
        except Exception as exc:  # redis.RedisError, OSError, timeouts: the cache is unavailable, not fatal
            self._errors.report("store get", exc)
            return None
        return bytes(value) if value is not None else None

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        try:
            await self._redis.set(self.prefix + key, value, px=max(1, int(ttl_s * 1000)))
        except Exception as exc:
            self._errors.report("store set", exc)

    async def aclose(self) -> None:
        await self._redis.aclose()


class ErrorLog:
    """Logs a failing cache component once per minute, not once per request."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._last = -every_s
        self.count = 0

    def report(self, operation: str, exc: BaseException) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            log.warning("cache %s failed (%d failures so far), serving without it: %r", operation,
                        self.count, exc)
