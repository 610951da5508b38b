"""The SQL tables of keys, teams, budgets and the admin audit log, in the ledger's database (created with it).

Keys are stored as the SHA-256 of the secret (`key_hash`) and a short display prefix; the secret itself is
returned once, when the key is created, and is never written anywhere.
"""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Boolean, Column, DateTime, Float, Integer, String, Table, UniqueConstraint

from gateway.ledger import metadata

teams_table = Table(
    "frugal_teams",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
)

keys_table = Table(
    "frugal_keys",
    metadata,
    Column("id", String(64), primary_key=True),
    #: SHA-256 (hex) of the secret: what a request's key is matched by.
    Column("key_hash", String(64), nullable=False, unique=True),
    #: The first characters of the secret ("sk-frugal-AbC1…"), so an operator can tell keys apart.
    Column("prefix", String(32), nullable=False),
    Column("name", String(256), nullable=False),
    Column("team_id", String(64), index=True),
    #: Route and model names this key may call; null: all of them.
    Column("models", JSON),
    Column("metadata", JSON, nullable=False),
    Column("requests_per_minute", Integer),
    Column("tokens_per_minute", Integer),
    Column("expires_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
)

budgets_table = Table(
    "frugal_budgets",
    metadata,
    Column("id", String(64), primary_key=True),
    #: "key" or "team".
    Column("owner_type", String(8), nullable=False),
    Column("owner_id", String(64), nullable=False, index=True),
    #: "day", "month" (UTC calendar periods) or "total".
    Column("period", String(8), nullable=False),
    Column("limit_usd", Float, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("owner_type", "owner_id", "period", name="uq_frugal_budgets_owner_period"),
)

#: Spend per budget and period (SQL budgets; with Redis the counters live in Redis), in nano-USD (integers:
#: counters that add up exactly).
budget_usage_table = Table(
    "frugal_budget_usage",
    metadata,
    Column("budget_id", String(64), primary_key=True),
    #: The period: "2026-12-05" (day), "2026-12" (month) or "total".
    Column("period_start", String(16), primary_key=True),
    Column("spent_nanos", BigInteger, nullable=False),
    Column("reserved_nanos", BigInteger, nullable=False),
    #: Whether the budget's last word was a refusal (what is left is less than a request needed, though not
    #: spent to the limit), and when it last refused (Unix time).
    Column("refusing", Boolean, nullable=False, server_default="0"),
    Column("refused_at", Float),
)

#: Open reservations (SQL budgets): released when settled or once `expires_at` has passed.
budget_reservations_table = Table(
    "frugal_budget_reservations",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("budget_id", String(64), primary_key=True),
    Column("period_start", String(16), nullable=False),
    Column("amount_nanos", BigInteger, nullable=False),
    #: Unix time (seconds) after which the reservation no longer counts (its replica stopped renewing it).
    Column("expires_at", Float, nullable=False, index=True),
)

admin_audit_table = Table(
    "frugal_admin_audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False, index=True),
    #: Who: "admin" (the admin key) and the name the caller gave in `x-frugal-actor`, if any.
    Column("actor", String(256), nullable=False),
    #: What: "key.create", "key.revoke", "budget.update", "route.thresholds" …
    Column("action", String(64), nullable=False, index=True),
    Column("target", String(256), nullable=False),
    Column("before", JSON),
    Column("after", JSON),
    Column("ok", Boolean, nullable=False, server_default="1"),
)
