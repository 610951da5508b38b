"""What operators and orchestrators poll: liveness, readiness, and the Prometheus metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from gateway.ledger import Ledger
from gateway.metrics import GatewayMetrics
from gateway.responses import json_response
from router.cooldown import Cooldown


def operations_routes(ledger: Ledger, cooldown: Cooldown, metrics: GatewayMetrics,
                      redis_ping: Callable[[], Awaitable[bool]] | None = None) -> APIRouter:
    """`GET /healthz` (the process is up), `GET /readyz` (the ledger answers; models in cooldown; whether the
    shared-state Redis answers) and `GET /metrics`. A Redis that is away leaves the replica ready (requests are
    served degraded, docs/reliability.md) but `readyz` says so, so that monitoring sees it."""
    routes = APIRouter()

    @routes.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @routes.get("/readyz")
    async def readyz() -> Response:
        ledger_ok = await run_in_threadpool(ledger.ping)
        redis_ok = await redis_ping() if redis_ping is not None else None
        status = "not ready" if not ledger_ok else "degraded" if redis_ok is False else "ready"
        body = {"status": status, "ledger": ledger_ok, "redis": redis_ok,
                "models_in_cooldown": sorted(cooldown.cooling())}
        return json_response(body, 200 if ledger_ok else 503)

    @routes.get("/metrics")
    async def metrics_endpoint() -> Response:
        metrics.cooldowns.set(len(cooldown.cooling()))
        metrics.ledger_written.set(ledger.written)
        return Response(metrics.render(), media_type=metrics.content_type)

    return routes
