"""The one shape every route has, and the router that finds a route by name.

A `Route` answers a request in full (`generate`) or as a stream (`open_stream`), writing what it did into
the request's `DecisionTrace`: the caller creates the trace and hands it over, so that whatever happened is
on record even when the call fails or is cancelled. Fallback routes (`router.fallback`) and cascades
(`router.cascade`) are routes; so is every concrete model (a fallback route of one). A route failing as a
whole raises `RouteFailed` or `RouteUnavailable` (`router.failures`).
"""

from __future__ import annotations

from typing import Protocol

from router.fallback import FallbackRoute
from router.pool import ModelPool
from router.stream import RouteStream
from router.trace import DecisionTrace
from workers.backend import GenerationRequest, GenerationResult


class Route(Protocol):
    #: What clients put in `model`.
    name: str

    async def generate(self, request: GenerationRequest, trace: DecisionTrace) -> GenerationResult:
        """The route's answer in full."""
        ...

    async def open_stream(self, request: GenerationRequest, trace: DecisionTrace) -> RouteStream:
        """The route's answer as a stream whose first chunk has arrived; the stream settles the route's
        books itself however it ends."""
        ...


class Router:
    """The configured routes, and every model of the pool as a route of its own."""

    def __init__(self, pool: ModelPool, routes: dict[str, Route]) -> None:
        self.pool = pool
        self._routes: dict[str, Route] = {name: FallbackRoute(name, [name], pool) for name in pool.backends}
        self._routes.update(routes)  # a route may not share a model's name (the configuration checks)

    def resolve(self, name: str) -> Route | None:
        """The route (or model) called `name`; None when the name is unknown. A request resolves its route
        once and keeps it: a route swapped meanwhile (`swap`) serves the next requests, never half of this one."""
        return self._routes.get(name)

    def swap(self, name: str, route: Route) -> Route:
        """Serve `name` with `route` from now on (one reference replaced: atomic for every request that
        resolves after it); returns the route it replaced."""
        previous = self._routes[name]
        self._routes[name] = route
        return previous
