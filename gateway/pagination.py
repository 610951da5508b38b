"""Pagination and time windows shared by every admin list: `?limit=` (default 50, at most 500) and an opaque
`?after=` cursor; lists answer `{"object": "list", "data": [...], "has_more": bool, "next": cursor|null}`.
Time windows are `?since=&until=` (ISO 8601), bounded (`MAX_WINDOW`), by default the last 24 hours."""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from starlette.requests import Request

from gateway.errors import bad_request

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_WINDOW = timedelta(days=90)


@dataclass(frozen=True, slots=True)
class Page:
    limit: int
    #: The decoded cursor (whatever the list put in it), or None for the first page.
    after: Any = None


def page_of(request: Request) -> Page:
    raw = request.query_params.get("limit")
    limit = DEFAULT_LIMIT
    if raw is not None:
        try:
            limit = int(raw)
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_LIMIT:
            raise bad_request(f"'limit' must be a whole number from 1 to {MAX_LIMIT}.", param="limit",
                              code="invalid_value")
    after = request.query_params.get("after")
    if not after:
        return Page(limit)
    try:
        return Page(limit, orjson.loads(base64.urlsafe_b64decode(after.encode() + b"==")))
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise bad_request("'after' is not a cursor this API gave out (use the `next` of the previous page).",
                          param="after", code="invalid_value") from exc


def cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value, default=str)).decode().rstrip("=")


def listing(rows: Sequence[dict[str, Any]], page: Page, next_after: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """The list body for `rows` fetched with `page.limit + 1` (the extra row says whether there is more)."""
    more = len(rows) > page.limit
    data = list(rows[:page.limit])
    return {"object": "list", "data": data, "has_more": more,
            "next": cursor(next_after(data[-1])) if more and data else None}


def parse_time(value: str | None, name: str, default: datetime) -> datetime:
    if value is None or value == "":
        return default
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise bad_request(f"'{name}' must be an ISO 8601 time (2026-12-01T00:00:00Z).", param=name,
                          code="invalid_value") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def window_of(request: Request, default: timedelta = timedelta(days=1),
              max_window: timedelta = MAX_WINDOW) -> tuple[datetime, datetime]:
    """The `since`/`until` window of a request: bounded, `since` before `until`."""
    now = datetime.now(UTC)
    until = parse_time(request.query_params.get("until"), "until", now)
    try:
        since = parse_time(request.query_params.get("since"), "since", until - default)
    except OverflowError as exc:  # until in year 1: no default window before it
        raise bad_request("'until' is too early.", param="until", code="invalid_value") from exc
    if since >= until:
        raise bad_request("'since' must be before 'until'.", param="since", code="invalid_value")
    if until - since > max_window:
        raise bad_request(f"The window may be at most {max_window.days} days.", param="since", code="invalid_value")
    return since, until
