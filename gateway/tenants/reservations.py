"""Budget enforcement on the request path: reserve a request's maximum cost before any model is called,
settle its actual cost when it ends (docs/keys-and-budgets.md).

The maximum is what the request could cost if every model its route may call answered it in full: for each
model, the prompt's tokens (counted, with a margin) at its input price plus the most output tokens it may
write (`max_tokens`/`max_completion_tokens` × `n`, else what fits its context, else
`budgets.default_max_tokens`) at its output price. A cascade may call every tier, so its tiers add up.
Reservations are leases renewed every third of `lease_s` while their request runs. Settlements are written
in batches by one task (the response never waits for them); those that fail (the counters' store is down)
are retried until they succeed, so spend is never dropped from a budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from gateway.errors import APIError
from gateway.settings import ModelConfig
from gateway.shared_state import REDIS_FAILURES, StateErrors
from gateway.tenants.budgets import Budget, BudgetBook, BudgetsUnknown, Usage, period_label, resets_at, to_nanos, to_usd
from gateway.tenants.counters import BudgetCounters, Charge, Exceeded, Settlement
from workers.backend import GenerationRequest
from workers.tokens import count_tokens, prompt_tokens_of

log = logging.getLogger("frugal.budgets")

#: Counted prompt tokens are multiplied by this and this is added: providers' tokenizers differ from ours.
PROMPT_MARGIN = 1.1
PROMPT_SLACK = 16


@dataclass(slots=True)
class Reservation:
    request_id: str
    charges: tuple[Charge, ...]
    amount_nanos: int
    settled: bool = False




def _unavailable() -> APIError:
    return APIError(503, "Budgets cannot be checked right now (their store is unreachable); try again shortly.",
                    type="server_error", code="budget_unavailable", retry_after_s=1)


def budget_exceeded(exceeded: Exceeded, amount_nanos: int, now: datetime) -> APIError:
    """429 naming the budget and when it resets (Retry-After until then; none for a total budget)."""
    budget = exceeded.charge.budget
    reset = resets_at(budget.period, now)
    when = f"it resets at {reset.isoformat()}" if reset else "it does not reset (a total budget)"
    spent = to_usd(exceeded.spent_nanos)
    reserved = to_usd(exceeded.reserved_nanos)
    message = (f"Budget exceeded: {budget.describe()} has ${spent:.6f} spent and ${reserved:.6f} reserved by "
               f"requests in flight, too little left for this request, which may cost up to "
               f"${to_usd(amount_nanos):.6f} (lower max_tokens to need less); {when}.")
    return APIError(429, message, type="insufficient_quota", code="budget_exceeded",
                    retry_after_s=(reset - now).total_seconds() if reset else None)


class BudgetGate:
    def __init__(self, book: BudgetBook, counters: BudgetCounters, models: Sequence[ModelConfig], *,
                 lease_s: float, default_max_tokens: int, errors: StateErrors | None = None) -> None:
        self.book = book
        self.counters = counters
        self.models = {m.name: m for m in models}
        self.lease_s = lease_s
        self.default_max_tokens = default_max_tokens
        self.errors = errors
        #: Reservations held by requests running here (renewed); settlements waiting for the writer, and those
        #: whose write failed (retried by the lease keeper).
        self._held: dict[str, Reservation] = {}
        self._settling: list[Settlement] = []
        self._unwritten: list[Settlement] = []
        self._writer: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None

    # -- which budgets a request is charged to ------------------------------------------------------
    async def budgets_of(self, key_id: str, team_id: str | None) -> list[Budget]:
        owners: list[tuple[Any, str]] = [("key", key_id)] + ([("team", team_id)] if team_id else [])
        found: list[Budget] = []
        for owner_type, owner_id in owners:
            cached = self.book.cached(owner_type, owner_id)
            try:
                found += cached if cached is not None else await run_in_threadpool(self.book.of, owner_type, owner_id)
            except BudgetsUnknown as exc:  # fail closed: a budget that cannot be read cannot be enforced
                raise _unavailable() from exc
        return found

    def max_cost_nanos(self, models: Sequence[str], request: GenerationRequest, prompts: Sequence[str]) -> int:
        """The most the request may cost (see the module's docstring)."""
        if len(prompts) > 1:
            prompt_tokens = sum(count_tokens(p) for p in prompts)
        else:
            prompt_tokens = prompt_tokens_of(request)
        prompt_tokens = math.ceil(prompt_tokens * PROMPT_MARGIN) + PROMPT_SLACK
        params = request.params
        asked = params.get("max_completion_tokens") or params.get("max_tokens")
        choices = int(params.get("n") or 1) * max(1, len(prompts))
        total = 0.0
        for name in models:
            model = self.models.get(name)
            if model is None:
                continue
            if asked:
                out = int(asked)
            elif model.context_length:
                out = max(1, model.context_length - prompt_tokens // max(1, len(prompts)))
            else:
                out = self.default_max_tokens
            total += model.price.cost(prompt_tokens, out * choices)
        return math.ceil(total * 1e9)

    # -- reserve and settle -------------------------------------------------------------------------
    async def reserve(self, request_id: str, budgets: Sequence[Budget], models: Sequence[str],
                      request: GenerationRequest, prompts: Sequence[str]) -> Reservation:
        """Reserve the request's maximum on every budget, or raise 429 `budget_exceeded` (nothing reserved);
        503 `budget_unavailable` when the counters cannot be reached (budgets fail closed)."""
        now = datetime.now(UTC)
        charges = tuple(Charge(b, period_label(b.period, now)) for b in budgets)
        amount = self.max_cost_nanos(models, request, prompts)
        try:
            exceeded = await self.counters.reserve(request_id, charges, amount, self.lease_s)
        except (*REDIS_FAILURES, SQLAlchemyError) as exc:
            if self.errors is not None:
                self.errors.report("budgets", "closed", exc)
            raise _unavailable() from exc
        if exceeded is not None:
            raise budget_exceeded(exceeded, amount, now)
        reservation = Reservation(request_id, charges, amount)
        self._held[request_id] = reservation
        return reservation

    async def settle(self, reservation: Reservation | None, cost_usd: float) -> None:
        """Release the reservation and charge what the request cost (once; never raises, never waits on the
        counters' store): settlements are written in batches by one task, so a request's response does not wait
        for them, and a burst of requests that end together costs one round trip."""
        if reservation is None or reservation.settled:
            return
        reservation.settled = True
        self._held.pop(reservation.request_id, None)
        self._settling.append(Settlement(reservation.request_id, reservation.charges, to_nanos(cost_usd)))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_settlements())

    async def _write_settlements(self) -> None:
        while self._settling:
            batch, self._settling = self._settling, []
            try:
                await self.counters.settle(batch)
            except Exception as exc:  # kept and retried by the lease keeper: spend must reach the budget
                if self.errors is not None:
                    self.errors.report("budgets", "closed", exc)
                self._unwritten.extend(batch)
                return

    async def settled(self) -> None:
        """Wait until every settlement made so far is written (or kept for a retry)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def usage(self, budgets: Sequence[Budget]) -> list[Usage]:
        now = datetime.now(UTC)
        return await self.counters.usage([Charge(b, period_label(b.period, now)) for b in budgets])

    # -- the lease keeper ---------------------------------------------------------------------------
    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                if self._held:
                    await self.counters.renew({r.request_id: r.charges for r in self._held.values()}, self.lease_s)
                await self._retry_settlements()
            except Exception as exc:
                if self.errors is not None:
                    self.errors.report("budgets", "closed", exc)

    async def _retry_settlements(self) -> None:
        if self._unwritten:
            batch, self._unwritten = self._unwritten, []
            try:
                await self.counters.settle(batch)
            except Exception:
                self._unwritten = batch + self._unwritten
                raise

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._keep())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.settled()
        with contextlib.suppress(Exception):
            await self._retry_settlements()
        if self._unwritten:
            log.error("%d budget settlements could not be written before shutdown (their reservations expire; "
                      "the ledger has the spend)", len(self._unwritten))
        await self.counters.aclose()
