"""What a budget has spent, counted from the ledger rows: the sum of `cost_usd` over its key's (or its team's
keys') client requests in the period, since the budget was set. It seeds a Redis counter that was lost (a Redis
restarted without persistence, or the key evicted), so a restart never hands a budget back what it spent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import Engine, func, select

from gateway.ledger import requests_table
from gateway.tenants.budgets import period_start_time, to_nanos
from gateway.tenants.tables import keys_table

if TYPE_CHECKING:
    from gateway.tenants.counters import Charge


def spent_in_ledger(engine: Engine, charges: Sequence[Charge]) -> list[int]:
    """Per charge, nano-USD spent in its period by its owner's client requests recorded in the ledger."""
    spent = []
    with engine.connect() as connection:
        for charge in charges:
            budget = charge.budget
            table = requests_table.c
            query = select(func.coalesce(func.sum(table.cost_usd), 0.0)).where(table.purpose == "client")
            if budget.owner_type == "key":
                query = query.where(table.key_id == budget.owner_id)
            else:
                members = select(keys_table.c.id).where(keys_table.c.team_id == budget.owner_id)
                query = query.where(table.key_id.in_(members))
            since = [t for t in (period_start_time(budget.period, charge.period_start), budget.created_at) if t]
            if since:
                query = query.where(table.created_at >= max(since))
            spent.append(to_nanos(float(connection.execute(query).scalar_one())))
    return spent
