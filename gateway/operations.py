"""What operators and orchestrators poll: liveness, readiness, and the Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from gateway.ledger import Ledger
from gateway.metrics import GatewayMetrics
from gateway.responses import json_response
from router.cooldown import Cooldown


def operations_routes(ledger: Ledger, cooldown: Cooldown, metrics: GatewayMetrics) -> APIRouter:
    """`GET /healthz` (the process is up), `GET /readyz` (the ledger answers; models in cooldown) and
    `GET /metrics`."""
    routes = APIRouter()

    @routes.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @routes.get("/readyz")
    async def readyz() -> Response:
        ledger_ok = await run_in_threadpool(ledger.ping)
        body = {"status": "ready" if ledger_ok else "not ready", "ledger": ledger_ok,
                "models_in_cooldown": sorted(cooldown.cooling())}
        return json_response(body, 200 if ledger_ok else 503)

    @routes.get("/metrics")
    async def metrics_endpoint() -> Response:
        metrics.cooldowns.set(len(cooldown.cooling()))
        metrics.ledger_written.set(ledger.written)
        return Response(metrics.render(), media_type=metrics.content_type)

    return routes
