"""Rollups: hourly counters of the ledger, written by the ledger's writer in the same transaction as the rows
they count, so that the analytics admin API (gateway/admin_analytics.py) never scans the ledger
(docs/analytics.md).

Two tables, both keyed by the UTC hour (`hour`: whole hours since the Unix epoch):

- `frugal_rollups` (hour, route, purpose): requests, 4xx and 5xx errors, spend, saving against the route's top
  model, cache hits and what they saved, compression savings, tokens, cascade outcomes and a latency histogram
  (`LATENCY_BOUNDS_MS`, log-spaced; p50/p95 are estimated from it). `purpose` is "client" or "audit": shadow
  audits are the operator's spend, counted apart and never in a client figure.
- `frugal_rollup_tiers` (hour, route, tier, model): the cascade funnel (reached, accepted, escalations by
  reason) and the judge's score histogram (`JUDGE_BINS` bins on [0, 1], accepted apart from escalated), with
  the last threshold seen. Client rows only.

A batch is aggregated in Python first (one counter row per key), then upserted with increments (`INSERT … ON
CONFLICT DO UPDATE SET n = n + excluded.n`), keys in a fixed order so that two writers never deadlock.

Saving (`saved_usd`), for answered client rows (status < 400): a cascade's own figure (the trace's
`saved_usd`: the top tier's price for the answer minus what the cascade paid); otherwise what the route's top
model (its most expensive member, by the sum of its per-token prices; a model asked by name is its own top)
would have cost for the row's tokens, minus the row's cost; a cache hit on a route without a known price
counts the cache's saving. The prices come from the configuration through `top_price`.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    String,
    Table,
    and_,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from gateway.ledger import metadata, requests_table
from gateway.settings import FrugalConfig
from workers.pricing import TokenPrice

log = logging.getLogger("frugal.rollups")

HOUR_S = 3600
#: Upper bounds (ms) of the latency buckets: 10^(k/6) ms for k = 0..36, 1 ms to 1,000 s (each ~1.47x the
#: previous). Bucket i counts latencies in [bound[i-1], bound[i]); the last one everything from 1,000 s.
LATENCY_BOUNDS_MS: tuple[float, ...] = tuple(10 ** (k / 6) for k in range(37))
LATENCY_COLUMNS = tuple(f"lat_{i:02d}" for i in range(len(LATENCY_BOUNDS_MS) + 1))
#: Judge scores: this many equal bins on [0, 1].
JUDGE_BINS = 20
ACCEPTED_BINS = tuple(f"judge_acc_{i:02d}" for i in range(JUDGE_BINS))
ESCALATED_BINS = tuple(f"judge_esc_{i:02d}" for i in range(JUDGE_BINS))
#: Why a cascade went past a tier (router/trace.py TierDecision.reason); anything else counts as "other".
REASONS = ("score", "error", "timeout", "capacity", "context_length", "capability", "cooldown", "no_key")
REASON_COLUMNS = {reason: f"esc_{reason}" for reason in (*REASONS, "other")}

ROUTE_COUNTERS = ("requests", "errors_4xx", "errors_5xx", "spend_usd", "saved_usd", "cache_exact", "cache_semantic",
                  "cache_saved_usd", "compression_saved_usd", "prompt_tokens", "completion_tokens",
                  "cascade_requests", "unanswered", "unaccepted", "latency_ms_sum", *LATENCY_COLUMNS)
_FLOATS = {"spend_usd", "saved_usd", "cache_saved_usd", "compression_saved_usd", "latency_ms_sum"}
TIER_COUNTERS = ("reached", "accepted", "fallback_accepted", *REASON_COLUMNS.values(), *ACCEPTED_BINS,
                 *ESCALATED_BINS)


def _counter(name: str) -> Column:
    if name in _FLOATS:
        return Column(name, Float, nullable=False, server_default="0")
    return Column(name, BigInteger, nullable=False, server_default="0")


rollups_table = Table(
    "frugal_rollups",
    metadata,
    #: Whole UTC hours since 1970-01-01.
    Column("hour", Integer, primary_key=True),
    #: The ledger row's `route` (a route or a model name); "" when the request named none.
    Column("route", String(256), primary_key=True),
    #: "client" or "audit" (the operator's shadow audits).
    Column("purpose", String(16), primary_key=True),
    *(_counter(name) for name in ROUTE_COUNTERS),
)

tier_rollups_table = Table(
    "frugal_rollup_tiers",
    metadata,
    Column("hour", Integer, primary_key=True),
    Column("route", String(256), primary_key=True),
    #: 1-based position of the tier in its cascade.
    Column("tier", Integer, primary_key=True),
    Column("model", String(256), primary_key=True),
    *(_counter(name) for name in TIER_COUNTERS),
    #: The last threshold this tier was judged against in the hour.
    Column("threshold", Float),
)

#: Read paths the analytics API needs on the ledger itself (traces by key, by route), created on existing
#: ledgers too (`ensure_indexes`).
LEDGER_INDEXES = {
    "ix_frugal_requests_key_created": "frugal_requests (key_id, created_at)",
    "ix_frugal_requests_route_created": "frugal_requests (route, created_at)",
}

PriceLookup = Callable[[str], TokenPrice | None]
#: Where requests naming no configured route or model are counted.
OTHER_ROUTE = "(other)"


def ensure_indexes(engine: Engine) -> None:
    """Create the analytics indexes on the ledger's requests table when missing (any ledger, old or new)."""
    with engine.begin() as connection:
        for name, target in LEDGER_INDEXES.items():
            connection.execute(text(f"CREATE INDEX IF NOT EXISTS {name} ON {target}"))


