"""The admin API for keys, teams and budgets (docs/keys-and-budgets.md). Every change is audited.

- `POST /admin/keys`                 create a virtual key; the answer carries its secret (`key`), once
- `GET  /admin/keys`                 newest first, paginated (`limit`, `after`, `team_id`, `include_revoked`)
- `GET  /admin/keys/{id}`            one key with its budgets, spent and reserved
- `PATCH /admin/keys/{id}`           change name, team, models (scope), metadata, limits, expiry
- `POST /admin/keys/{id}/revoke`     refused by every replica within `auth.cache_s`
- `POST /admin/teams`, `GET /admin/teams`, `GET /admin/teams/{id}`
- `PUT  /admin/budgets`              {owner_type, owner_id, period, limit_usd}: create or change
- `GET  /admin/budgets?owner_id=`    budgets with spend; `DELETE /admin/budgets/{id}`
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

import orjson
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from gateway.admin import AdminGuard
from gateway.errors import APIError, bad_request
from gateway.pagination import Page, listing, page_of
from gateway.requests import read_json
from gateway.responses import json_response
from gateway.tenants.audit import AdminAudit, actor_of
from gateway.tenants.budgets import PERIODS, Budget, BudgetBook, OwnerType, Period, budget_view
from gateway.tenants.keys import Teams, VirtualKeys
from gateway.tenants.reservations import BudgetGate

MAX_METADATA_BYTES = 16 * 1024
_Shape = TypeVar("_Shape", bound=BaseModel)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetSpec(_Body):
    period: Period
    limit_usd: float = Field(ge=0, le=1e9)


def _metadata_size(value: dict[str, Any]) -> dict[str, Any]:
    if len(orjson.dumps(value)) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata may be at most {MAX_METADATA_BYTES} bytes of JSON")
    return value


class KeyChanges(_Body):
    name: str | None = Field(default=None, min_length=1, max_length=256)
    team_id: str | None = Field(default=None, max_length=64)
    #: Route and model names the key may call; null: all.
    models: list[str] | None = Field(default=None, max_length=1000)
    metadata: dict[str, Any] | None = None
    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)
    expires_at: datetime | None = None

    @field_validator("metadata")
    @classmethod
    def _small(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _metadata_size(value) if value is not None else value

    @field_validator("expires_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class NewKey(KeyChanges):
    name: str = Field(min_length=1, max_length=256)
    #: Instead of expires_at: seconds from now.
    expires_in_s: int | None = Field(default=None, gt=0)
    budgets: list[BudgetSpec] = Field(default_factory=list, max_length=3)


class NewTeam(_Body):
    name: str = Field(min_length=1, max_length=256)
    metadata: dict[str, Any] = Field(default_factory=dict)
    budgets: list[BudgetSpec] = Field(default_factory=list, max_length=3)

    @field_validator("metadata")
    @classmethod
    def _small(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _metadata_size(value)


class BudgetSet(BudgetSpec):
    owner_type: Literal["key", "team"]
    owner_id: str = Field(min_length=1, max_length=128)


def _parse(shape: type[_Shape], body: dict[str, Any]) -> _Shape:
    try:
        return shape.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(p) for p in error["loc"]) or None
        if error["type"] == "extra_forbidden":
            raise bad_request(f"Unrecognized field: '{param}'.", param=param, code="unknown_parameter") from exc
        if error["type"] == "missing":
            raise bad_request(f"Missing required field: '{param}'.", param=param,
                              code="missing_required_parameter") from exc
        message = error["msg"].removeprefix("Value error, ")
        raise bad_request(f"Invalid value for '{param}': {message}.", param=param, code="invalid_value") from exc


def _keyset(page: Page) -> tuple[str, str] | None:
    """The (created_at, id) cursor of a keys or teams page."""
    after = page.after
    if after is None:
        return None
    if not (isinstance(after, list) and len(after) == 2 and all(isinstance(v, str) for v in after)):
        raise bad_request("'after' is not a cursor of this list.", param="after", code="invalid_value")
    try:
        datetime.fromisoformat(after[0])
    except ValueError as exc:
        raise bad_request("'after' is not a cursor of this list.", param="after", code="invalid_value") from exc
    return after[0], after[1]


def _not_found(what: str, ident: str) -> APIError:
    return APIError(404, f"No {what} '{ident}'.", param="id", code=f"{what}_not_found")


def admin_key_routes(guard: AdminGuard, keys: VirtualKeys, teams: Teams, book: BudgetBook, gate: BudgetGate,
                     audit: AdminAudit, names: list[str], config_key_ids: list[str], max_body_bytes: int) -> APIRouter:
    """`names`: every model and route a key's scope may name; `config_key_ids`: the keys of the config
    file (budgets may be set on them too)."""
    routes = APIRouter()
    known = set(names)

    async def with_budgets(owners: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each key or team with its budgets and their spend, and each key with its team's budgets
        (`team_budgets`: they refuse its requests too); one read of the counters for the page."""
        if not owners:
            return owners
        teams_of_keys = {o["team_id"] for o in owners if o.get("object") == "key" and o.get("team_id")}
        budgets = await run_in_threadpool(book.list, [o["id"] for o in owners] + sorted(teams_of_keys))
        usage = await gate.usage(budgets)
        now = datetime.now(UTC)
        by_owner: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for budget, used in zip(budgets, usage, strict=True):
            by_owner.setdefault((budget.owner_type, budget.owner_id), []).append(budget_view(budget, used, now))
        shown = []
        for owner in owners:
            kind = "key" if owner.get("object") == "key" else "team"
            item = {**owner, "budgets": by_owner.get((kind, owner["id"]), [])}
            if kind == "key":
                item["team_budgets"] = by_owner.get(("team", owner["team_id"]), []) if owner.get("team_id") else []
            shown.append(item)
        return shown

    def check_scope(changes: KeyChanges) -> None:
        unknown = [m for m in changes.models or () if m not in known]
        if unknown:
            raise bad_request(f"Invalid value for 'models': '{unknown[0]}' is neither a model nor a route of this "
                              "gateway.", param="models", code="invalid_value")

    async def check_team(team_id: str | None) -> None:
        if team_id is not None and await run_in_threadpool(teams.get, team_id) is None:
            raise bad_request(f"Invalid value for 'team_id': no team '{team_id}'.", param="team_id",
                              code="invalid_value")

    async def set_budgets(request: Request, owner_type: OwnerType, owner_id: str, specs: list[BudgetSpec]) -> None:
        periods = [s.period for s in specs]
        if len(set(periods)) != len(periods):
            raise bad_request("Invalid value for 'budgets': one budget per period.", param="budgets",
                              code="invalid_value")
        for spec in specs:
            before, after = await run_in_threadpool(book.set, owner_type, owner_id, spec.period, spec.limit_usd)
            await run_in_threadpool(audit.record, actor_of(request), "budget.set", f"{owner_type}:{owner_id}",
                                    _budget_dict(before), _budget_dict(after))

    # -- keys ---------------------------------------------------------------------------------------
    @routes.post("/admin/keys")
    async def create_key(request: Request) -> Response:
        guard.check(request)
        spec = _parse(NewKey, await read_json(request, max_body_bytes))
        check_scope(spec)
        await check_team(spec.team_id)
        if spec.expires_at is not None and spec.expires_in_s is not None:
            raise bad_request("Give expires_at or expires_in_s, not both.", param="expires_in_s", code="invalid_value")
        expires = spec.expires_at or (datetime.now(UTC) + timedelta(seconds=spec.expires_in_s)
                                      if spec.expires_in_s else None)
        periods = [s.period for s in spec.budgets]
        if len(set(periods)) != len(periods):
            raise bad_request("Invalid value for 'budgets': one budget per period.", param="budgets",
                              code="invalid_value")
        row, secret = await run_in_threadpool(lambda: keys.create(
            name=spec.name, team_id=spec.team_id, models=spec.models, metadata=spec.metadata,
            requests_per_minute=spec.requests_per_minute, tokens_per_minute=spec.tokens_per_minute,
            expires_at=expires))
        await run_in_threadpool(audit.record, actor_of(request), "key.create", row["id"], None, row)
        await set_budgets(request, "key", row["id"], spec.budgets)
        [shown] = await with_budgets([row])
        return json_response({**shown, "key": secret}, status=201)

    @routes.get("/admin/keys")
    async def list_keys(request: Request) -> Response:
        guard.check(request)
        page = page_of(request)
        team = request.query_params.get("team_id") or None
        revoked = request.query_params.get("include_revoked", "false").lower() in ("1", "true", "yes")
        rows = await run_in_threadpool(keys.page, page.limit + 1, _keyset(page), team, revoked)
        body = listing(rows, page, lambda r: [r["created_at"], r["id"]])
        body["data"] = await with_budgets(body["data"])
        return json_response(body)

    async def one_key(key_id: str) -> dict[str, Any]:
        row = await run_in_threadpool(keys.get, key_id)
        if row is None:
            raise _not_found("key", key_id)
        [shown] = await with_budgets([row])
        return shown

    @routes.get("/admin/keys/{key_id}")
    async def get_key(request: Request, key_id: str) -> Response:
        guard.check(request)
        return json_response(await one_key(key_id))

    @routes.patch("/admin/keys/{key_id}")
    async def change_key(request: Request, key_id: str) -> Response:
        guard.check(request)
        body = await read_json(request, max_body_bytes)
        changes = _parse(KeyChanges, body)
        check_scope(changes)
        await check_team(changes.team_id)
        values = {name: getattr(changes, name) for name in body}  # only what was sent; null clears
        if "name" in values and values["name"] is None:
            raise bad_request("Invalid value for 'name': a key needs a name.", param="name", code="invalid_value")
        result = await run_in_threadpool(keys.change, key_id, values)
        if result is None:
            raise _not_found("key", key_id)
        await run_in_threadpool(audit.record, actor_of(request), "key.update", key_id, *result)
        return json_response(await one_key(key_id))

    @routes.post("/admin/keys/{key_id}/revoke")
    async def revoke_key(request: Request, key_id: str) -> Response:
        guard.check(request)
        result = await run_in_threadpool(keys.revoke, key_id)
        if result is None:
            raise _not_found("key", key_id)
        if result[0]["revoked_at"] is None:
            await run_in_threadpool(audit.record, actor_of(request), "key.revoke", key_id, *result)
        return json_response(await one_key(key_id))

    # -- teams --------------------------------------------------------------------------------------
    @routes.post("/admin/teams")
    async def create_team(request: Request) -> Response:
        guard.check(request)
        spec = _parse(NewTeam, await read_json(request, max_body_bytes))
        row = await run_in_threadpool(teams.create, spec.name, spec.metadata)
        await run_in_threadpool(audit.record, actor_of(request), "team.create", row["id"], None, row)
        await set_budgets(request, "team", row["id"], spec.budgets)
        [shown] = await with_budgets([row])
        return json_response(shown, status=201)

    @routes.get("/admin/teams")
    async def list_teams(request: Request) -> Response:
        guard.check(request)
        page = page_of(request)
        rows = await run_in_threadpool(teams.page, page.limit + 1, _keyset(page))
        body = listing(rows, page, lambda r: [r["created_at"], r["id"]])
        body["data"] = await with_budgets(body["data"])
        return json_response(body)

    @routes.get("/admin/teams/{team_id}")
    async def get_team(request: Request, team_id: str) -> Response:
        guard.check(request)
        row = await run_in_threadpool(teams.get, team_id)
        if row is None:
            raise _not_found("team", team_id)
        [shown] = await with_budgets([row])
        return json_response(shown)

    # -- budgets ------------------------------------------------------------------------------------
    @routes.put("/admin/budgets")
    async def put_budget(request: Request) -> Response:
        guard.check(request)
        spec = _parse(BudgetSet, await read_json(request, max_body_bytes))
        if spec.owner_type == "team":
            exists = await run_in_threadpool(teams.get, spec.owner_id) is not None
        else:
            exists = spec.owner_id in config_key_ids or await run_in_threadpool(keys.get, spec.owner_id) is not None
        if not exists:
            raise bad_request(f"Invalid value for 'owner_id': no {spec.owner_type} '{spec.owner_id}'.",
                              param="owner_id", code="invalid_value")
        await set_budgets(request, spec.owner_type, spec.owner_id, [BudgetSpec(period=spec.period,
                                                                               limit_usd=spec.limit_usd)])
        budget = next(b for b in await run_in_threadpool(book.of_uncached, spec.owner_type, spec.owner_id)
                      if b.period == spec.period)
        [used] = await gate.usage([budget])
        return json_response(budget_view(budget, used, datetime.now(UTC)))

    @routes.get("/admin/budgets")
    async def list_budgets(request: Request) -> Response:
        guard.check(request)
        page = page_of(request)
        owner = request.query_params.get("owner_id")
        budgets = await run_in_threadpool(book.list, [owner] if owner else None)
        start = int(page.after) if isinstance(page.after, int) else 0
        chosen = budgets[start:start + page.limit + 1]
        usage = await gate.usage(chosen)
        now = datetime.now(UTC)
        rows = [budget_view(b, u, now) for b, u in zip(chosen, usage, strict=True)]
        return json_response(listing(rows, page, lambda _row: start + page.limit))

    @routes.delete("/admin/budgets/{budget_id}")
    async def delete_budget(request: Request, budget_id: str) -> Response:
        guard.check(request)
        removed = await run_in_threadpool(book.remove, budget_id)
        if removed is None:
            raise _not_found("budget", budget_id)
        await run_in_threadpool(audit.record, actor_of(request), "budget.delete",
                                f"{removed.owner_type}:{removed.owner_id}", _budget_dict(removed), None)
        return json_response({"id": budget_id, "object": "budget", "deleted": True})

    return routes


def _budget_dict(budget: Budget | None) -> dict[str, Any] | None:
    if budget is None:
        return None
    return {"id": budget.id, "owner_type": budget.owner_type, "owner_id": budget.owner_id,
            "period": budget.period, "limit_usd": budget.limit_usd}


__all__ = ["PERIODS", "admin_key_routes"]
