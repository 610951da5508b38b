"""The admin audit log: every change made through the admin API, who made it, and the state before and after."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, insert, select
from starlette.requests import Request

from gateway.tenants.tables import admin_audit_table

ACTOR_HEADER = "x-frugal-actor"


def actor_of(request: Request) -> str:
    """Who made an admin call: the admin key's holder, named by the optional `x-frugal-actor` header."""
    named = (request.headers.get(ACTOR_HEADER) or "").strip()[:200]
    return f"admin ({named})" if named else "admin"


class AdminAudit:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record(self, actor: str, action: str, target: str, before: Any = None, after: Any = None) -> dict[str, Any]:
        """Write one entry (at once: the change it describes was just made). Returns it."""
        values = {"at": datetime.now(UTC), "actor": actor, "action": action, "target": target,
                  "before": before, "after": after, "ok": True}
        with self.engine.begin() as connection:
            result = connection.execute(insert(admin_audit_table).values(**values))
            values["id"] = result.inserted_primary_key[0]
        return values

    def page(self, limit: int, before_id: int | None = None, action: str | None = None) -> list[dict[str, Any]]:
        """Newest first: at most `limit` entries older than `before_id`."""
        query = select(admin_audit_table).order_by(admin_audit_table.c.id.desc()).limit(limit)
        if before_id is not None:
            query = query.where(admin_audit_table.c.id < before_id)
        if action is not None:
            query = query.where(admin_audit_table.c.action == action)
        with self.engine.connect() as connection:
            return [dict(r._mapping) for r in connection.execute(query)]
