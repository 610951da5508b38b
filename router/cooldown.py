"""Cooldown: a model that keeps failing is left alone for a while instead of being hammered."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class Cooldown:
    """`failures` failures within `window_s` seconds put a model in cooldown for `cooldown_s` seconds."""

    def __init__(self, failures: int, window_s: float, cooldown_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.window_s = window_s
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._recent: dict[str, deque[float]] = {}
        self._until: dict[str, float] = {}

    def remaining(self, model: str) -> float:
        """Seconds of cooldown left for `model` (0 when it may be called)."""
        until = self._until.get(model)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left <= 0:
            del self._until[model]
            return 0.0
        return left

    def failed(self, model: str) -> bool:
        """Record a failure; True when it put the model in cooldown."""
        now = self._clock()
        recent = self._recent.setdefault(model, deque())
        recent.append(now)
        while recent and recent[0] < now - self.window_s:
            recent.popleft()
        if len(recent) >= self.failures and self.cooldown_s > 0:
            self._until[model] = now + self.cooldown_s
            recent.clear()
            return True
        return False

    def succeeded(self, model: str) -> None:
        self._recent.pop(model, None)

    def cooling(self) -> dict[str, float]:
        """Models in cooldown now, with seconds left."""
        return {m: left for m in list(self._until) if (left := self.remaining(m)) > 0}
