"""Expensive reads shared by whoever asks at the same time, and kept a while: a dashboard refreshing every
few seconds (or ten of them open) costs one read per key and `ttl_s`, never one per refresh."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any


class SharedReads:
    def __init__(self, ttl_s: float, max_entries: int = 256) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._done: dict[Hashable, tuple[float, Any]] = {}
        self._running: dict[Hashable, asyncio.Task[Any]] = {}

    async def get(self, key: Hashable, read: Callable[[], Awaitable[Any]]) -> tuple[Any, float]:
        """(the value, when it was read: time.time()) — from a read less than `ttl_s` old, or the one in flight
        for `key`, or a new one."""
        hit = self._done.get(key)
        if hit is not None and time.time() - hit[0] < self.ttl_s:
            return hit[1], hit[0]
        task = self._running.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._read(key, read))
            self._running[key] = task
        value = await asyncio.shield(task)  # a caller that leaves does not cancel the others' read
        return value, self._done[key][0]

    async def _read(self, key: Hashable, read: Callable[[], Awaitable[Any]]) -> Any:
        try:
            value = await read()
            if len(self._done) >= self.max_entries:
                self._done.clear()
            self._done[key] = (time.time(), value)
            return value
        finally:
            self._running.pop(key, None)
