"""Building the router from the configuration: the model pool, and each configured route by its kind.

Route kinds are a registry (`ROUTE_KINDS`): a new kind of route joins with a builder of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.compression import build_compression
from gateway.settings import ConfigError, FrugalConfig, RouteConfig
from router.cascade import CascadeRoute
from router.cooldown import Cooldown
from router.fallback import FallbackRoute
from router.pool import ModelPool, RetryPolicy
from router.route import Route, Router
from router.tiers import Tier
from workers.backend import Backend

if TYPE_CHECKING:
    from scorer.runtime import OnnxScorer

log = logging.getLogger("frugal.routes")

class RouteContext:
    """What route builders share while one router is built: the pool, and scorers loaded once per folder."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool
        self._scorers: dict[str, OnnxScorer] = {}

    def scorer(self, route: RouteConfig) -> OnnxScorer:
        """The route's scorer, loaded once per folder (ONNX Runtime sessions), shared by the routes using it."""
        from scorer.runtime import OnnxScorer, ScorerError  # noqa: PLC0415 (onnxruntime, only when needed)

        folder = str(route.scorer)
        if folder not in self._scorers:
            try:
                self._scorers[folder] = OnnxScorer(folder)
            except ScorerError as exc:
                raise ConfigError(f"route {route.name!r}: {exc}") from exc
        return self._scorers[folder]


RouteBuilder = Callable[[RouteConfig, RouteContext], Route]


def build_fallback(route: RouteConfig, context: RouteContext) -> Route:
    return FallbackRoute(route.name, list(route.models), context.pool)


def build_cascade(route: RouteConfig, context: RouteContext) -> Route:
    """A cascade route; its scorer must know every tier but the last."""
    scorer = context.scorer(route)
    unknown = [t.model for t in route.tiers[:-1] if not scorer.knows(t.model)]
    if unknown:
        raise ConfigError(f"route {route.name!r}: the scorer in {route.scorer} was not trained for "
                          f"{', '.join(unknown)} (every tier but the last is scored)")
    tiers = tuple(Tier(t.model, t.threshold if i < len(route.tiers) - 1 else None)
                  for i, t in enumerate(route.tiers))
    log.info("route %s: cascade %s", route.name,
             " -> ".join(t.model + (f" (>= {t.threshold:.3f})" if t.threshold is not None else "") for t in tiers))
    return CascadeRoute(route.name, tiers, scorer, context.pool)


ROUTE_KINDS: dict[str, RouteBuilder] = {"fallback": build_fallback, "cascade": build_cascade}


def build_pool(config: FrugalConfig, backends: dict[str, Backend]) -> ModelPool:
    return ModelPool(
        backends,
        max_retries={m.name: m.max_retries for m in config.models},
        timeouts={m.name: m.timeout_s for m in config.models},
        retry=RetryPolicy(config.retry.backoff_base_s, config.retry.backoff_max_s),
        cooldown=Cooldown(config.cooldown.failures, config.cooldown.window_s, config.cooldown.cooldown_s),
        compression=build_compression(config),
        capabilities={m.name: m.capability_set for m in config.models},
    )


def build_router(config: FrugalConfig, backends: dict[str, Backend]) -> Router:
    """The router over `backends`, with every configured route. Raises `ConfigError` when a route cannot
    be built (e.g. a cascade's scorer cannot be loaded)."""
    pool = build_pool(config, backends)
    context = RouteContext(pool)
    return Router(pool, {route.name: ROUTE_KINDS[route.kind](route, context) for route in config.routes})