def hour_of(created_at: datetime | str) -> int:
    """The UTC hour (since the epoch) of a row's `created_at` (naive times are UTC; spilled rows hold text)."""
    if isinstance(created_at, str):
        created_at = datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=UTC)
    return math.floor(created_at.timestamp() / HOUR_S)


def hour_start(hour: int) -> datetime:
    return datetime.fromtimestamp(hour * HOUR_S, UTC)


def latency_bucket(latency_ms: float) -> int:
    return bisect.bisect_right(LATENCY_BOUNDS_MS, latency_ms)


def judge_bin(score: float) -> int:
    return min(JUDGE_BINS - 1, max(0, math.floor(score * JUDGE_BINS)))


def latency_quantile(counts: Sequence[int], q: float) -> float | None:
    """The `q` quantile (ms) estimated from latency bucket counts: the bucket holding it, then geometric
    interpolation inside it (its error is at most the bucket's width, ~47%, usually far less)."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            hi = LATENCY_BOUNDS_MS[min(index, len(LATENCY_BOUNDS_MS) - 1)]
            lo = LATENCY_BOUNDS_MS[index - 1] if index > 0 else 0.0
            fraction = min(1.0, max(0.0, (rank - seen) / count))
            if index >= len(LATENCY_BOUNDS_MS):
                return hi
            return lo * (hi / lo) ** fraction if lo > 0 else hi * fraction
        seen += count
    return LATENCY_BOUNDS_MS[-1]


def route_top_prices(models: Iterable[tuple[str, TokenPrice]],
                     routes: Iterable[tuple[str, Sequence[str]]]) -> dict[str, TokenPrice]:
    """Each model's own price, and each route's top member's price (the most expensive by the sum of its
    per-token prices): what "always the top model" would have cost, by the name a client asks for."""
    prices = dict(models)
    top = {name: prices[name] for name in prices}
    for name, members in routes:
        known = [prices[m] for m in members if m in prices]
        if known:
            top[name] = max(known, key=lambda p: p.input_per_token + p.output_per_token)
    return top


class _Batch:
    """The counter increments of one batch of ledger rows, one entry per rollup key."""

    def __init__(self, top_price: PriceLookup | None, known: frozenset[str] | None = None) -> None:
        self.top_price = top_price
        self.known = known
        self.routes: dict[tuple[int, str, str], dict[str, float]] = {}
        self.tiers: dict[tuple[int, str, int, str], dict[str, Any]] = {}

    def add(self, row: Mapping[str, Any]) -> None:
        hour = hour_of(row["created_at"])
        route = str(row.get("route") or "")[:256]
        if self.known is not None and route and route not in self.known:
            route = OTHER_ROUTE  # names clients made up (each a 404) must not grow the rollups without bound
        purpose = str(row.get("purpose") or "client")
        c = self.routes.setdefault((hour, route, purpose), {})

        def inc(name: str, value: float = 1) -> None:
            c[name] = c.get(name, 0) + value

        status = int(row.get("status") or 0)
        cost = float(row.get("cost_usd") or 0.0)
        latency = float(row.get("latency_ms") or 0.0)
        prompt, completion = int(row.get("prompt_tokens") or 0), int(row.get("completion_tokens") or 0)
        trace = row.get("trace") or {}
        cache = row.get("cache")
        inc("requests")
        inc("spend_usd", cost)
        inc("prompt_tokens", prompt)
        inc("completion_tokens", completion)
        inc("latency_ms_sum", latency)
        inc(LATENCY_COLUMNS[latency_bucket(latency)])
        if 400 <= status < 500:
            inc("errors_4xx")
        elif status >= 500:
            inc("errors_5xx")
        if purpose != "client":
            return
        hit = cache in ("hit", "semantic-hit")
        if hit:
            inc("cache_exact" if cache == "hit" else "cache_semantic")
            inc("cache_saved_usd", float((trace.get("cache") or {}).get("saved_usd") or 0.0))
        for compression in trace.get("compression") or ():
            inc("compression_saved_usd", float(compression.get("saved_usd") or 0.0))
        if status < 400:
            inc("saved_usd", self._saved(route, trace, hit, prompt, completion, cost))
        tiers = trace.get("tiers") or []
        if tiers:
            inc("cascade_requests")
            if trace.get("accepted_tier") is None:
                inc("unanswered")
            elif trace.get("accepted") is False:
                inc("unaccepted")
            self._tiers(hour, route, tiers)

    def _saved(self, route: str, trace: Mapping[str, Any], hit: bool, prompt: int, completion: int,
               cost: float) -> float:
        if trace.get("saved_usd") is not None:
            return float(trace["saved_usd"])
        price = self.top_price(route) if self.top_price is not None and route else None
        if price is not None:
            return price.cost(prompt, completion) - cost
        return float((trace.get("cache") or {}).get("saved_usd") or 0.0) if hit else 0.0

    def _tiers(self, hour: int, route: str, tiers: Sequence[Mapping[str, Any]]) -> None:
        position, seen = 0, set()
        for tier in tiers:
            model = str(tier.get("model") or "")[:256]
            if model in seen:  # a legacy completion's next prompt: its cascade starts again
                position, seen = 0, set()
            seen.add(model)
            position += 1
            t = self.tiers.setdefault((hour, route, position, model), {"threshold": None})
            outcome, reason = tier.get("outcome"), tier.get("reason")
            t["reached"] = t.get("reached", 0) + 1
            if outcome in ("accepted", "fallback_accepted"):
                t[outcome] = t.get(outcome, 0) + 1
            if reason is not None:
                column = REASON_COLUMNS.get(str(reason), REASON_COLUMNS["other"])
                t[column] = t.get(column, 0) + 1
            score = tier.get("score")
            if score is not None:
                bins = ACCEPTED_BINS if outcome == "accepted" else ESCALATED_BINS
                column = bins[judge_bin(float(score))]
                t[column] = t.get(column, 0) + 1
            if tier.get("threshold") is not None:
                t["threshold"] = float(tier["threshold"])


class Rollups:
    """Adds each batch of ledger rows to the rollup tables (`write`, inside the batch's transaction): a
    `gateway.ledger.BatchCounters` (`Ledger(..., rollups=Rollups(prices))`)."""

    def __init__(self, top_price: PriceLookup | None = None, known: Iterable[str] | None = None) -> None:
        #: The top model's price for a route or model name (None: unknown); see the module's docstring.
        self.top_price = top_price
        #: The route and model names of the configuration; any other name is counted as `OTHER_ROUTE`
        #: (None: every name as it is).
        self.known = frozenset(known) if known is not None else None

    def ensure_schema(self, engine: Engine) -> None:
        """The rollup tables (on the ledger's metadata, created with it) and the ledger indexes analytics reads by."""
        metadata.create_all(engine, tables=[rollups_table, tier_rollups_table])
        ensure_indexes(engine)

    def aggregate(self, rows: Iterable[Mapping[str, Any]]) -> _Batch:
        batch = _Batch(self.top_price, self.known)
        for row in rows:
            try:
                batch.add(row)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a malformed row never blocks the ledger
                log.error("ledger row %s left out of the rollups: %s", row.get("id"), exc)
        return batch

    def write(self, connection: Connection, rows: Iterable[Mapping[str, Any]]) -> None:
        batch = self.aggregate(rows)
        route_rows = [{"hour": k[0], "route": k[1], "purpose": k[2], **_full(v, ROUTE_COUNTERS)}
                      for k, v in sorted(batch.routes.items())]
        tier_rows = [{"hour": k[0], "route": k[1], "tier": k[2], "model": k[3], "threshold": v["threshold"],
                      **_full(v, TIER_COUNTERS)} for k, v in sorted(batch.tiers.items())]
        _upsert(connection, rollups_table, route_rows, ROUTE_COUNTERS)
        _upsert(connection, tier_rollups_table, tier_rows, TIER_COUNTERS)


def rebuild(engine: Engine, rollups: Rollups, chunk_rows: int = 20_000) -> int:
    """Count the whole ledger into the rollups again, in one transaction (the rollups are emptied first): for a
    ledger written before rollups existed, or after a price change. Run it with the gateways stopped: rows
    they write meanwhile would be counted twice. Returns the rows counted."""
    rollups.ensure_schema(engine)
    counted = 0
    with engine.begin() as connection:
        connection.execute(rollups_table.delete())
        connection.execute(tier_rollups_table.delete())
        query = select(requests_table).order_by(requests_table.c.created_at, requests_table.c.id)
        result = connection.execution_options(yield_per=chunk_rows).execute(query)
        for part in result.partitions():
            rows = [dict(r._mapping) for r in part]
            rollups.write(connection, rows)
            counted += len(rows)
    return counted


def rollups_for(config: FrugalConfig) -> Rollups:
    """The rollups of a gateway's ledger: the top prices of its routes and models."""
    return Rollups(route_top_prices(((m.name, m.price) for m in config.models),
                                    ((r.name, r.members) for r in config.routes)).get,
                   [m.name for m in config.models] + [r.name for r in config.routes])


def _full(values: Mapping[str, Any], counters: Sequence[str]) -> dict[str, Any]:
    return {name: values.get(name, 0) for name in counters}


@functools.cache
def _upsert_statement(dialect_name: str, table: Table, counters: tuple[str, ...]) -> Any:
    """INSERT … ON CONFLICT DO UPDATE adding to `counters`, for SQLite and PostgreSQL (None for other databases);
    built once per table and kept: built per batch, its `excluded` alias of every column left some 600 objects
    of cyclic garbage for the collector each time, beside the CPU of building it."""
    dialect = {"sqlite": sqlite, "postgresql": postgresql}.get(dialect_name)
    if dialect is None:
        return None
    insert_ = dialect.insert(table)
    changes: dict[str, Any] = {name: table.c[name] + insert_.excluded[name] for name in counters}
    if "threshold" in table.c:
        changes["threshold"] = func.coalesce(insert_.excluded.threshold, table.c.threshold)
    return insert_.on_conflict_do_update(index_elements=[c.name for c in table.primary_key.columns], set_=changes)


def _upsert(connection: Connection, table: Table, rows: list[dict[str, Any]], counters: Sequence[str]) -> None:
    """Add `rows` to `table`'s counters (a row with a new key is inserted as it is)."""
    if not rows:
        return
    keys = [c.name for c in table.primary_key.columns]
    statement = _upsert_statement(connection.dialect.name, table, tuple(counters))
    if statement is not None:
        connection.execute(statement, rows)
        return
    for row in rows:  # another database: update, else insert (one transaction with the rows)
        where = and_(*(table.c[k] == row[k] for k in keys))
        changes = {name: table.c[name] + row[name] for name in counters}
        if "threshold" in table.c and row.get("threshold") is not None:
            changes["threshold"] = row["threshold"]
        if connection.execute(update(table).where(where).values(**changes)).rowcount == 0:
            connection.execute(insert(table).values(**row))
