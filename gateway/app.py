"""The app factory: `create_app(config)` builds one independent gateway (no module-level state)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import KeyStore
from gateway.backends import build_backend, build_cascades
from gateway.cache.setup import build_response_cache
from gateway.completions import CompletionsEndpoint
from gateway.compression import build_compression
from gateway.errors import APIError, model_not_found
from gateway.ledger import Ledger
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import RateLimiter
from gateway.recorder import Recorder
from gateway.settings import FrugalConfig
from router.cascade import CascadeRunner
from router.cooldown import Cooldown
from router.fallback import FallbackRouter, RetryPolicy
from workers.backend import Backend

log = logging.getLogger("frugal.gateway")


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's shape; nothing a client sends yields a traceback."""

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            error = APIError(404, f"Unknown path: {request.method} {request.url.path}", code="unknown_url")
        elif exc.status_code == 405:
            error = APIError(405, f"Method {request.method} is not allowed on {request.url.path}",
                             code="method_not_allowed")
        else:
            error = APIError(exc.status_code, str(exc.detail))
        return error.response()

    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return APIError(400, "Invalid request.", code="invalid_request").response()

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "The gateway failed unexpectedly; the error has been logged.",
                        type="server_error", code="internal_error").response()

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


def create_app(config: FrugalConfig, *, backends: dict[str, Backend] | None = None) -> FastAPI:
    """A gateway for `config`. `backends` replaces the configured ones (for embedding the gateway in
    another program with backends it built itself). Raises `ConfigError` when a cascade's scorer cannot
    be loaded."""
    metrics = GatewayMetrics()
    ledger = Ledger(config.ledger.url, config.ledger.spill_path)
    built = backends if backends is not None else {m.name: build_backend(m) for m in config.models}
    router = FallbackRouter(
        built,
        {r.name: list(r.models) for r in config.routes if r.kind == "fallback"},
        max_retries={m.name: m.max_retries for m in config.models},
        timeouts={m.name: m.timeout_s for m in config.models},
        retry=RetryPolicy(config.retry.backoff_base_s, config.retry.backoff_max_s),
        cooldown=Cooldown(config.cooldown.failures, config.cooldown.window_s, config.cooldown.cooldown_s),
        compression=build_compression(config),
    )
    cascades = CascadeRunner(router, build_cascades(config))
    keys = KeyStore(config.auth, config.limits.requests_per_minute)
    if config.auth.required and not len(keys):
        log.warning("auth is required but no key is usable: every request will get 401 "
                    "(set the environment variables named by auth.keys[].key_env)")
    metrics.watch_local_engines({name: backend.stats for name, backend in built.items()
                                 if callable(getattr(backend, "stats", None))})
    recorder = Recorder(ledger, metrics, config.ledger.store_content)
    cache = build_response_cache(config.cache)
    endpoint = CompletionsEndpoint(
        keys=keys,
        limiter=RateLimiter(),
        router=router,
        cascades=cascades,
        recorder=recorder,
        max_body_bytes=config.limits.max_body_bytes,
        default_timeout_s=max((m.timeout_s for m in config.models), default=60.0),
        store_content=config.ledger.store_content,
        cache=cache,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(ledger.start)
        if cache is not None and cache.semantic is not None:
            await run_in_threadpool(cache.semantic.embedder.load)  # fail at start, not on a first request
        log.info("frugal gateway ready: %d models, %d routes, ledger %s", len(config.models),
                 len(config.routes), ledger.engine.url.render_as_string())
        try:
            yield
        finally:
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
    _install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await endpoint.handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await endpoint.handle(request, "completion")

    model_names = [m.name for m in config.models] + [r.name for r in config.routes]

    def model_object(name: str, created: int) -> dict[str, object]:
        return {"id": name, "object": "model", "created": created, "owned_by": "frugal"}

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        try:
            keys.authenticate(request)
        except APIError as error:
            return error.response()
        created = int(time.time())
        return _json({"object": "list", "data": [model_object(n, created) for n in model_names]})

    @app.get("/v1/models/{name:path}")
    async def retrieve_model(request: Request, name: str) -> Response:
        try:
            keys.authenticate(request)
            if name not in model_names:
                raise model_not_found(name)
        except APIError as error:
            return error.response()
        return _json(model_object(name, int(time.time())))

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        ledger_ok = await run_in_threadpool(ledger.ping)
        cooling = router.cooldown.cooling()
        body = {"status": "ready" if ledger_ok else "not ready", "ledger": ledger_ok,
                "models_in_cooldown": sorted(cooling)}
        return _json(body, 200 if ledger_ok else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        metrics.cooldowns.set(len(router.cooldown.cooling()))
        metrics.ledger_written.set(ledger.written)
        return Response(metrics.render(), media_type=metrics.content_type)

    return app
