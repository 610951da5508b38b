"""The admin API (docs/learning.md; the operators' issue adds keys, budgets and the dashboard).

The admin key comes from the environment variable `FRUGAL_ADMIN_KEY`, never from the config file. When it
is unset, admin features are off and every admin path says so (404, code `admin_disabled`); a client key
gets 403, no key 401.

- `GET  /admin/routes`                     every cascade route as it serves now (tiers, thresholds, judges,
                                           version, what a rollback returns to)
- `POST /admin/routes/swap`     {route, version}   serve a version ("config" or v0001…) from now on
- `POST /admin/routes/rollback` {route}            back to the version before
- `GET  /admin/learning?route=&since=&until=`     false-accept estimates (Wilson 95%), escalation rates, label
                                           coverage and audit cost from the ledger (window at most 90 days,
                                           default the last 24 hours), and this process's live counts
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from fastapi import APIRouter
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import APIError, bad_request, unauthorized
from gateway.estimates import LiveEstimates, ledger_estimates
from gateway.feedback import ledger_unavailable
from gateway.ledger import Ledger
from gateway.pagination import window_of
from gateway.requests import read_json
from gateway.responses import json_response
from gateway.swaps import RouteSwitch, SwapError

ADMIN_KEY_ENV = "FRUGAL_ADMIN_KEY"


class AdminGuard:
    """Lets the admin key through; refuses any other key, a client's included (403), and anonymous calls (401)."""

    def __init__(self, secret: str | None = None) -> None:
        secret = secret if secret is not None else os.environ.get(ADMIN_KEY_ENV)
        self._digest = hashlib.sha256(secret.encode()).digest() if secret else None

    @property
    def enabled(self) -> bool:
        return self._digest is not None

    def check(self, request: Request) -> None:
        if self._digest is None:
            raise APIError(404, f"Admin features are off: set the environment variable {ADMIN_KEY_ENV} to turn "
                           "them on.", code="admin_disabled")
        header = request.headers.get("authorization") or ""
        scheme, _, value = header.partition(" ")
        secret = value.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key", "")
        if not secret:
            raise unauthorized("The admin API needs the admin key: 'Authorization: Bearer ADMIN_KEY'.")
        if hmac.compare_digest(hashlib.sha256(secret.encode()).digest(), self._digest):
            return
        raise APIError(403, "This key may not use the admin API.", type="permission_error", code="forbidden")


def _route_of(body: dict[str, Any]) -> str:
    route = body.get("route")
    if not isinstance(route, str) or not route:
        raise bad_request("'route' is required: a cascade route's name.", param="route",
                          code="missing_required_parameter")
    return route


def admin_routes(guard: AdminGuard, switch: RouteSwitch, ledger: Ledger, live: LiveEstimates,
                 max_body_bytes: int) -> APIRouter:
    routes = APIRouter()

    def swap_error(exc: SwapError) -> APIError:
        return APIError(400 if "not a cascade route" not in str(exc) else 404, str(exc), param="version",
                        code="swap_refused")

    @routes.get("/admin/routes")
    async def list_routes(request: Request) -> Response:
        guard.check(request)
        return json_response({"object": "list", "data": [switch.describe(name) for name in switch.live]})

    @routes.post("/admin/routes/swap")
    async def swap(request: Request) -> Response:
        guard.check(request)
        body = await read_json(request, max_body_bytes)
        route, version = _route_of(body), body.get("version")
        if not isinstance(version, str) or not version:
            raise bad_request("'version' is required: \"config\" or a version such as \"v0002\".", param="version",
                              code="missing_required_parameter")
        try:
            return json_response(await run_in_threadpool(switch.swap, route, version))
        except SwapError as exc:
            raise swap_error(exc) from exc

    @routes.post("/admin/routes/rollback")
    async def rollback(request: Request) -> Response:
        guard.check(request)
        route = _route_of(await read_json(request, max_body_bytes))
        try:
            return json_response(await run_in_threadpool(switch.rollback, route))
        except SwapError as exc:
            raise swap_error(exc) from exc

    @routes.get("/admin/learning")
    async def learning(request: Request) -> Response:
        guard.check(request)
        since, until = window_of(request)
        names = [request.query_params["route"]] if "route" in request.query_params else list(switch.live)
        unknown = [n for n in names if n not in switch.live]
        if unknown:
            raise APIError(404, f"'{unknown[0]}' is not a cascade route.", param="route", code="route_not_found")
        try:
            windowed = [await run_in_threadpool(ledger_estimates, ledger, name, since, until) for name in names]
        except SQLAlchemyError as exc:
            raise ledger_unavailable() from exc
        return json_response({"object": "list", "data": windowed,
                              "live": {k: v for k, v in live.summary().items() if k in names}})

    return routes
