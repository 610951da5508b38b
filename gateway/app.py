"""The app factory: `create_app(config)` builds one independent gateway (no module-level state)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from gateway.admin import AdminGuard, admin_routes
from gateway.admin_analytics import analytics_routes
from gateway.admin_keys import admin_key_routes
from gateway.artifacts import ArtifactStore
from gateway.audits import Auditor
from gateway.auth import KeyStore
from gateway.backends import BackendRegistry, default_backends, pooled_kind
from gateway.cache.setup import build_response_cache
from gateway.completions import CompletionsEndpoint
from gateway.dashboard import dashboard_routes
from gateway.errors import install_error_handlers
from gateway.estimates import LiveEstimates
from gateway.feedback import FeedbackEndpoint
from gateway.ledger import Ledger
from gateway.ledger_journal import journal_for
from gateway.metrics import GatewayMetrics
from gateway.model_list import model_routes
from gateway.openapi import install_openapi
from gateway.operations import operations_routes
from gateway.ratelimit import Limiter, RateLimiter, RedisRateLimiter
from gateway.recorder import Recorder
from gateway.rollups import rollups_for
from gateway.routes import build_router
from gateway.settings import FrugalConfig
from gateway.shared_state import StateErrors, answers, state_client
from gateway.swaps import RouteSwitch
from gateway.tenants.audit import AdminAudit
from gateway.tenants.budgets import BudgetBook
from gateway.tenants.counters import BudgetCounters, RedisCounters, SqlCounters
from gateway.tenants.keys import Teams, VirtualKeys
from gateway.tenants.ledger_spend import spent_in_ledger
from gateway.tenants.reservations import BudgetGate
from router.cooldown import Cooldown
from router.shared_cooldown import SharedCooldown
from workers import tokens
from workers.backend import Backend

log = logging.getLogger("frugal.gateway")


def create_app(config: FrugalConfig, *, backends: dict[str, Backend] | None = None,
               registry: BackendRegistry | None = None) -> FastAPI:
    """A gateway for `config`. `backends` replaces the configured ones (for embedding the gateway in
    another program with backends it built itself); otherwise each model is built by the first kind of
    `registry` (default: local, direct HTTP, litellm) that claims it. Raises `ConfigError` when a route
    cannot be built (e.g. a cascade's scorer cannot be loaded)."""
    metrics = GatewayMetrics()
    ledger = Ledger(config.ledger.url, config.ledger.spill_path, rollups=rollups_for(config),
                    journal=journal_for(config.ledger))
    kinds = registry or default_backends(config.cache.scope)
    if any(m.pool is not None for m in config.models) and "pooled" not in kinds:
        kinds.register(pooled_kind(config.redis), first=True)
    built = backends if backends is not None else {m.name: kinds.build(m) for m in config.models}
    state_errors = StateErrors(metrics.registry)
    limiter: Limiter = RateLimiter()
    cooldown: Cooldown | None = None
    if config.redis.state:  # the distributed mode: limits and cooldowns shared by every replica
        state = state_client(config.redis.state, config.redis.timeout_s)
        limiter = RedisRateLimiter(state, state_errors, policy=config.redis.rate_limits)
        c = config.cooldown
        cooldown = SharedCooldown(c.failures, c.window_s, c.cooldown_s, state, models=[m.name for m in config.models],
                                  sync_s=config.redis.cooldown_sync_s,
                                  on_error=lambda exc: state_errors.report("cooldowns", "open", exc))
    router, context = build_router(config, built, cooldown)
    virtual_keys = VirtualKeys(ledger.engine, config.auth.cache_s)
    keys = KeyStore(config.auth, config.limits.requests_per_minute, config.limits.tokens_per_minute, virtual_keys)
    budget_book = BudgetBook(ledger.engine, config.auth.cache_s)
    counters: BudgetCounters = (
        RedisCounters(state_client(config.redis.state, config.redis.timeout_s),
                      spent_before=functools.partial(spent_in_ledger, ledger.engine))
        if config.redis.state and config.budgets.store in ("auto", "redis") else SqlCounters(ledger.engine))
    budgets = BudgetGate(budget_book, counters, config.models, lease_s=config.budgets.lease_s,
                         default_max_tokens=config.budgets.default_max_tokens, errors=state_errors)
    if config.auth.required and not len(keys):
        log.warning("auth is required but no key is usable: every request will get 401 "
                    "(set the environment variables named by auth.keys[].key_env)")
    metrics.watch_local_engines({name: backend.stats for name, backend in built.items()
                                 if callable(getattr(backend, "stats", None))})
    cache = build_response_cache(config.cache)
    estimates = LiveEstimates()
    metrics.watch(estimates)
    switch = RouteSwitch(context, router, ArtifactStore(config.artifacts.dir))
    switch.load_current()
    auditor = Auditor(config, ledger, metrics, estimates, embed=lambda: context.embedder().embed_many)
    endpoint = CompletionsEndpoint(
        keys=keys,
        limiter=limiter,
        router=router,
        recorder=Recorder(ledger, metrics, config.ledger.store_content, estimates, spend_tokens=limiter.spend),
        max_body_bytes=config.limits.max_body_bytes,
        default_timeout_s=max((m.timeout_s for m in config.models), default=60.0),
        store_content=config.ledger.store_content,
        cache=cache,
        auditor=auditor,
        budgets=budgets,
    )
    feedback = FeedbackEndpoint(keys, ledger, metrics, config.ledger.store_content, config.limits.max_body_bytes)

    async def watch_artifacts(interval_s: float) -> None:
        """Follow the artifact store: a promotion or rollback made elsewhere is served within `interval_s`."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await run_in_threadpool(switch.poll)
            except Exception:
                log.exception("looking at the artifact store failed")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(ledger.start)
        # The tokenizer that counts usage a provider did not report (a stream cut short): ~45 MB, loaded now
        # so that memory does not jump at the first such request (docs/gateway.md).
        await run_in_threadpool(tokens.load)
        if cache is not None and cache.semantic is not None:
            await run_in_threadpool(cache.semantic.embedder.load)  # fail at start, not on a first request
        await run_in_threadpool(auditor.load)
        auditor.announce()
        watcher = (asyncio.get_running_loop().create_task(watch_artifacts(config.artifacts.watch_interval_s))
                   if config.artifacts.watch_interval_s > 0 and switch.live else None)
        if isinstance(cooldown, SharedCooldown):
            cooldown.start()
        budgets.start()
        log.info("frugal gateway ready: %d models, %d routes, ledger %s", len(config.models),
                 len(config.routes), ledger.engine.url.render_as_string())
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await auditor.drain()
            await budgets.stop()
            if isinstance(cooldown, SharedCooldown):
                await cooldown.stop()
            if isinstance(limiter, RedisRateLimiter):
                await limiter.drain()
                await state.aclose()
            for backend in built.values():
                await backend.aclose()
            if cache is not None:
                await cache.aclose()
            await run_in_threadpool(ledger.close)

    app = FastAPI(title="Frugal", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.config = config
    app.state.ledger = ledger
    app.state.metrics = metrics
    app.state.router = router
    app.state.switch = switch
    app.state.auditor = auditor
    install_error_handlers(app)
    install_openapi(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await endpoint.handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await endpoint.handle(request, "completion")

    @app.post("/v1/feedback")
    async def post_feedback(request: Request) -> Response:
        return await feedback.handle(request)

    guard = AdminGuard()
    audit = AdminAudit(ledger.engine)
    app.state.admin_audit = audit
    app.include_router(admin_routes(guard, switch, ledger, estimates, config.limits.max_body_bytes))
    app.include_router(dashboard_routes(guard))
    app.include_router(analytics_routes(guard, ledger, switch, audit, config))
    names = [m.name for m in config.models] + [r.name for r in config.routes]
    app.include_router(admin_key_routes(guard, virtual_keys, Teams(ledger.engine), budget_book, budgets, audit, names,
                                        [k.id for k in config.auth.keys], config.limits.max_body_bytes))
    app.include_router(model_routes(names, keys))
    redis_ping = functools.partial(answers, state) if config.redis.state else None
    app.include_router(operations_routes(ledger, router.pool.cooldown, metrics, redis_ping))
    return app
