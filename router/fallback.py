"""Fallback routes: an ordered list of models; the first that answers wins (a concrete model is a route of
one). Retries, timeouts and cooldowns are the pool's (`router.pool`)."""

from __future__ import annotations

from router.pool import ModelPool
from router.stream import RouteStream
from router.trace import DecisionTrace
from workers.backend import GenerationRequest, GenerationResult


class FallbackRoute:
    """A `Route` over `models`, tried in order."""

    def __init__(self, name: str, models: list[str], pool: ModelPool) -> None:
        self.name = name
        self.models = list(models)
        self._pool = pool

    async def generate(self, request: GenerationRequest, trace: DecisionTrace) -> GenerationResult:
        return await self._pool.generate(self.models, request, trace)

    async def open_stream(self, request: GenerationRequest, trace: DecisionTrace) -> RouteStream:
        return await self._pool.open_stream(self.models, request, trace)
