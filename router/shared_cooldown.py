"""Cooldowns shared by every replica through Redis (docs/distributed.md).

Each replica keeps deciding from its own copy (`Cooldown`): asking whether a model may be called never waits
for Redis. A failure is also counted in Redis (a sorted set per model over the window, updated by a Lua
script on Redis's clock); when the failures of all replicas together reach the bound, the script sets the
model's cooldown key with its time to live, and every replica reads those keys every `sync_s` seconds. When
Redis fails, each replica goes on with its own failures alone (fail open) and reports the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterable

from redis import asyncio as aioredis

from router.cooldown import Cooldown

#: KEYS: the model's failures (sorted set), its cooldown key. ARGV: window s, failures, cooldown ms, member.
_FAILED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('EXPIRE', KEYS[1], math.ceil(window) + 1)
if tonumber(ARGV[3]) > 0 and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

_FAILURES = (aioredis.RedisError, OSError, TimeoutError)


class SharedCooldown(Cooldown):
    """A `Cooldown` whose failures and cooldowns are pooled with the other replicas' through Redis."""

    def __init__(self, failures: int, window_s: float, cooldown_s: float, client: aioredis.Redis, *,
                 models: Iterable[str], prefix: str = "frugal:", sync_s: float = 0.25,
                 on_error: Callable[[BaseException], None] = lambda exc: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(failures, window_s, cooldown_s, clock)
        self._redis = client
        self._models = list(models)
        self._prefix = prefix + "cooldown:"
        self._sync_s = sync_s
        self._on_error = on_error
        self._failed_script = client.register_script(_FAILED)
        self._ids = itertools.count()
        self._instance = f"{os.getpid()}-{id(self):x}"
        self._pending: set[asyncio.Task[None]] = set()
        self._sync_task: asyncio.Task[None] | None = None

    def _keys(self, model: str) -> list[str]:
        return [f"{self._prefix}{{{model}}}:failures", f"{self._prefix}{{{model}}}:until"]

    def failed(self, model: str) -> bool:
        cooling = super().failed(model)
        self._schedule(self._report_failure(model, cooling))
        return cooling

    def succeeded(self, model: str) -> None:
        if model in self._recent:  # only a replica that saw failures clears them (no Redis call per success)
            self._schedule(self._clear(model))
        super().succeeded(model)

    def _schedule(self, work: object) -> None:
        try:
            task = asyncio.get_running_loop().create_task(work)  # type: ignore[arg-type]
        except RuntimeError:
            work.close()  # type: ignore[attr-defined]  # no loop: this replica's own state still holds
            return
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _report_failure(self, model: str, cooling_here: bool) -> None:
        failures, until = self._keys(model)
        try:
            if cooling_here:  # this replica's own failures reached the bound: tell the others at once
                await self._redis.set(until, "1", px=int(self.cooldown_s * 1000))
            else:
                member = f"{self._instance}-{next(self._ids)}"
                if await self._failed_script(keys=[failures, until],
                                             args=[self.window_s, self.failures, int(self.cooldown_s * 1000),
                                                   member]):
                    self._until[model] = self._clock() + self.cooldown_s
        except _FAILURES as exc:
            self._on_error(exc)

    async def _clear(self, model: str) -> None:
        try:
            await self._redis.delete(self._keys(model)[0])
        except _FAILURES as exc:
            self._on_error(exc)

    async def sync(self) -> None:
        """Read the models in cooldown on any replica (one round trip for all models)."""
        if not self._models:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for model in self._models:
                pipe.pttl(self._keys(model)[1])
            left = await pipe.execute()
        now = self._clock()
        for model, ms in zip(self._models, left, strict=True):
            if isinstance(ms, int) and ms > 0:
                self._until[model] = max(self._until.get(model, 0.0), now + ms / 1000)

    async def _follow(self) -> None:
        while True:
            try:
                await self.sync()
            except _FAILURES as exc:
                self._on_error(exc)
            await asyncio.sleep(self._sync_s)

    def start(self) -> None:
        """Follow the other replicas' cooldowns (call from the event loop that serves requests)."""
        if self._sync_task is None:
            self._sync_task = asyncio.get_running_loop().create_task(self._follow())

    async def stop(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
            self._sync_task = None
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
