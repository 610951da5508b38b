"""Building the router from the configuration: the model pool, and each configured route by its kind.

Route kinds are a registry (`ROUTE_KINDS`): a new kind of route joins with a builder of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.artifacts import CONFIG, RouteArtifact
from gateway.compression import build_compression
from gateway.settings import ConfigError, FrugalConfig, RouteConfig, TierConfig
from router.cascade import CascadeRoute
from router.cooldown import Cooldown
from router.fallback import FallbackRoute
from router.pool import ModelPool, RetryPolicy
from router.route import Route, Router
from router.tiers import Tier
from workers.backend import Backend

if TYPE_CHECKING:
    from gateway.cache.embedder import Embedder
    from scorer.judge import LocalJudge
    from scorer.runtime import OnnxScorer

log = logging.getLogger("frugal.routes")

class RouteContext:
    """What route builders share while one router is built: the configuration, the pool, and scorers and
    judges loaded once per folder."""

    def __init__(self, config: FrugalConfig, pool: ModelPool) -> None:
        self.config = config
        self.pool = pool
        self._scorers: dict[str, OnnxScorer] = {}
        self._judges: dict[str, LocalJudge] = {}
        self._embedder: Embedder | None = None

    def scorer(self, route: RouteConfig) -> OnnxScorer | None:
        """The route's scorer, loaded once per folder (ONNX Runtime sessions), shared by the routes using it."""
        if route.scorer is None:
            return None
        from scorer.runtime import OnnxScorer, ScorerError  # noqa: PLC0415 (onnxruntime, only when needed)

        folder = str(route.scorer)
        if folder not in self._scorers:
            try:
                self._scorers[folder] = OnnxScorer(folder)
            except ScorerError as exc:
                raise ConfigError(f"route {route.name!r}: {exc}") from exc
        return self._scorers[folder]

    def judge(self, route: RouteConfig, tier: TierConfig) -> LocalJudge | None:
        """A local tier's judge: its configured folder, else the one packaged for its model (None for remote
        tiers, `judge: none`, or a local model that has no packaged judge)."""
        from scorer.judge import JudgeError, LocalJudge, packaged_judge  # noqa: PLC0415

        model = self.config.model(tier.model)
        if tier.judge == "none" or (tier.judge is None and not model.is_local):
            return None
        folder = Path(tier.judge) if tier.judge else packaged_judge(model.backend)
        if folder is None:
            log.warning("route %s: no judge is packaged for %s; its answers are accepted unjudged (build one "
                        "with `frugal judge build`)", route.name, model.backend)
            return None
        key = str(folder)
        if key not in self._judges:
            try:
                self._judges[key] = LocalJudge(folder, embed=self.embedder().embed_many)
            except (JudgeError, OSError, KeyError) as exc:
                raise ConfigError(f"route {route.name!r}, tier {tier.model}: {exc}") from exc
        judge = self._judges[key]
        if judge.model.removeprefix("local/") != model.backend.removeprefix("local/"):
            log.warning("route %s: the judge in %s was built for %s, and tier %s is %s", route.name, folder,
                        judge.model, tier.model, model.backend)
        return judge

    def embedder(self) -> Embedder:
        """MiniLM for the judges' long-answer agreement, shared by them (loaded on its first text)."""
        from gateway.cache.embedder import Embedder  # noqa: PLC0415

        if self._embedder is None:
            self._embedder = Embedder()
        return self._embedder


RouteBuilder = Callable[[RouteConfig, RouteContext], Route]


def build_fallback(route: RouteConfig, context: RouteContext) -> Route:
    return FallbackRoute(route.name, list(route.models), context.pool)


def price_order(models: list[str], config: FrugalConfig) -> list[TierConfig]:
    """`models` as tiers, cheapest first (by the sum of input and output prices; local models are free),
    in the given order among equals."""
    def price(name: str) -> float:
        model = config.model(name)
        return model.input_cost_per_token + model.output_cost_per_token

    return [TierConfig(model=m) for m in sorted(models, key=price)]


