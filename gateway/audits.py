"""Labels from the gateway's own traffic (docs/learning.md): shadow audits and escalation labels.

After the client has its whole answer (never on its latency):

- **Audit.** A share (`learning.audit_rate`) of the answers a lower tier gave and its judge accepted is also
  sent to the route's top tier. The two answers are compared (`scorer.agreement.compare`) and the verdict is
  a label with source `audit` for the lower tier's answer. The audit's cost is the operator's: a ledger row
  of its own (`purpose: audit`, `parent_id`: the request), never a client key's. Audits stop for the day
  when `learning.audit_budget_usd` would be exceeded: each reserves its largest possible cost (prompt and
  `audit_max_tokens` at the top tier's prices) before it is sent and settles what it cost after.
- **Escalation label.** A tier whose answer its judge rejected, when a higher tier's answer went to the
  client, gets a label with source `escalation`: its answer compared with the one sent. No model is called.

Both compare answers, so both need `ledger.store_content` (the operator's consent to the gateway keeping
and processing content beyond answering): without it they are off, and start-up says so.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from gateway.estimates import LiveEstimates
from gateway.ledger import Ledger, ledger_row, requests_table
from gateway.metrics import GatewayMetrics
from gateway.settings import FrugalConfig, LearningConfig
from router.cascade import CascadeRoute, query_text
from router.trace import DecisionTrace
from scorer.agreement import Verdict, compare
from workers.backend import GenerationRequest

log = logging.getLogger("frugal.audits")

Embed = Callable[[list[str]], np.ndarray]
#: Audits in flight at most; more are skipped (counted), never queued without bound.
MAX_IN_FLIGHT = 16


def sampled(request_id: str, rate: float) -> bool:
    """Whether a request falls in a `rate` sample: a hash of its id, so the choice is uniform, independent of
    the query and the same on every replica."""
    if rate <= 0:
        return False
    digest = hashlib.sha256(f"audit:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


class AuditBudget:
    """USD per UTC day per route that audits may spend: reserved before an audit, settled after."""

    def __init__(self, limits: dict[str, float]) -> None:
        self.limits = limits
        self.day: date = datetime.now(UTC).date()
        self.spent: dict[str, float] = dict.fromkeys(limits, 0.0)

    def _roll(self) -> None:
        today = datetime.now(UTC).date()
        if today != self.day:
            self.day, self.spent = today, dict.fromkeys(self.limits, 0.0)

    def reserve(self, route: str, usd: float) -> bool:
        self._roll()
        if self.spent[route] + usd > self.limits[route]:
            return False
        self.spent[route] += usd
        return True

    def settle(self, route: str, reserved: float, actual: float) -> None:
        self._roll()
        self.spent[route] += actual - reserved

    def load(self, ledger: Ledger) -> None:
        """Today's audit spend so far, from the ledger (so a restart does not reset the day's budget)."""
        start = datetime.combine(self.day, datetime.min.time(), UTC)
        r = requests_table.c
        query = (select(r.route, func.sum(r.cost_usd)).where(r.purpose == "audit", r.created_at >= start,
                                                             r.created_at < start + timedelta(days=1))
                 .group_by(r.route))
        with ledger.engine.connect() as connection:
            for route, total in connection.execute(query):
                if route in self.spent:
                    self.spent[route] = float(total or 0.0)


@dataclass
class Answered:
    """A request the client has its whole answer to: what audits need of it."""

    request_id: str
    key_id: str | None
    endpoint: str
    route: CascadeRoute
    request: GenerationRequest
    trace: DecisionTrace
    #: The answer's text, as sent.
    text: str
    prompt_tokens: int


class Auditor:
    def __init__(self, config: FrugalConfig, ledger: Ledger, metrics: GatewayMetrics, estimates: LiveEstimates,
                 embed: Callable[[], Embed] | None = None) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.estimates = estimates
        self.store_content = config.ledger.store_content
        self.learning: dict[str, LearningConfig] = {r.name: r.learning for r in config.routes if r.kind == "cascade"}
        self.budget = AuditBudget({name: c.audit_budget_usd for name, c in self.learning.items()})
        self._embed_factory = embed
        self._embed: Embed | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        #: Whether today's spend so far was read from the ledger (no audit runs before).
        self.budget_loaded = False

    def announce(self) -> None:
        """Say at start-up what will run, and why not when it will not."""
        for name, learning in self.learning.items():
            wanted = learning.audit_rate > 0 or learning.label_escalations
            if not wanted:
                continue
            if not self.store_content:
                if learning.audit_rate > 0:
                    log.warning("route %s: audit_rate is %s but ledger.store_content is false: audits and escalation "
                                "labels compare answers and need content storage; none will run (set "
                                "ledger.store_content: true to turn them on)", name, learning.audit_rate)
                continue
            log.info("route %s: auditing %.1f%% of accepted lower-tier answers (budget $%.2f per UTC day)%s", name,
                     learning.audit_rate * 100, learning.audit_budget_usd,
                     "; labelling escalations" if learning.label_escalations else "")

    def load(self) -> bool:
        """Read today's audit spend from the ledger; False when the ledger cannot be read (audits then wait
        until it can: the budget fails closed)."""
        try:
            self.budget.load(self.ledger)
        except SQLAlchemyError as exc:
            log.warning("today's audit spend cannot be read from the ledger yet (%s): no audit runs until it can",
                        exc.__class__.__name__)
            return False
        self.budget_loaded = True
        return True

    def embed(self, texts: list[str]) -> np.ndarray:
        if self._embed is None:
            assert self._embed_factory is not None
            self._embed = self._embed_factory()
        return self._embed(texts)

    # -- after an answer ------------------------------------------------------------------------------------
    def applies_to(self, route: object) -> bool:
        """Whether answers of `route` may be labelled (a cascade with its learning settings, content stored)."""
        return self.store_content and isinstance(route, CascadeRoute) and route.name in self.learning

    def after(self, answered: Answered) -> None:
        """Schedule what this answer calls for (nothing on the client's time): escalation labels, an audit."""
        learning = self.learning.get(answered.route.name)
        trace = answered.trace
        if learning is None or not self.store_content or trace.accepted is not True or not trace.tiers:
            return
        returned = trace.model
        rejected = [t.model for t in trace.tiers if t.outcome == "rejected" and t.model in trace.answers]
        escalations = rejected if learning.label_escalations and returned is not None else []
        audit = (returned is not None and returned != answered.route.top_model
                 and sampled(answered.request_id, learning.audit_rate))
        if not escalations and not audit:
            return
        if self._in_flight >= MAX_IN_FLIGHT:
            self.metrics.audits.labels(answered.route.name, returned or "none", "skipped_busy").inc()
            return
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(answered, learning, escalations, audit))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for the audits in flight (at shutdown), so their rows and labels are written."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    async def _run(self, answered: Answered, learning: LearningConfig, escalations: list[str], audit: bool) -> None:
        try:
            query = query_text(answered.request)
            for model in escalations:
                await self._label_escalation(answered, query, model)
            if audit:
                await self._audit(answered, learning, query)
        except Exception:
            log.exception("labelling request %s failed", answered.request_id)
        finally:
            self._in_flight -= 1

    async def _compare(self, query: str, answer: str, reference: str) -> Verdict:
        def run() -> Verdict:
            try:
                return compare(query, answer, reference, self.embed if self._embed_factory else None)
            except OSError:  # MiniLM not built: compare by text
                return compare(query, answer, reference, None)

        return await run_in_threadpool(run)

    async def _label_escalation(self, answered: Answered, query: str, model: str) -> None:
        verdict = await self._compare(query, answered.trace.answers[model], answered.text)
        if not verdict.usable:
            return
        await self._write_label(answered, model, "escalation", verdict, answered.text, 1.0, accepted=False)

    async def _audit(self, answered: Answered, learning: LearningConfig, query: str) -> None:
        route, audited = answered.route, answered.trace.model
        assert audited is not None
        name = route.name
        max_tokens = learning.audit_max_tokens
        asked = answered.request.params.get("max_tokens") or answered.request.params.get("max_completion_tokens")
        if isinstance(asked, int) and asked > 0:
            max_tokens = min(max_tokens, asked)
        # the prompt counted by the answering tier's tokenizer, with a margin for the top tier's own
        prompt_tokens = int(answered.prompt_tokens * 1.5) + 32
        reserve = route.price(route.top_model).cost(prompt_tokens, max_tokens)
        if not self.budget_loaded and not await run_in_threadpool(self.load):
            self.metrics.audits.labels(name, audited, "skipped_budget").inc()
            return
        if not self.budget.reserve(name, reserve):
            self.metrics.audits.labels(name, audited, "skipped_budget").inc()
            return
        params = {k: v for k, v in answered.request.params.items()
                  if k not in ("n", "logprobs", "top_logprobs", "stream", "stream_options", "max_completion_tokens")}
        params["max_tokens"] = max_tokens
        request = replace(answered.request, params=params, samples=0)
        trace = DecisionTrace(route=name)
        started = datetime.now(UTC)
        cost = 0.0
        try:
            result = await route.ask_top(request, trace)
        except Exception as exc:  # a failed audit is counted and recorded; it never reaches a client
            self.budget.settle(name, reserve, trace.cost_usd)
            self.metrics.audits.labels(name, audited, "failed").inc()
            self._record_audit(answered, trace, started, None, None, str(exc)[:200])
            return
        cost = trace.cost_usd
        self.budget.settle(name, reserve, cost)
        self.metrics.audit_spend.labels(name).inc(cost)
        self.estimates.audit_cost(name, audited, cost)
        verdict = await self._compare(query, answered.text, result.text)
        self._record_audit(answered, trace, started, result, verdict, None)
        if not verdict.usable:
            self.metrics.audits.labels(name, audited, "unusable").inc()
            return
        self.metrics.audits.labels(name, audited, "agree" if verdict.agree else "disagree").inc()
        await self._write_label(answered, audited, "audit", verdict, result.text, learning.audit_rate, accepted=True)

    def _record_audit(self, answered: Answered, trace: DecisionTrace, started: datetime, result: Any,
                      verdict: Verdict | None, error: str | None) -> None:
        """The audit's own ledger row: the operator's spend, linked to the audited request."""
        body = trace.to_dict()
        body["audit"] = {"model": answered.trace.model, "verdict": None if verdict is None else
                         ("unusable" if not verdict.usable else "agree" if verdict.agree else "disagree"),
                         "method": verdict.method if verdict else None, "score": verdict.score if verdict else None,
                         "error": error}
        usage = result.usage if result is not None else None
        self.ledger.record(ledger_row(
            id=f"{answered.request_id}-audit", created_at=started, key_id=None, endpoint=answered.endpoint,
            route=answered.route.name, model=trace.model, models_tried=trace.models_tried,
            status=200 if result is not None else 502, error_code=None if result is not None else "audit_failed",
            stream=False, prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0, tokens_estimated=bool(usage and usage.estimated),
            cost_usd=trace.cost_usd, latency_ms=(datetime.now(UTC) - started).total_seconds() * 1000, ttft_ms=None,
            cache="none", client_disconnected=False, user=None, trace=body, prompt=None,
            response=result.text if result is not None else None, purpose="audit", parent_id=answered.request_id,
            route_version=answered.route.version))

    async def _write_label(self, answered: Answered, model: str, source: str, verdict: Verdict, reference: str,
                           sample_rate: float, *, accepted: bool) -> None:
        label = "good" if verdict.agree else "bad"
        await run_in_threadpool(
            self.ledger.upsert_label, request_id=answered.request_id, source=source, model=model,
            route=answered.route.name, key_id=None, label=label, score=verdict.score, comment=None,
            correction=reference, method=verdict.method, sample_rate=sample_rate)
        self.metrics.feedback.labels(answered.route.name, source, label).inc()
        self.estimates.label(answered.route.name, model, source, label, accepted=accepted)
