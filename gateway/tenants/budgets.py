"""Budgets: USD limits per key or team, per UTC day, calendar month or in total, and where they are defined.

A budget is a row of `frugal_budgets` (owner, period, limit). What has been spent against it, and what
running requests have reserved, are counters (`gateway.tenants.counters`): in Redis when the gateway has a
state Redis, else in SQL. Amounts are integers in nano-USD, so counters add up exactly.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from gateway.tenants.tables import budgets_table
from gateway.tenants.ttl_cache import TtlCache

Period = Literal["day", "month", "total"]
PERIODS: tuple[Period, ...] = ("day", "month", "total")
OwnerType = Literal["key", "team"]
NANOS = 1_000_000_000


def to_nanos(usd: float) -> int:
    return round(usd * NANOS)


def to_usd(nanos: int) -> float:
    return nanos / NANOS


def period_label(period: Period, now: datetime) -> str:
    """The period a moment falls in: "2026-12-05", "2026-12" or "total"."""
    if period == "day":
        return now.strftime("%Y-%m-%d")
    if period == "month":
        return now.strftime("%Y-%m")
    return "total"


def resets_at(period: Period, now: datetime) -> datetime | None:
    """When the period `now` falls in ends (UTC midnight, the first of the next month), or None (total)."""
    if period == "day":
        return datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
    if period == "month":
        return datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    return None


def counter_ttl_s(period: Period) -> int:
    """How long a period's counters are kept once written (0: for ever): past the period, with a margin."""
    return {"day": 3 * 86400, "month": 62 * 86400, "total": 0}[period]


@dataclass(frozen=True, slots=True)
class Budget:
    id: str
    owner_type: OwnerType
    owner_id: str
    period: Period
    limit_usd: float
    #: When the budget was set: spend before it does not count against it.
    created_at: datetime | None = None

    @property
    def limit_nanos(self) -> int:
        return to_nanos(self.limit_usd)

    def describe(self) -> str:
        """How an error names it: "the daily budget of key 'k1' ($0.50)"."""
        kind = {"day": "daily", "month": "monthly", "total": "total"}[self.period]
        return f"the {kind} budget of {self.owner_type} '{self.owner_id}' (${self.limit_usd:g})"


@dataclass(frozen=True, slots=True)
class Usage:
    spent_nanos: int = 0
    reserved_nanos: int = 0
    #: The budget's last word was a refusal: too little is left for the requests that come.
    refusing: bool = False
    #: When it last refused a reservation (Unix time; None: never).
    refused_at: float | None = None


def budget_view(budget: Budget, usage: Usage, now: datetime) -> dict[str, Any]:
    """A budget as the admin API shows it: limit, spent, reserved, when it resets, whether it is exhausted."""
    reset = resets_at(budget.period, now)
    spent = to_usd(usage.spent_nanos)
    return {"id": budget.id, "owner_type": budget.owner_type, "owner_id": budget.owner_id, "period": budget.period,
            "limit_usd": budget.limit_usd, "spent_usd": round(spent, 9),
            "reserved_usd": round(to_usd(usage.reserved_nanos), 9),
            "remaining_usd": round(max(0.0, budget.limit_usd - spent), 9),
            "period_start": period_label(budget.period, now),
            "resets_at": reset.isoformat() if reset else None,
            "last_refused_at": (datetime.fromtimestamp(usage.refused_at, UTC).isoformat()
                                if usage.refused_at is not None else None),
            # spent to the limit, or refusing: what is left is less than the last request needed
            "exhausted": usage.spent_nanos >= budget.limit_nanos or usage.refusing}


def _budget(row: Any) -> Budget:
    created = row.created_at
    if created is not None and created.tzinfo is None:
        created = created.replace(tzinfo=UTC)  # SQLite gives back naive UTC times
    return Budget(row.id, row.owner_type, row.owner_id, row.period, float(row.limit_usd), created)


def period_start_time(period: Period, label: str) -> datetime | None:
    """When the period named `label` began (None for "total")."""
    if period == "day":
        return datetime.strptime(label, "%Y-%m-%d").replace(tzinfo=UTC)
    if period == "month":
        return datetime.strptime(label, "%Y-%m").replace(tzinfo=UTC)
    return None


