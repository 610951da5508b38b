"""Injected misbehaviour: latency, errors, hangs. Set at start (CLI flags) or at run time (`/_standin/faults`)."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass


@dataclass(slots=True)
class FaultRule:
    """What to do to requests for `model` ("*" = every model). `count` None means forever."""

    model: str = "*"
    status: int | None = None
    hang: bool = False
    latency_ms: float = 0.0
    chunk_latency_ms: float = 0.0
    count: int | None = None
    message: str = "injected failure"
    #: Streaming only: break the connection after this many content chunks.
    fail_after_chunks: int | None = None


@dataclass(slots=True)
class Behaviour:
    """What happens to one request: a delay, then an answer, an error status, or a hang."""

    latency_ms: float = 0.0
    chunk_latency_ms: float = 0.0
    status: int | None = None
    hang: bool = False
    message: str = ""
    fail_after_chunks: int | None = None


class Faults:
    """Rules that apply first-match; plus a random error rate for load tests."""

    def __init__(
        self,
        *,
        latency_ms: float = 0.0,
        chunk_latency_ms: float = 0.0,
        error_rate: float = 0.0,
        error_status: int = 500,
        hang_rate: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.latency_ms = latency_ms
        self.chunk_latency_ms = chunk_latency_ms
        self.error_rate = error_rate
        self.error_status = error_status
        self.hang_rate = hang_rate
        self._random = random.Random(seed)
        self._rules: list[FaultRule] = []
        self._lock = threading.Lock()

    def add(self, rule: FaultRule) -> None:
        with self._lock:
            self._rules.append(rule)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def rules(self) -> list[FaultRule]:
        with self._lock:
            return list(self._rules)

    def decide(self, model: str) -> Behaviour:
        behaviour = Behaviour(latency_ms=self.latency_ms, chunk_latency_ms=self.chunk_latency_ms)
        with self._lock:
            for rule in self._rules:
                if rule.model not in ("*", model) or rule.count == 0:
                    continue
                if rule.count is not None:
                    rule.count -= 1
                behaviour.latency_ms += rule.latency_ms
                behaviour.chunk_latency_ms += rule.chunk_latency_ms
                behaviour.status = rule.status
                behaviour.hang = rule.hang
                behaviour.message = rule.message
                behaviour.fail_after_chunks = rule.fail_after_chunks
                return behaviour
            if self.hang_rate and self._random.random() < self.hang_rate:
                behaviour.hang = True
            elif self.error_rate and self._random.random() < self.error_rate:
                behaviour.status = self.error_status
                behaviour.message = "injected random failure"
        return behaviour
