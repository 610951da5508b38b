"""The admin API's part of the OpenAPI document (tag `admin`, the admin key as bearer): every operation, its
parameters, its request bodies (the admin API's own validation models) and the errors it may answer."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from gateway.admin_keys import BudgetSet, KeyChanges, NewKey, NewTeam

#: Request bodies of admin operations (validation models, published under these names).
ADMIN_MODELS: tuple[type[BaseModel], ...] = (NewKey, KeyChanges, NewTeam, BudgetSet)

_ERRORS = {"400": "A parameter or the body is invalid (the error names it)",
           "401": "No admin key was sent", "403": "The key sent is not the admin key",
           "404": "Admin features are off (FRUGAL_ADMIN_KEY unset: code admin_disabled), or no such item"}


def _query(name: str, description: str, kind: str = "string") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": {"type": kind}}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


_PAGE = [_query("limit", "Items per page, 1 to 500 (default 50)", "integer"),
         _query("after", "The `next` cursor of the previous page")]
_WINDOW = [_query("since", "ISO 8601 start (default: until - 24 h; at most 90 days before until)"),
           _query("until", "ISO 8601 end (default: now)")]
_ROUTE = [_query("route", "A route's name")]


def _operation(summary: str, operation_id: str, *, parameters: list[dict[str, Any]] | None = None,
               body: str | None = None, created: bool = False) -> dict[str, Any]:
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    operation: dict[str, Any] = {
        "summary": summary, "operationId": operation_id, "tags": ["admin"], "security": [{"adminKey": []}],
        "responses": {"201" if created else "200": {"description": "OK", "content": {
            "application/json": {"schema": {"type": "object"}}}},
            **{status: {"description": text, "content": error} for status, text in _ERRORS.items()}},
    }
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": {
            "$ref": f"#/components/schemas/{body}"}}}}
    return operation


def _object_body(summary: str, operation_id: str, required: list[str]) -> dict[str, Any]:
    operation = _operation(summary, operation_id)
    operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": required, "properties": {name: {} for name in required}}}}}
    return operation


def admin_paths() -> dict[str, Any]:
    return {
        "/admin/routes": {"get": _operation("Every cascade route as it serves now", "adminListRoutes")},
        "/admin/routes/swap": {"post": _object_body("Serve a route with a version", "adminSwapRoute",
                                                    ["route", "version"])},
        "/admin/routes/rollback": {"post": _object_body("Back to the route's previous version", "adminRollbackRoute",
                                                        ["route"])},
        "/admin/learning": {"get": _operation("False-accept estimates and label coverage", "adminLearning",
                                              parameters=_ROUTE + _WINDOW)},
        "/admin/keys": {
            "post": _operation("Create a virtual key (its secret is in this answer only)", "adminCreateKey",
                               body="NewKey", created=True),
            "get": _operation("Keys, newest first, with their budgets' spend", "adminListKeys", parameters=[
                *_PAGE, _query("team_id", "Only this team's keys"),
                _query("include_revoked", "Include revoked keys", "boolean")]),
        },
        "/admin/keys/{key_id}": {
            "get": _operation("One key, its budgets' spend and reservations", "adminGetKey",
                              parameters=[_path("key_id")]),
            "patch": _operation("Change a key (fields sent; null clears)", "adminUpdateKey",
                                parameters=[_path("key_id")], body="KeyChanges"),
        },
        "/admin/keys/{key_id}/revoke": {"post": _operation("Revoke a key on every replica within a second",
                                                           "adminRevokeKey", parameters=[_path("key_id")])},
        "/admin/teams": {
            "post": _operation("Create a team", "adminCreateTeam", body="NewTeam", created=True),
            "get": _operation("Teams, newest first", "adminListTeams", parameters=_PAGE),
        },
        "/admin/teams/{team_id}": {"get": _operation("One team and its budgets", "adminGetTeam",
                                                     parameters=[_path("team_id")])},
        "/admin/budgets": {
            "put": _operation("Create or change a key's or team's budget for a period", "adminSetBudget",
                              body="BudgetSet"),
            "get": _operation("Budgets with their spend", "adminListBudgets",
                              parameters=[*_PAGE, _query("owner_id", "Only this key's or team's budgets")]),
        },
        "/admin/budgets/{budget_id}": {"delete": _operation("Remove a budget", "adminDeleteBudget",
                                                            parameters=[_path("budget_id")])},
        "/admin/analytics/overview": {"get": _operation(
            "Requests, spend, savings, cache, latency and errors by hour or day (from rollups)", "adminOverview",
            parameters=[*_WINDOW, *_ROUTE, _query("granularity", "hour or day")])},
        "/admin/analytics/funnel": {"get": _operation("A cascade route's funnel: cache, each tier, escalations",
                                                      "adminFunnel", parameters=_ROUTE + _WINDOW)},
        "/admin/analytics/judge": {"get": _operation(
            "Each tier's score histogram against its threshold", "adminJudge", parameters=[
                *_ROUTE, *_WINDOW, _query("learning", "Add false-accept estimates (reads the ledger)", "boolean")])},
        "/admin/traces": {"get": _operation("Requests, newest first, by id, key, route or time", "adminListTraces",
                                            parameters=[*_PAGE, *_WINDOW, *_ROUTE, _query("request_id", "One id"),
                                                        _query("key_id", "One key's requests"),
                                                        _query("purpose", "client (default) or audit")])},
        "/admin/traces/{request_id}": {"get": _operation("One request's decision trace", "adminGetTrace",
                                                         parameters=[_path("request_id")])},
        "/admin/whatif": {"get": _operation("A route's cost/accuracy frontier, and the thresholds a budget buys",
                                            "adminWhatIf", parameters=[*_ROUTE, _query("budget_usd",
                                                                                       "USD per query", "number")])},
        "/admin/whatif/apply": {"post": _object_body("Apply thresholds to a route now (audited)", "adminApply",
                                                     ["route", "tiers"])},
        "/admin/audit": {"get": _operation("The admin audit log, newest first", "adminAudit",
                                           parameters=[*_PAGE, _query("action", "Only this action")])},
    }
