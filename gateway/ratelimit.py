"""Per-key rate limits: requests and tokens per minute (token buckets).

A bucket holds up to one minute's allowance and refills continuously, so short bursts pass and a sustained
rate above the limit gets 429 with a Retry-After that says when the next request fits. A request is admitted
while its key has tokens left; the tokens it used are taken once it is answered (its size is not known
before), so a key may end a minute in debt and wait for it to be paid back.

`RateLimiter` keeps the buckets in the process (the embedded default); `RedisRateLimiter` keeps them in the
shared-state Redis, updated atomically by Lua scripts on Redis's clock, so every replica enforces one limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from redis import asyncio as aioredis

from gateway.errors import APIError
from gateway.shared_state import REDIS_FAILURES, FailurePolicy, StateErrors


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was refused: which limit ("requests" or "tokens"), its value, and when to come back."""

    what: str
    per_minute: int
    retry_after_s: float


class Limiter(Protocol):
    async def admit(self, key: str, requests_per_minute: int | None,
                    tokens_per_minute: int | None) -> Refusal | None:
        """Take one request from `key`'s allowance, or say why not."""
        ...

    def spend(self, key: str, tokens: int) -> None:
        """Take the tokens an answered request used (limits remembered from the key's last `admit`)."""
        ...


def _level(tokens: float, last: float, now: float, per_minute: int) -> float:
    return min(float(per_minute), tokens + (now - last) * per_minute / 60.0)


class RateLimiter:
    """Buckets in this process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: (key, "requests" | "tokens") -> (level, last refill time)
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}
        self._token_limits: dict[str, int] = {}

    async def admit(self, key: str, requests_per_minute: int | None,
                    tokens_per_minute: int | None) -> Refusal | None:
        return self._admit(key, requests_per_minute, tokens_per_minute)

    def _admit(self, key: str, rpm: int | None, tpm: int | None) -> Refusal | None:
        now = self._clock()
        if tpm is not None:
            self._token_limits[key] = tpm
            level, last = self._buckets.get((key, "tokens"), (float(tpm), now))
            level = _level(level, last, now, tpm)
            if level <= 0:
                return Refusal("tokens", tpm, (1.0 - level) * 60.0 / tpm)
        else:
            self._token_limits.pop(key, None)
        if rpm is None:
            return None
        level, last = self._buckets.get((key, "requests"), (float(rpm), now))
        level = _level(level, last, now, rpm)
        if level >= 1.0:
            self._buckets[(key, "requests")] = (level - 1.0, now)
            return None
        self._buckets[(key, "requests")] = (level, now)
        return Refusal("requests", rpm, (1.0 - level) * 60.0 / rpm)

    def spend(self, key: str, tokens: int) -> None:
        tpm = self._token_limits.get(key)
        if tpm is None or tokens <= 0:
            return
        now = self._clock()
        level, last = self._buckets.get((key, "tokens"), (float(tpm), now))
        self._buckets[(key, "tokens")] = (_level(level, last, now, tpm) - tokens, now)


# Buckets as hashes {n: level, t: last refill}, refilled on Redis's clock (the same for every replica).
_LEVEL = """
local function level(key, per_minute, now)
  local v = redis.call('HMGET', key, 'n', 't')
  local n, last = tonumber(v[1]), tonumber(v[2])
  if n == nil then return per_minute end
  return math.min(per_minute, n + (now - last) * per_minute / 60)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

#: KEYS: request bucket, token bucket. ARGV: requests per minute, tokens per minute (0: no limit).
#: Returns {"ok" | "requests" | "tokens", seconds to wait}.
_ADMIT = _LEVEL + """
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm > 0 then
  local tokens = level(KEYS[2], tpm, now)
  if tokens <= 0 then return {'tokens', tostring((1 - tokens) * 60 / tpm)} end
end
if rpm > 0 then
  local n = level(KEYS[1], rpm, now)
  if n < 1 then
    redis.call('HSET', KEYS[1], 'n', tostring(n), 't', tostring(now))
    redis.call('EXPIRE', KEYS[1], 120)
    return {'requests', tostring((1 - n) * 60 / rpm)}
  end
  redis.call('HSET', KEYS[1], 'n', tostring(n - 1), 't', tostring(now))
  redis.call('EXPIRE', KEYS[1], 120)
end
return {'ok', '0'}
"""

#: KEYS: token bucket. ARGV: tokens per minute, tokens used.
_SPEND = _LEVEL + """
local tpm, used = tonumber(ARGV[1]), tonumber(ARGV[2])
local n = level(KEYS[1], tpm, now) - used
redis.call('HSET', KEYS[1], 'n', tostring(n), 't', tostring(now))
redis.call('EXPIRE', KEYS[1], 60 + math.ceil(math.max(0, -n) * 60 / tpm))
return 1
"""


class RedisRateLimiter:
    """Buckets in the shared-state Redis: one limit for every replica. Each call has the client's timeout;
    when Redis fails, `policy` "open" admits the request (counted in frugal_state_errors_total), "closed"
    refuses it with 503."""

    def __init__(self, client: aioredis.Redis, errors: StateErrors, *, prefix: str = "frugal:",
                 policy: FailurePolicy = "open") -> None:
        self._redis = client
        self._errors = errors
        self._prefix = prefix + "rl:"
        self._policy = policy
        self._admit_script = client.register_script(_ADMIT)
        self._spend_script = client.register_script(_SPEND)
        self._token_limits: dict[str, int] = {}
        self._pending: set[asyncio.Task[None]] = set()

    def _keys(self, key: str) -> list[str]:
        return [f"{self._prefix}{{{key}}}:requests", f"{self._prefix}{{{key}}}:tokens"]

    async def admit(self, key: str, requests_per_minute: int | None,
                    tokens_per_minute: int | None) -> Refusal | None:
        if tokens_per_minute is None:
            self._token_limits.pop(key, None)
        else:
            self._token_limits[key] = tokens_per_minute
        if requests_per_minute is None and tokens_per_minute is None:
            return None
        try:
            what, wait = await self._admit_script(keys=self._keys(key),
                                                  args=[requests_per_minute or 0, tokens_per_minute or 0])
        except REDIS_FAILURES as exc:
            self._errors.report("rate_limits", self._policy, exc)
            if self._policy == "open":
                return None
            raise APIError(503, "Rate limits cannot be checked right now (shared state unavailable); retry "
                           "shortly.", type="server_error", code="rate_limit_unavailable",
                           retry_after_s=1.0) from exc
        what = what.decode() if isinstance(what, bytes) else what
        if what == "ok":
            return None
        limit = requests_per_minute if what == "requests" else tokens_per_minute
        return Refusal(what, int(limit or 0), float(wait))

    def spend(self, key: str, tokens: int) -> None:
        tpm = self._token_limits.get(key)
        if tpm is None or tokens <= 0:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._spend(key, tpm, tokens))
        except RuntimeError:  # no loop (a test calling from outside one): nothing to schedule on
            return
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _spend(self, key: str, tpm: int, tokens: int) -> None:
        try:
            await self._spend_script(keys=self._keys(key)[1:], args=[tpm, tokens])
        except REDIS_FAILURES as exc:
            self._errors.report("rate_limits", "open", exc)

    async def drain(self) -> None:
        """Wait for the token spends still being written."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
