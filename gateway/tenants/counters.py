"""Budget counters: what each budget has spent and what running requests have reserved against it, kept
atomically across replicas — by Lua scripts in Redis, or by SQL transactions (docs/keys-and-budgets.md).

Every request reserves its maximum cost on all of its budgets at once (all or none), and settles its actual
cost when it ends: the reservation is released and the actual cost is added to `spent` (settlements are
written in batches: whatever ended while the last batch was being written). A reservation is a lease: the
replica that holds it renews it while the request runs (`renew`), so a replica that dies leaves reservations
that stop counting once their lease expires. Amounts are integers in nano-USD.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis
from sqlalchemy import Engine, and_, bindparam, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from starlette.concurrency import run_in_threadpool

from gateway.tenants.budgets import Budget, Usage, counter_ttl_s
from gateway.tenants.tables import budget_reservations_table, budget_usage_table


@dataclass(frozen=True, slots=True)
class Charge:
    """One budget a request is charged to, in the period it started in."""

    budget: Budget
    period_start: str


@dataclass(frozen=True, slots=True)
class Settlement:
    """A request that ended: its reservation to release and what it cost (charged to the same budgets)."""

    request_id: str
    charges: Sequence[Charge]
    actual_nanos: int


@dataclass(frozen=True, slots=True)
class Exceeded:
    """The reservation was refused: this budget has too little left."""

    charge: Charge
    spent_nanos: int
    reserved_nanos: int


class BudgetCounters(Protocol):
    async def reserve(self, request_id: str, charges: Sequence[Charge], amount_nanos: int,
                      lease_s: float) -> Exceeded | None: ...

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        """Write settlements (one round trip, one transaction, for all of them)."""
        ...

    async def renew(self, leases: dict[str, Sequence[Charge]], lease_s: float) -> None: ...

    async def usage(self, charges: Sequence[Charge]) -> list[Usage]: ...

    async def aclose(self) -> None: ...


# -- Redis ----------------------------------------------------------------------------------------------
# Per budget and period three keys: a hash {spent, reserved}, a sorted set of reservations scored by the
# lease's end (ms, on Redis's clock) and a hash of their amounts. Amounts travel as strings (Lua numbers
# print large integers in exponent form). Expired leases are released before anything is read.

_PURGE = """
local function purge(h, z, a, now)
  local gone = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  for _, r in ipairs(gone) do
    local amount = redis.call('HGET', a, r)
    if amount then
      redis.call('HINCRBY', h, 'reserved', '-' .. amount)
      redis.call('HDEL', a, r)
    end
    redis.call('ZREM', z, r)
  end
end
local function keep(key, ttl)
  if tonumber(ttl) > 0 then redis.call('EXPIRE', key, ttl) end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: (hash, zset, amounts) per budget. ARGV: request id, amount, lease ms, then (limit, ttl) per budget.
# Returns {0} (reserved), {i, spent, reserved} (budget i refused) or {-1, i, ...} (budgets i... were never
# seeded from the ledger in this Redis: nothing reserved, seed them and ask again).
_RESERVE = _PURGE + """
local n = #KEYS / 3
local amount = tonumber(ARGV[2])
-- run twice (a client that retried after a lost reply): the first run's reservation stands
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return {0} end
local unseeded = {-1}
for i = 0, n - 1 do
  if redis.call('HGET', KEYS[i * 3 + 1], 'seeded') ~= '1' then unseeded[#unseeded + 1] = i + 1 end
end
if #unseeded > 1 then return unseeded end
for i = 0, n - 1 do
  local h, z, a = KEYS[i * 3 + 1], KEYS[i * 3 + 2], KEYS[i * 3 + 3]
  purge(h, z, a, now)
  local spent = tonumber(redis.call('HGET', h, 'spent') or '0')
  local reserved = tonumber(redis.call('HGET', h, 'reserved') or '0')
  if spent + reserved + amount > tonumber(ARGV[4 + i * 2]) then
    redis.call('HSET', h, 'refused_at', tostring(now / 1000), 'refusing', '1')
    return {i + 1, tostring(spent), tostring(reserved)}
  end
end
for i = 0, n - 1 do
  local h, z, a = KEYS[i * 3 + 1], KEYS[i * 3 + 2], KEYS[i * 3 + 3]
  local ttl = ARGV[5 + i * 2]
  redis.call('ZADD', z, now + tonumber(ARGV[3]), ARGV[1])
  redis.call('HSET', a, ARGV[1], ARGV[2])
  redis.call('HINCRBY', h, 'reserved', ARGV[2])
  redis.call('HSET', h, 'refusing', '0')
  keep(h, ttl) keep(z, ttl) keep(a, ttl)
end
return {0}
"""