def artifact_tiers(artifact: RouteArtifact) -> list[TierConfig]:
    """An artifact's tiers as configured tiers ("packaged": the model's packaged judge)."""
    return [TierConfig(model=t.model, threshold=t.threshold, judge=None if t.judge == "packaged" else t.judge)
            for t in artifact.tiers]


def build_cascade(route: RouteConfig, context: RouteContext, artifact: RouteArtifact | None = None) -> CascadeRoute:
    """A cascade route: each tier judged by its judge, else by the route's scorer, else accepted. With an
    `artifact` (a promoted version, `gateway.artifacts`), its tiers, thresholds and judges replace the
    configured ones; it may not name models the route does not have."""
    scorer = context.scorer(route)
    configured = route.tiers or price_order(route.models, context.config)
    if artifact is not None:
        unknown = sorted({t.model for t in artifact.tiers} - set(route.members))
        if unknown:
            raise ConfigError(f"route {route.name!r}, artifact {artifact.version}: names models the route does "
                              f"not have: {', '.join(unknown)}")
        configured = artifact_tiers(artifact)
    judges: dict[str, LocalJudge] = {}
    tiers: list[Tier] = []
    for index, tier in enumerate(configured):
        last = index == len(configured) - 1
        judge = None if last else context.judge(route, tier)
        threshold = None
        if judge is not None:
            judges[tier.model] = judge
            threshold = tier.threshold if tier.threshold is not None else judge.threshold
        elif not last and scorer is not None and scorer.knows(tier.model):
            if tier.threshold is None:
                raise ConfigError(f"route {route.name!r}: tier {tier.model} is judged by the scorer in "
                                  f"{route.scorer} and needs a threshold")
            threshold = tier.threshold
        elif not last and tier.threshold is not None:
            raise ConfigError(f"route {route.name!r}: tier {tier.model} has a threshold, but neither a judge nor "
                              f"the route's scorer knows it (every tier but the last is judged by one of them)")
        tiers.append(Tier(tier.model, threshold))
    log.info("route %s%s: cascade %s (when no tier accepts: %s)", route.name,
             f" (artifact {artifact.version})" if artifact is not None else "",
             " -> ".join(t.model + (f" (judge >= {t.threshold:.3f})" if t.threshold is not None else
                                    " (unjudged)" if i < len(tiers) - 1 else " (last)")
                         for i, t in enumerate(tiers)), route.on_unaccepted)
    missing = [f"{t.model} (${m.api_key_env} is not set)" for t in tiers
               if (m := context.config.model(t.model)).api_key_env and m.resolved_api_key() is None]
    if missing:
        log.warning("route %s: tiers skipped until their keys are set: %s", route.name, ", ".join(missing))
    return CascadeRoute(route.name, tiers, scorer, context.pool, judges=judges, on_unaccepted=route.on_unaccepted,
                        label=artifact.version if artifact is not None else CONFIG)


ROUTE_KINDS: dict[str, RouteBuilder] = {"fallback": build_fallback, "cascade": build_cascade}


def build_pool(config: FrugalConfig, backends: dict[str, Backend], cooldown: Cooldown | None = None) -> ModelPool:
    return ModelPool(
        backends,
        max_retries={m.name: m.max_retries for m in config.models},
        timeouts={m.name: m.timeout_s for m in config.models},
        retry=RetryPolicy(config.retry.backoff_base_s, config.retry.backoff_max_s),
        cooldown=cooldown or Cooldown(config.cooldown.failures, config.cooldown.window_s, config.cooldown.cooldown_s),
        compression=build_compression(config),
        capabilities={m.name: m.capability_set for m in config.models},
    )


def build_router(config: FrugalConfig, backends: dict[str, Backend],
                 cooldown: Cooldown | None = None) -> tuple[Router, RouteContext]:
    """The router over `backends`, with every configured route, and the context that built it (to build
    routes again: `gateway.swaps`). Raises `ConfigError` when a route cannot be built (e.g. a cascade's
    scorer cannot be loaded). `cooldown` replaces the in-process one (e.g. one shared through Redis)."""
    pool = build_pool(config, backends, cooldown)
    context = RouteContext(config, pool)
    return Router(pool, {route.name: ROUTE_KINDS[route.kind](route, context) for route in config.routes}), context
