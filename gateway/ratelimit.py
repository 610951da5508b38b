"""Per-key request rate limits (token buckets, in process).

A bucket holds up to one minute's allowance and refills continuously, so short bursts pass and a
sustained rate above the limit gets 429 with a Retry-After that says when the next request fits.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: key id -> (tokens, last refill time)
        self._buckets: dict[str, tuple[float, float]] = {}

    def acquire(self, key: str, per_minute: int | None) -> float:
        """Take one request from `key`'s allowance: 0 if allowed, else seconds until it would be."""
        if per_minute is None:
            return 0.0
        now = self._clock()
        rate = per_minute / 60.0
        tokens, last = self._buckets.get(key, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / rate
