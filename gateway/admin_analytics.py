"""The analytics admin API (docs/analytics.md): spend, savings, cache and latency over time, a cascade's funnel
and judge scores, request traces, what-if on a cascade's frontier, and the admin audit log.

Every endpoint needs the admin key (`AdminGuard`). Figures over time read the rollups only
(gateway/rollups.py: hourly counters, so a window is rounded out to whole UTC hours); traces read the ledger by
primary key or by an indexed time window, a page at a time.

- `GET  /admin/analytics/overview?since&until&granularity=hour|day&route=`
- `GET  /admin/analytics/funnel?route&since&until`
- `GET  /admin/analytics/judge?route&since&until&learning=true`
- `GET  /admin/traces?request_id&key_id&route&purpose&since&until&limit&after`,  `GET /admin/traces/{request_id}`
- `GET  /admin/whatif?route&budget_usd`,  `POST /admin/whatif/apply {route, tiers: [{model, threshold}]}`
- `GET  /admin/audit?limit&after&action`
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from sqlalchemy import Row, func, select, tuple_
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from gateway.admin import AdminGuard
from gateway.artifacts import CONFIG, ArtifactError, ArtifactTier, RouteArtifact
from gateway.errors import APIError, bad_request
from gateway.estimates import ledger_estimates
from gateway.feedback import ledger_unavailable
from gateway.ledger import Ledger, requests_table
from gateway.pagination import listing, page_of, window_of
from gateway.requests import read_json
from gateway.responses import json_response
from gateway.rollups import (
    ACCEPTED_BINS,
    ESCALATED_BINS,
    HOUR_S,
    JUDGE_BINS,
    LATENCY_COLUMNS,
    REASON_COLUMNS,
    hour_start,
    latency_quantile,
    rollups_table,
    tier_rollups_table,
)
from gateway.routes import build_cascade
from gateway.settings import ConfigError, FrugalConfig
from gateway.single_flight import SharedReads
from gateway.swaps import RouteSwitch, SwapError
from gateway.tenants.audit import AdminAudit, actor_of

#: The client figures of the overview, summed from the rollups.
SUMMED = ("requests", "errors_4xx", "errors_5xx", "spend_usd", "saved_usd", "cache_exact", "cache_semantic",
          "cache_saved_usd", "compression_saved_usd")
#: Tier columns of a trace's summary.
TIER_SUMMARY = ("model", "outcome", "score", "threshold", "reason", "cost_usd")
CONTENT = ("prompt", "response")
#: Seconds a route's false-accept estimates (read from the ledger) are shared before they are read again.
LEARNING_TTL_S = 300.0


def analytics_routes(guard: AdminGuard, ledger: Ledger, switch: RouteSwitch, audit: AdminAudit,
                     config: FrugalConfig) -> APIRouter:
    """The analytics admin endpoints; they read the rollups the ledger writes (`Ledger(rollups=...)`)."""
    routes = APIRouter()
    applying = threading.Lock()
    estimates = SharedReads(LEARNING_TTL_S)

    async def read(function: Callable[..., Any], *args: Any) -> Any:
        try:
            return await run_in_threadpool(function, *args)
        except SQLAlchemyError as exc:
            raise ledger_unavailable() from exc

    def cascade_route(request: Request) -> str:
        name = request.query_params.get("route")
        if not name:
            if len(switch.live) == 1:
                return next(iter(switch.live))
            raise bad_request("'route' is required: the name of a cascade route.", param="route",
                              code="missing_required_parameter")
        if name not in switch.live:
            raise APIError(404, f"'{name}' is not a cascade route.", param="route", code="route_not_found")
        return name

    @routes.get("/admin/analytics/overview")
    async def overview(request: Request) -> Response:
        guard.check(request)
        since, until = window_of(request)
        granularity = request.query_params.get("granularity", "hour")
        if granularity not in ("hour", "day"):
            raise bad_request("'granularity' must be \"hour\" or \"day\".", param="granularity", code="invalid_value")
        route = request.query_params.get("route") or None
        return json_response(await read(overview_figures, ledger, since, until, granularity, route))

    @routes.get("/admin/analytics/funnel")
    async def funnel(request: Request) -> Response:
        guard.check(request)
        route = cascade_route(request)
        since, until = window_of(request)
        return json_response(await read(funnel_figures, ledger, route, since, until))

    @routes.get("/admin/analytics/judge")
    async def judge(request: Request) -> Response:
        guard.check(request)
        route = cascade_route(request)
        since, until = window_of(request)
        body = await read(judge_figures, ledger, route, since, until)
        live = {t["model"]: t["threshold"] for t in switch.describe(route)["tiers"]}
        for tier in body["tiers"]:
            tier["threshold"] = live.get(tier["model"])
        body["learning"] = body["learning_read_at"] = None
        if request.query_params.get("learning", "false").lower() in ("1", "true", "yes"):
            # The estimates read the ledger (seconds at a million rows): one read per route and window of whole
            # hours, shared by every caller for LEARNING_TTL_S, however often dashboards refresh.
            first, end_hour = _hours(since, until)
            start, end = hour_start(first), hour_start(end_hour)
            value, read_at = await estimates.get((route, start, end),
                                                 lambda: read(ledger_estimates, ledger, route, start, end))
            body["learning"] = value
            body["learning_read_at"] = datetime.fromtimestamp(read_at, UTC).isoformat()
        return json_response(body)

    @routes.get("/admin/traces")
    async def traces(request: Request) -> Response:
        guard.check(request)
        page = page_of(request)
        since, until = window_of(request)
        after = _trace_cursor(page.after)
        filters = {k: request.query_params[k] for k in ("request_id", "key_id", "route", "purpose")
                   if request.query_params.get(k)}
        rows = await read(trace_page, ledger, filters, since, until, after, page.limit + 1)
        return json_response(listing(rows, page, lambda row: [row["created_at"], row["id"]]))

    @routes.get("/admin/traces/{request_id}")
    async def trace(request: Request, request_id: str) -> Response:
        guard.check(request)
        row = await read(trace_row, ledger, request_id, config.ledger.store_content)
        if row is None:
            raise APIError(404, f"No request '{request_id}' is in the ledger.", param="request_id",
                           code="trace_not_found")
        return json_response(row)

    @routes.get("/admin/whatif")
    async def whatif(request: Request) -> Response:
        guard.check(request)
        route = cascade_route(request)
        budget = _budget(request.query_params.get("budget_usd"))
        return json_response(await run_in_threadpool(_whatif, config, switch, route, budget))

    @routes.post("/admin/whatif/apply")
    async def apply(request: Request) -> Response:
        guard.check(request)
        body = await read_json(request, config.limits.max_body_bytes)
        route = body.get("route")
        if not isinstance(route, str) or not route:
            if len(switch.live) != 1 or route is not None:
                raise bad_request("'route' is required: the name of a cascade route.", param="route",
                                  code="missing_required_parameter")
            route = next(iter(switch.live))
        if route not in switch.live:
            raise APIError(404, f"'{route}' is not a cascade route.", param="route", code="route_not_found")
        tiers = _tiers_of(body.get("tiers"), config.route(route).members)
        actor = actor_of(request)

        def apply_now() -> tuple[dict[str, Any], dict[str, Any], RouteArtifact]:
            with applying:  # one change at a time: its version number, and what "before" was
                before = switch.describe(route)
                artifact = _apply(switch, route, tiers, actor)
                return before, switch.describe(route), artifact

        before, after, artifact = await run_in_threadpool(apply_now)
        await read(audit.record, actor, "route.thresholds", route, before, after)
        return json_response({**after, "applied": artifact.version})

    @routes.get("/admin/audit")
    async def audit_log(request: Request) -> Response:
        guard.check(request)
        page = page_of(request)
        if page.after is not None and not isinstance(page.after, int):
            raise bad_request("'after' is not a cursor this API gave out.", param="after", code="invalid_value")
        action = request.query_params.get("action") or None
        rows = await read(audit.page, page.limit + 1, page.after, action)
        entries = [{str(name): value for name, value in row.items()} for row in rows]  # orjson: plain str keys
        return json_response(listing(entries, page, lambda row: row["id"]))

    return routes


# -- overview -------------------------------------------------------------------------------------------------
def _hours(since: datetime, until: datetime) -> tuple[int, int]:
    """The whole UTC hours that cover [since, until): [first, end)."""
    return math.floor(since.timestamp() / HOUR_S), math.ceil(until.timestamp() / HOUR_S)


def _figures(sums: dict[str, float], latency: Sequence[int]) -> dict[str, Any]:
    return {
        "requests": int(sums["requests"]),
        "errors": int(sums["errors_4xx"] + sums["errors_5xx"]),
        "errors_4xx": int(sums["errors_4xx"]),
        "errors_5xx": int(sums["errors_5xx"]),
        "spend_usd": sums["spend_usd"],
        "saved_usd": sums["saved_usd"],
        "cache_hits": int(sums["cache_exact"] + sums["cache_semantic"]),
        "cache_exact_hits": int(sums["cache_exact"]),
        "cache_semantic_hits": int(sums["cache_semantic"]),
        "cache_saved_usd": sums["cache_saved_usd"],
        "compression_saved_usd": sums["compression_saved_usd"],
        "p50_ms": _round(latency_quantile(latency, 0.5)),
        "p95_ms": _round(latency_quantile(latency, 0.95)),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def overview_figures(ledger: Ledger, since: datetime, until: datetime, granularity: str,
                     route: str | None) -> dict[str, Any]:
    """`GET /admin/analytics/overview`: client figures by hour or UTC day from the rollups, audits apart."""
    r = rollups_table.c
    first, end = _hours(since, until)
    where = [r.hour >= first, r.hour < end]
    if route is not None:
        where.append(r.route == route)
    columns = [*SUMMED, *LATENCY_COLUMNS]
    query = (select(r.hour, *(func.sum(r[c]).label(c) for c in columns))
             .where(r.purpose == "client", *where).group_by(r.hour).order_by(r.hour))
    audits = select(func.coalesce(func.sum(r.requests), 0), func.coalesce(func.sum(r.spend_usd), 0.0)).where(
        r.purpose == "audit", *where)
    names = select(r.route).where(r.purpose == "client", *where).distinct().order_by(r.route)
    with ledger.engine.connect() as connection:
        hourly = connection.execute(query).all()
        audit_requests, audit_spend = connection.execute(audits).one()
        route_names = [n for (n,) in connection.execute(names) if n]
    step = 24 if granularity == "day" else 1
    buckets: dict[int, list[float]] = {}
    for hour, *values in hourly:
        key = (hour // step) * step
        sums = buckets.get(key)
        if sums is None:
            buckets[key] = [float(v or 0) for v in values]
        else:
            for index, value in enumerate(values):
                sums[index] += float(value or 0)
    total = [0.0] * len(columns)
    series = []
    for key in sorted(buckets):
        values = buckets[key]
        total = [a + b for a, b in zip(total, values, strict=True)]
        series.append({"bucket": hour_start(key).isoformat(), **_split(columns, values)})
    return {"object": "analytics.overview", "since": since.isoformat(), "until": until.isoformat(),
            "granularity": granularity, "route": route, "totals": _split(columns, total), "series": series,
            "routes": route_names,
            "audits": {"requests": int(audit_requests), "spend_usd": float(audit_spend)}}


def _split(columns: Sequence[str], values: Sequence[float]) -> dict[str, Any]:
    sums = dict(zip(columns, values, strict=True))
    return _figures(sums, [int(sums[c]) for c in LATENCY_COLUMNS])


# -- cascades ---------------------------------------------------------------------------------------------------
def funnel_figures(ledger: Ledger, route: str, since: datetime, until: datetime) -> dict[str, Any]:
    """`GET /admin/analytics/funnel`: a cascade route's requests, cache hits and each tier's outcomes."""
    first, end = _hours(since, until)
    r, t = rollups_table.c, tier_rollups_table.c
    counts = [r.requests, r.cache_exact, r.cache_semantic, r.cascade_requests, r.unanswered, r.unaccepted]
    totals = select(*(func.coalesce(func.sum(c), 0) for c in counts)).where(
        r.route == route, r.purpose == "client", r.hour >= first, r.hour < end)
    tier_columns = ["reached", "accepted", "fallback_accepted", *REASON_COLUMNS.values()]
    tiers = (select(t.tier, t.model, *(func.sum(t[c]).label(c) for c in tier_columns))
             .where(t.route == route, t.hour >= first, t.hour < end)
             .group_by(t.tier, t.model).order_by(t.tier, func.sum(t.reached).desc()))
    with ledger.engine.connect() as connection:
        requests, exact, semantic, cascaded, unanswered, unaccepted = connection.execute(totals).one()
        rows = connection.execute(tiers).all()
    return {
        "object": "analytics.funnel", "route": route, "since": since.isoformat(), "until": until.isoformat(),
        "requests": int(requests), "cache_hits": int(exact + semantic), "cascaded": int(cascaded),
        "tiers": [{"tier": row.tier, "model": row.model, "reached": int(row.reached),
                   "accepted": int(row.accepted), "fallback_accepted": int(row.fallback_accepted),
                   "escalated": {reason: int(row._mapping[column]) for reason, column in REASON_COLUMNS.items()}}
                  for row in rows],
        "unanswered": int(unanswered), "unaccepted": int(unaccepted),
    }


def judge_figures(ledger: Ledger, route: str, since: datetime, until: datetime) -> dict[str, Any]:
    """`GET /admin/analytics/judge` (without the live thresholds): each judged tier's score histogram."""
    first, end = _hours(since, until)
    t = tier_rollups_table.c
    bins = [*ACCEPTED_BINS, *ESCALATED_BINS]
    query = (select(t.tier, t.model, *(func.sum(t[c]).label(c) for c in bins))
             .where(t.route == route, t.hour >= first, t.hour < end)
             .group_by(t.tier, t.model).order_by(t.tier, t.model))
    seen = (select(t.tier, t.model, t.threshold).where(t.route == route, t.hour >= first, t.hour < end,
                                                        t.threshold.is_not(None)).order_by(t.hour))
    with ledger.engine.connect() as connection:
        rows = connection.execute(query).all()
        thresholds = {(row.tier, row.model): row.threshold for row in connection.execute(seen)}
    tiers = []
    for row in rows:
        counts = row._mapping
        if not any(counts[c] for c in bins):
            continue  # never judged (the last tier, or a tier that only failed)
        tiers.append({"tier": row.tier, "model": row.model, "threshold": None,
                      "threshold_seen": thresholds.get((row.tier, row.model)),
                      "bins": [{"lo": i / JUDGE_BINS, "hi": (i + 1) / JUDGE_BINS,
                                "accepted": int(counts[ACCEPTED_BINS[i]]), "escalated": int(counts[ESCALATED_BINS[i]])}
                               for i in range(JUDGE_BINS)]})
    return {"object": "analytics.judge", "route": route, "since": since.isoformat(), "until": until.isoformat(),
            "tiers": tiers}