# KEYS: (hash, zset, amounts) per budget. ARGV: request id, actual, then ttl per budget.
_SETTLE = _PURGE + """
local n = #KEYS / 3
for i = 0, n - 1 do
  local h, z, a = KEYS[i * 3 + 1], KEYS[i * 3 + 2], KEYS[i * 3 + 3]
  local amount = redis.call('HGET', a, ARGV[1])
  if amount then
    redis.call('HINCRBY', h, 'reserved', '-' .. amount)
    redis.call('HDEL', a, ARGV[1])
    redis.call('ZREM', z, ARGV[1])
  end
  redis.call('HINCRBY', h, 'spent', ARGV[2])
  keep(h, ARGV[3 + i]) keep(z, ARGV[3 + i]) keep(a, ARGV[3 + i])
end
return 0
"""

# KEYS: hashes. ARGV: spent per budget (from the ledger), then ttl per budget. A counter not seeded yet takes
# the ledger's figure unless it holds more already (settlements written to it since Redis came back).
_SEED = _PURGE + """
local n = #KEYS
for i = 1, n do
  if redis.call('HGET', KEYS[i], 'seeded') ~= '1' then
    local spent = tonumber(redis.call('HGET', KEYS[i], 'spent') or '0')
    if tonumber(ARGV[i]) > spent then redis.call('HSET', KEYS[i], 'spent', ARGV[i]) end
    redis.call('HSET', KEYS[i], 'seeded', '1')
    keep(KEYS[i], ARGV[n + i])
  end
end
return 0
"""

# KEYS: zsets. ARGV: lease ms, then request ids (one per key). Only leases still held are renewed.
_RENEW = _PURGE + """
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + tonumber(ARGV[1]), ARGV[i + 1])
end
return 0
"""

# KEYS: (hash, zset, amounts) per budget.
_USAGE = _PURGE + """
local out = {}
for i = 0, #KEYS / 3 - 1 do
  local h, z, a = KEYS[i * 3 + 1], KEYS[i * 3 + 2], KEYS[i * 3 + 3]
  purge(h, z, a, now)
  out[#out + 1] = redis.call('HGET', h, 'spent') or '0'
  out[#out + 1] = redis.call('HGET', h, 'reserved') or '0'
  out[#out + 1] = redis.call('HGET', h, 'refusing') or '0'
  out[#out + 1] = redis.call('HGET', h, 'refused_at') or ''
end
return out
"""


def _time(value: bytes | str) -> float | None:
    return float(value) if value not in (b"", "") else None


def _keys(charge: Charge) -> list[str]:
    # One hash tag for every budget: a request's budgets are updated by one script, so on a Redis Cluster
    # they must live in one slot.
    base = f"frugal:{{budgets}}:{charge.budget.id}:{charge.period_start}"
    return [base, base + ":leases", base + ":amounts"]


class RedisCounters:
    """`spent_before`: what the ledger says each charge's budget has spent, for a counter Redis does not hold
    (a Redis restarted empty, a key evicted, a budget used for the first time); None: start at zero."""

    def __init__(self, client: Redis, spent_before: Callable[[Sequence[Charge]], list[int]] | None = None) -> None:
        self.client = client
        self.spent_before = spent_before
        self._seed = client.register_script(_SEED)
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._renew = client.register_script(_RENEW)
        self._usage = client.register_script(_USAGE)

    async def reserve(self, request_id: str, charges: Sequence[Charge], amount_nanos: int,
                      lease_s: float) -> Exceeded | None:
        keys = [k for c in charges for k in _keys(c)]
        args: list[str | int] = [request_id, str(amount_nanos), int(lease_s * 1000)]
        for charge in charges:
            args += [str(charge.budget.limit_nanos), counter_ttl_s(charge.budget.period)]
        result = await self._reserve(keys=keys, args=args)
        if int(result[0]) == -1:
            unseeded = [charges[int(i) - 1] for i in result[1:]]
            spent = await run_in_threadpool(self.spent_before, unseeded) if self.spent_before else [0] * len(unseeded)
            await self._seed(keys=[_keys(c)[0] for c in unseeded],
                             args=[*(str(n) for n in spent), *(counter_ttl_s(c.budget.period) for c in unseeded)])
            result = await self._reserve(keys=keys, args=args)
        index = int(result[0])
        if index == 0:
            return None
        return Exceeded(charges[index - 1], int(float(result[1])), int(float(result[2])))

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for item in settlements:
                keys = [k for c in item.charges for k in _keys(c)]
                await self._settle(keys=keys, args=[item.request_id, str(item.actual_nanos),
                                                    *(counter_ttl_s(c.budget.period) for c in item.charges)],
                                   client=pipe)
            await pipe.execute()

    async def renew(self, leases: dict[str, Sequence[Charge]], lease_s: float) -> None:
        keys, ids = [], []
        for request_id, charges in leases.items():
            for charge in charges:
                keys.append(_keys(charge)[1])
                ids.append(request_id)
        if keys:
            await self._renew(keys=keys, args=[int(lease_s * 1000), *ids])

    async def usage(self, charges: Sequence[Charge]) -> list[Usage]:
        if not charges:
            return []
        values = await self._usage(keys=[k for c in charges for k in _keys(c)])
        return [Usage(int(values[i]), int(values[i + 1]), int(values[i + 2]) == 1, _time(values[i + 3]))
                for i in range(0, len(values), 4)]

    async def aclose(self) -> None:
        await self.client.aclose()


