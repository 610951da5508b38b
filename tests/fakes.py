"""In-process stand-ins for the router's collaborators: a scripted `Backend` and a fixed `Scorer`, so that
routes can be tested without processes or sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from workers.backend import Choice, GenerationRequest, GenerationResult, StreamChunk, Usage
from workers.errors import BackendError, FailureKind
from workers.pricing import TokenPrice

PROMPT_TOKENS = 10


def failure(kind: FailureKind = FailureKind.SERVER, retry_after_s: float | None = None) -> BackendError:
    return BackendError(kind, f"scripted {kind.value}", retry_after_s=retry_after_s)


@dataclass
class FakeBackend:
    """Answers `answer` (its words streamed one chunk each), after raising the scripted `failures` one per
    call. `fail_after` breaks a stream after that many chunks; `hold` keeps a stream waiting after its first
    chunk until set (so a test can leave in the middle)."""

    name: str
    answer: str = "the answer is four"
    price: TokenPrice = field(default_factory=lambda: TokenPrice(1e-6, 2e-6))
    failures: list[BackendError] = field(default_factory=list)
    fail_after: int | None = None
    hold: asyncio.Event | None = None
    calls: int = 0
    requests: list[GenerationRequest] = field(default_factory=list)

    def _start(self, request: GenerationRequest) -> None:
        self.calls += 1
        self.requests.append(request)
        if self.failures:
            raise self.failures.pop(0)

    def usage(self) -> Usage:
        return Usage(PROMPT_TOKENS, len(self.answer.split()))

    def cost(self, usage: Usage) -> float:
        return self.price.cost(usage.prompt_tokens, usage.completion_tokens)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self._start(request)
        usage = self.usage()
        return GenerationResult(self.name, [Choice(0, self.answer, "stop")], usage, 0.001, self.cost(usage))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        self._start(request)
        words = self.answer.split(" ")
        for position, word in enumerate(words):
            if position == self.fail_after:
                raise BackendError(FailureKind.CONNECTION, f"{self.name}: dropped mid-stream")
            yield StreamChunk(0, word if position == 0 else " " + word)
            if position == 0 and self.hold is not None:
                await self.hold.wait()
        yield StreamChunk(0, "", "stop")
        usage = self.usage()
        yield StreamChunk(usage=usage, cost_usd=self.cost(usage))

    async def aclose(self) -> None:
        return None


class FixedScorer:
    """Scores every answer of a model with that model's fixed score; remembers what it was asked."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores
        self.asked: list[tuple[str, str, list[tuple[str, str]]]] = []

    def score(self, query: str, answer: str, model: str, confidence: float | None = None,
              previous: Sequence[tuple[str, str]] = ()) -> float:
        self.asked.append((model, answer, list(previous)))
        return self.scores[model]

    def uses_confidence(self, model: str) -> bool:
        return False

    def knows(self, model: str) -> bool:
        return model in self.scores