# -- traces -----------------------------------------------------------------------------------------------------
def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _trace_cursor(after: Any) -> tuple[datetime, str] | None:
    if after is None:
        return None
    try:
        created, request_id = after
        return _utc(datetime.fromisoformat(str(created))), str(request_id)
    except (TypeError, ValueError) as exc:
        raise bad_request("'after' is not a cursor this API gave out (use the `next` of the previous page).",
                          param="after", code="invalid_value") from exc


def _summary(row: Row) -> dict[str, Any]:
    trace = row.trace or {}
    return {"id": row.id, "created_at": _utc(row.created_at).isoformat(), "key_id": row.key_id, "route": row.route,
            "model": row.model, "status": row.status, "error_code": row.error_code, "cost_usd": row.cost_usd,
            "latency_ms": row.latency_ms, "cache": row.cache, "purpose": row.purpose,
            "accepted_tier": trace.get("accepted_tier"),
            "tiers": [{k: tier.get(k) for k in TIER_SUMMARY} for tier in trace.get("tiers") or ()]}


def trace_page(ledger: Ledger, filters: dict[str, str], since: datetime, until: datetime,
               after: tuple[datetime, str] | None, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` rows' summaries in [since, until), newest first, older than the cursor `after`
    (created_at, id); `filters`: request_id, key_id, route, purpose (indexed: id, key and route with time)."""
    c = requests_table.c
    query = select(c.id, c.created_at, c.key_id, c.route, c.model, c.status, c.error_code, c.cost_usd, c.latency_ms,
                   c.cache, c.purpose, c.trace).where(c.created_at >= since, c.created_at < until)
    for name, value in filters.items():
        query = query.where((c.id if name == "request_id" else c[name]) == value)
    if after is not None:
        query = query.where(tuple_(c.created_at, c.id) < tuple_(after[0], after[1]))
    query = query.order_by(c.created_at.desc(), c.id.desc()).limit(limit)
    with ledger.engine.connect() as connection:
        return [_summary(row) for row in connection.execute(query)]


def trace_row(ledger: Ledger, request_id: str, store_content: bool) -> dict[str, Any] | None:
    """One ledger row by its id, trace included (prompt and response only when content is stored)."""
    query = select(requests_table).where(requests_table.c.id == request_id)
    with ledger.engine.connect() as connection:
        row = connection.execute(query).first()
    if row is None:
        return None
    body = {str(name): value for name, value in row._mapping.items()}  # plain str: orjson refuses subclasses
    body["created_at"] = _utc(body["created_at"]).isoformat()
    if not store_content:
        for name in CONTENT:
            body.pop(name, None)
    return body


# -- what-if ------------------------------------------------------------------------------------------------------
def _budget(raw: str | None) -> float | None:
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise bad_request("'budget_usd' must be a cost per query in USD, 0 or more.", param="budget_usd",
                          code="invalid_value")
    return value


def _point(point: Any) -> dict[str, Any]:
    return {"tiers": [{"model": t.model, "threshold": t.threshold} for t in point.tiers],
            "accuracy": point.accuracy, "cost_usd": point.cost_usd}


def _same_tiers(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> bool:
    def close(x: float | None, y: float | None) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and abs(x - y) < 1e-9)

    return len(a) == len(b) and all(p["model"] == q["model"] and close(p["threshold"], q["threshold"])
                                    for p, q in zip(a, b, strict=True))


def _whatif(config: FrugalConfig, switch: RouteSwitch, route: str, budget: float | None) -> dict[str, Any]:
    from router.cascade_file import CascadeFile, CascadeFileError  # noqa: PLC0415 - only for fitted routes

    fitted = config.route(route).fitted_from
    frontier: list[dict[str, Any]] = []
    source = "none"
    if fitted:
        try:
            frontier = [_point(p) for p in CascadeFile.read(Path(fitted)).frontier]
            source = "cascade file"
        except CascadeFileError:
            frontier = []
    live = [{"model": t["model"], "threshold": t["threshold"]} for t in switch.describe(route)["tiers"]]
    match = next((p for p in frontier if _same_tiers(p["tiers"], live)), None)
    current = {"tiers": live, "accuracy": match["accuracy"] if match else None,
               "cost_usd": match["cost_usd"] if match else None}
    proposal = None
    if budget is not None:
        affordable = [p for p in frontier if math.isfinite(p["cost_usd"]) and p["cost_usd"] <= budget]
        if affordable:
            proposal = max(affordable, key=lambda p: (p["accuracy"], -p["cost_usd"]))
    return {"object": "analytics.whatif", "route": route, "budget_usd": budget, "frontier": frontier,
            "current": current, "proposal": proposal, "source": source, "fitted_from": fitted}


def _tiers_of(raw: Any, members: Sequence[str]) -> list[tuple[str, float | None]]:
    """The tiers of an apply body, checked: the route's models, each once; thresholds in [0, 1]; none on the last."""
    if not isinstance(raw, list) or not raw:
        raise bad_request("'tiers' is required: a list of {model, threshold}, the last without a threshold.",
                          param="tiers", code="missing_required_parameter")
    tiers: list[tuple[str, float | None]] = []
    for index, entry in enumerate(raw):
        where = f"tiers[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise bad_request(f"'{where}' needs a model name.", param="tiers", code="invalid_value")
        model, threshold = entry["model"], entry.get("threshold")
        if model not in members:
            raise bad_request(f"'{where}': {model!r} is not one of the route's models ({', '.join(members)}).",
                              param="tiers", code="invalid_value")
        if any(model == m for m, _ in tiers):
            raise bad_request(f"'{where}': {model!r} is already a tier.", param="tiers", code="invalid_value")
        last = index == len(raw) - 1
        if last:
            if threshold is not None:
                raise bad_request(f"'{where}': the last tier has no threshold (its answer is always taken).",
                                  param="tiers", code="invalid_value")
        elif isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
            raise bad_request(f"'{where}': threshold must be a number from 0 to 1.", param="tiers",
                              code="invalid_value")
        tiers.append((model, None if last else float(threshold)))
    return tiers


def _judges_now(switch: RouteSwitch, route: str) -> dict[str, str]:
    """Each model's judge as the route serves now: a live artifact's, else the configuration's ("packaged":
    the local model's packaged judge, as `build_cascade` reads it)."""
    version = switch.live[route].version
    if version != CONFIG:
        try:
            return {t.model: t.judge for t in switch.store.read(route, version).tiers}
        except ArtifactError:
            pass
    return {t.model: t.judge or "packaged" for t in switch.context.config.route(route).tiers}


def _apply(switch: RouteSwitch, route: str, tiers: list[tuple[str, float | None]], actor: str) -> RouteArtifact:
    """Write the tiers as the route's next artifact version and serve it (the new cascade is built first: one
    that cannot serve is refused before anything is written)."""
    judges = _judges_now(switch, route)
    placed = [ArtifactTier(model, threshold, judges.get(model, "packaged")) for model, threshold in tiers]
    parent = switch.live[route].version
    config = switch.context.config.route(route)
    try:
        build_cascade(config, switch.context, RouteArtifact(route, "v0000", placed, parent=parent))
    except ConfigError as exc:
        raise bad_request(f"These tiers cannot serve route {route!r}: {exc}", param="tiers",
                          code="invalid_value") from exc
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    artifact = switch.store.new_version(route, placed, parent=parent,
                                        meta={"made_by": "admin what-if", "actor": actor, "at": stamp})
    try:
        switch.swap(route, artifact.version, why=f"what-if apply by {actor}")
    except SwapError as exc:
        raise APIError(400, str(exc), param="tiers", code="swap_refused") from exc
    return artifact