# -- SQL ------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Asked:
    """A reservation waiting for its batch."""

    request_id: str
    charges: Sequence[Charge]
    amount_nanos: int
    lease_s: float
    answer: asyncio.Future[Exceeded | None]


class SqlCounters:
    """Counters in the ledger's database. Reservations are decided in batches (group commit), each batch one
    transaction whose first statement writes (so SQLite takes its write lock first; on PostgreSQL the counter
    rows are locked first, in one order), and each reservation's check a conditional UPDATE (PostgreSQL
    re-checks it against a row another transaction just changed): no two replicas can both take the last
    dollar."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        dialect = {"sqlite": sqlite, "postgresql": postgresql}.get(engine.dialect.name)
        if dialect is None:
            raise ValueError(f"SQL budgets need SQLite or PostgreSQL, not {engine.dialect.name}")
        self._insert = dialect.insert
        # SQLite has one writer at a time anyway: queueing here spares the busy-wait inside the driver.
        self._lock: contextlib.AbstractContextManager[object] = (
            threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext())
        self._asked: list[_Asked] = []
        self._decider: asyncio.Task[None] | None = None
        # The statements of the request path, built once (building a SQLAlchemy expression per call cost more
        # CPU than running it): parameters by name.
        u, r = budget_usage_table.c, budget_reservations_table.c
        counter = and_(u.budget_id == bindparam("b_id"), u.period_start == bindparam("b_period"))
        self._take = update(budget_usage_table).where(
            counter, u.spent_nanos + u.reserved_nanos + bindparam("amount") <= bindparam("b_limit"),
        ).values(reserved_nanos=u.reserved_nanos + bindparam("amount"), refusing=False)
        self._give_back = update(budget_usage_table).where(counter).values(
            reserved_nanos=u.reserved_nanos - bindparam("amount"))
        self._refuse = update(budget_usage_table).where(counter).values(refusing=True, refused_at=bindparam("now"))
        self._counter = select(u.spent_nanos, u.reserved_nanos).where(counter)
        self._hold = insert(budget_reservations_table)
        self._release = delete(budget_reservations_table).where(
            r.request_id == bindparam("req"), r.budget_id == bindparam("b_id")).returning(r.amount_nanos)
        self._charge = update(budget_usage_table).where(counter).values(
            reserved_nanos=u.reserved_nanos - bindparam("held"), spent_nanos=u.spent_nanos + bindparam("actual"))

    def _open(self, connection, charge: Charge, now: float) -> None:  # type: ignore[no-untyped-def]
        """Make sure the period's counter row exists, and release the reservations whose lease ended (done
        only when a reservation does not fit: expired leases matter only then, and reads skip them)."""
        u, r = budget_usage_table.c, budget_reservations_table.c
        connection.execute(self._insert(budget_usage_table).values(
            budget_id=charge.budget.id, period_start=charge.period_start, spent_nanos=0, reserved_nanos=0,
            refusing=False,
        ).on_conflict_do_nothing(index_elements=["budget_id", "period_start"]))
        gone = connection.execute(delete(budget_reservations_table).where(
            r.budget_id == charge.budget.id, r.period_start == charge.period_start, r.expires_at < now,
        ).returning(r.amount_nanos)).scalars().all()
        if gone:
            connection.execute(update(budget_usage_table).where(
                u.budget_id == charge.budget.id, u.period_start == charge.period_start,
            ).values(reserved_nanos=u.reserved_nanos - sum(gone)))

    def _lock_rows(self, connection, charges: Sequence[Charge], now: float) -> None:  # type: ignore[no-untyped-def]
        """PostgreSQL: lock the counter rows a batch touches, in one global order, before touching any (two
        replicas' batches then never deadlock); SQLite has a single writer and needs none of this."""
        if self.engine.dialect.name != "postgresql":
            return
        u = budget_usage_table.c
        for budget_id, period in sorted({(c.budget.id, c.period_start) for c in charges}):
            found = connection.execute(select(u.budget_id).where(u.budget_id == budget_id, u.period_start == period)
                                       .with_for_update()).first()
            if found is None:
                charge = next(c for c in charges if (c.budget.id, c.period_start) == (budget_id, period))
                self._open(connection, charge, now)

    def _reserve_many(self, items: Sequence[_Asked]) -> list[Exceeded | None]:
        """Decide a batch of reservations in one transaction, one after the other: each takes all its budgets or
        none (what it took is given back when a later budget of its refuses)."""
        now = time.time()
        results: list[Exceeded | None] = []
        with self._lock, self.engine.begin() as connection:
            self._lock_rows(connection, [c for item in items for c in item.charges], now)
            for item in items:
                taken_from: list[dict[str, Any]] = []
                refused = None
                for charge in item.charges:
                    which = {"b_id": charge.budget.id, "b_period": charge.period_start}
                    take = {**which, "amount": item.amount_nanos, "b_limit": charge.budget.limit_nanos}
                    if connection.execute(self._take, take).rowcount != 1:
                        # no counter for this period yet, or too little left: with expired leases released
                        # (they only matter now), try once more
                        self._open(connection, charge, now)
                        if connection.execute(self._take, take).rowcount != 1:
                            row = connection.execute(self._counter, which).one()
                            refused = Exceeded(charge, int(row.spent_nanos), int(row.reserved_nanos))
                            connection.execute(self._refuse, {**which, "now": now})
                            break
                    taken_from.append(which)
                if refused is not None:
                    for which in taken_from:  # all or none
                        connection.execute(self._give_back, {**which, "amount": item.amount_nanos})
                else:
                    connection.execute(self._hold, [
                        {"request_id": item.request_id, "budget_id": c.budget.id, "period_start": c.period_start,
                         "amount_nanos": item.amount_nanos, "expires_at": now + item.lease_s} for c in item.charges])
                results.append(refused)
        return results

    async def _decide(self) -> None:
        """Take every reservation asked for while the previous batch was decided, as one batch."""
        while self._asked:
            batch, self._asked = self._asked, []
            try:
                results = await run_in_threadpool(self._reserve_many, batch)
            except Exception as exc:
                for item in batch:
                    if not item.answer.done():
                        item.answer.set_exception(exc)
                continue
            for item, result in zip(batch, results, strict=True):
                if not item.answer.done():
                    item.answer.set_result(result)

    def _settle(self, settlements: Sequence[Settlement]) -> None:
        now = time.time()
        with self._lock, self.engine.begin() as connection:
            self._lock_rows(connection, [c for item in settlements for c in item.charges], now)
            for item in settlements:
                for charge in item.charges:
                    which = {"b_id": charge.budget.id, "b_period": charge.period_start}
                    held = connection.execute(self._release, {"req": item.request_id, "b_id": charge.budget.id})
                    charged = {**which, "held": sum(held.scalars().all()), "actual": item.actual_nanos}
                    if connection.execute(self._charge, charged).rowcount != 1:  # a counter made by no reservation
                        self._open(connection, charge, now)
                        connection.execute(self._charge, charged)

    def _renew(self, leases: dict[str, Sequence[Charge]], lease_s: float) -> None:
        if not leases:
            return
        r = budget_reservations_table.c
        with self._lock, self.engine.begin() as connection:
            connection.execute(update(budget_reservations_table).where(r.request_id.in_(list(leases)))
                               .values(expires_at=time.time() + lease_s))

    def _usage(self, charges: Sequence[Charge]) -> list[Usage]:
        u, r = budget_usage_table.c, budget_reservations_table.c
        now = time.time()
        out = []
        with self.engine.connect() as connection:
            for charge in charges:
                row = connection.execute(select(u.spent_nanos, u.refusing, u.refused_at).where(
                    u.budget_id == charge.budget.id, u.period_start == charge.period_start)).first()
                reserved = connection.execute(select(func.coalesce(func.sum(r.amount_nanos), 0)).where(
                    r.budget_id == charge.budget.id, r.period_start == charge.period_start,
                    r.expires_at >= now)).scalar()
                out.append(Usage(int(row.spent_nanos), int(reserved or 0), bool(row.refusing), row.refused_at)
                           if row is not None else Usage())
        return out

    async def reserve(self, request_id: str, charges: Sequence[Charge], amount_nanos: int,
                      lease_s: float) -> Exceeded | None:
        """Group commit: requests that ask while a batch is being decided are decided together in the next
        transaction (one thread hop and one commit for all of them)."""
        loop = asyncio.get_running_loop()
        asked = _Asked(request_id, charges, amount_nanos, lease_s, loop.create_future())
        self._asked.append(asked)
        if self._decider is None or self._decider.done():
            self._decider = loop.create_task(self._decide())
        return await asked.answer

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        await run_in_threadpool(self._settle, settlements)

    async def renew(self, leases: dict[str, Sequence[Charge]], lease_s: float) -> None:
        await run_in_threadpool(self._renew, leases, lease_s)

    async def usage(self, charges: Sequence[Charge]) -> list[Usage]:
        return await run_in_threadpool(self._usage, charges)

    async def aclose(self) -> None:
        return None