class BudgetsUnknown(Exception):
    """An owner's budgets cannot be read (the database is unreachable) and were never read before."""


class BudgetBook:
    """The budgets defined in SQL, read through a short cache (`cache_s`): a budget created, changed or
    removed on one replica applies on every replica within `cache_s`."""

    def __init__(self, engine: Engine, cache_s: float = 0.5) -> None:
        self.engine = engine
        self._cache: TtlCache[tuple[str, str], tuple[Budget, ...]] = TtlCache(cache_s)

    def cached(self, owner_type: OwnerType, owner_id: str) -> tuple[Budget, ...] | None:
        """The budgets of one key or team if read less than `cache_s` ago, else None (read them with `of`)."""
        hit = self._cache.fresh((owner_type, owner_id))
        return hit[0] if hit is not None else None

    def of(self, owner_type: OwnerType, owner_id: str) -> tuple[Budget, ...]:
        """The budgets of one key or team (cached). While the database cannot be read, the budgets last read
        (however old) still apply; an owner never read raises `BudgetsUnknown`."""
        hit = self.cached(owner_type, owner_id)
        if hit is not None:
            return hit
        query = select(budgets_table).where(budgets_table.c.owner_type == owner_type,
                                            budgets_table.c.owner_id == owner_id)
        try:
            with self.engine.connect() as connection:
                found = tuple(_budget(r) for r in connection.execute(query))
        except SQLAlchemyError as exc:
            stale = self._cache.stale((owner_type, owner_id))
            if stale is None:
                raise BudgetsUnknown(f"the budgets of {owner_type} {owner_id!r} cannot be read: {exc}") from exc
            return stale[0]
        self._cache.put((owner_type, owner_id), found)
        return found

    def forget(self, owner_type: OwnerType, owner_id: str) -> None:
        self._cache.forget((owner_type, owner_id))

    def get(self, budget_id: str) -> Budget | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(budgets_table).where(budgets_table.c.id == budget_id)).first()
        return _budget(row) if row is not None else None

    def list(self, owner_ids: list[str] | None = None) -> list[Budget]:
        query = select(budgets_table).order_by(budgets_table.c.created_at, budgets_table.c.id)
        if owner_ids is not None:
            query = query.where(budgets_table.c.owner_id.in_(owner_ids))
        with self.engine.connect() as connection:
            return [_budget(r) for r in connection.execute(query)]

    def set(self, owner_type: OwnerType, owner_id: str, period: Period,
            limit_usd: float) -> tuple[Budget | None, Budget]:
        """Create the owner's budget for `period`, or change its limit. Returns (before, after)."""
        before = next((b for b in self.of_uncached(owner_type, owner_id) if b.period == period), None)
        with self.engine.begin() as connection:
            if before is None:
                budget = Budget("bud_" + uuid.uuid4().hex[:20], owner_type, owner_id, period, float(limit_usd),
                                datetime.now(UTC))
                connection.execute(insert(budgets_table).values(
                    id=budget.id, owner_type=owner_type, owner_id=owner_id, period=period, limit_usd=budget.limit_usd,
                    created_at=budget.created_at))
            else:
                budget = Budget(before.id, owner_type, owner_id, period, float(limit_usd), before.created_at)
                connection.execute(update(budgets_table).where(budgets_table.c.id == before.id)
                                   .values(limit_usd=budget.limit_usd))
        self.forget(owner_type, owner_id)
        return before, budget

    def remove(self, budget_id: str) -> Budget | None:
        budget = self.get(budget_id)
        if budget is not None:
            with self.engine.begin() as connection:
                connection.execute(delete(budgets_table).where(budgets_table.c.id == budget_id))
            self.forget(budget.owner_type, budget.owner_id)
        return budget

    def of_uncached(self, owner_type: OwnerType, owner_id: str) -> tuple[Budget, ...]:
        self.forget(owner_type, owner_id)
        return self.of(owner_type, owner_id)
