"""A bounded cache whose entries are fresh for `ttl_s`, and kept stale after that: what keys and budgets fall
back on while the database cannot be read."""

from __future__ import annotations

import threading
import time
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    def __init__(self, ttl_s: float, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[K, tuple[float, V]] = {}
        self._lock = threading.Lock()

    def fresh(self, key: K) -> tuple[V] | None:
        """(value,) when it was stored less than `ttl_s` ago, else None."""
        entry = self._entries.get(key)
        if entry is not None and time.monotonic() - entry[0] < self.ttl_s:
            return (entry[1],)
        return None

    def stale(self, key: K) -> tuple[V] | None:
        """(value,) however old, or None when never stored."""
        entry = self._entries.get(key)
        return (entry[1],) if entry is not None else None

    def put(self, key: K, value: V) -> None:
        with self._lock:
            if len(self._entries) >= self.max_entries:  # bounded: a flood of distinct keys cannot grow it
                self._entries.clear()
            self._entries[key] = (time.monotonic(), value)

    def forget(self, key: K) -> None:
        self._entries.pop(key, None)
