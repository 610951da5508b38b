"""What happened to one request, recorded once into the ledger and the metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.estimates import LiveEstimates
from gateway.ledger import Ledger, ledger_row
from gateway.metrics import GatewayMetrics
from router.trace import DecisionTrace
from workers.backend import Usage

log = logging.getLogger("frugal.requests")

#: Status recorded for a stream the client abandoned (nginx's convention; never sent on the wire).
CLIENT_CLOSED = 499


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    key_id: str | None = None
    route: str | None = None
    #: The route label for metrics: a configured name, or "unknown".
    route_label: str = "unknown"
    stream: bool = False
    status: int = 500
    error_code: str | None = None
    trace: DecisionTrace | None = None
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    ttft_s: float | None = None
    client_disconnected: bool = False
    user: str | None = None
    prompt: Any = None
    response: str | None = None
    recorded: bool = False
    #: Response cache: "none" (not consulted), "bypass", "miss", "hit" or "semantic-hit".
    cache: str = "none"
    #: What the cached answer cost when it was made (hits only).
    cache_saved_usd: float = 0.0

    def failed(self, status: int, code: str | None) -> None:
        self.status, self.error_code = status, code

    def abandoned(self) -> None:
        """The client went away before the answer was complete."""
        self.client_disconnected = True
        self.status, self.error_code = CLIENT_CLOSED, "client_closed"

    def answered(self, usage: Usage, cost_usd: float, response: str | None) -> None:
        """A complete answer was sent (`response`: its text, kept only when content is stored)."""
        self.usage, self.cost_usd, self.response = usage, cost_usd, response
        self.status = 200

    def spent(self, usage: Usage, cost_usd: float, response: str | None) -> None:
        """What an answer that ended early used and cost (its status is set apart)."""
        self.usage, self.cost_usd, self.response = usage, cost_usd, response


class Recorder:
    def __init__(self, ledger: Ledger, metrics: GatewayMetrics, store_content: bool,
                 estimates: LiveEstimates | None = None,
                 spend_tokens: Callable[[str, int], None] | None = None) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.store_content = store_content
        self.estimates = estimates
        #: Told the tokens each answered request used (the per-key token rate limits).
        self.spend_tokens = spend_tokens

    def start(self, request_id: str, endpoint: str) -> RequestRecord:
        """A new request: counted in flight until `finish`."""
        self.metrics.in_flight.inc()
        return RequestRecord(request_id=request_id, endpoint=endpoint)

    def finish(self, record: RequestRecord) -> None:
        """Record `record` once; never raises (a bookkeeping failure must not fail the request)."""
        if record.recorded:
            return
        record.recorded = True
        self.metrics.in_flight.dec()
        latency_s = time.perf_counter() - record.started
        try:
            self._ledger(record, latency_s)
            self._metrics(record, latency_s)
            if self.spend_tokens is not None and record.key_id and record.cache not in ("hit", "semantic-hit"):
                self.spend_tokens(record.key_id, record.usage.total_tokens)
        except Exception:
            log.exception("recording request %s failed", record.request_id)
        log.info(
            "request id=%s endpoint=%s route=%s model=%s status=%s cost_usd=%.8f latency_ms=%.1f",
            record.request_id, record.endpoint, record.route, record.trace.model if record.trace else None,
            record.status, record.cost_usd, latency_s * 1000,
        )

    def _ledger(self, record: RequestRecord, latency_s: float) -> None:
        trace = record.trace
        self.ledger.record(ledger_row(
            id=record.request_id,
            created_at=record.created_at,
            key_id=record.key_id,
            endpoint=record.endpoint,
            route=record.route[:256] if record.route else None,
            model=trace.model if trace else None,
            models_tried=trace.models_tried if trace else [],
            status=record.status,
            error_code=record.error_code,
            stream=record.stream,
            prompt_tokens=record.usage.prompt_tokens,
            completion_tokens=record.usage.completion_tokens,
            tokens_estimated=record.usage.estimated,
            cost_usd=record.cost_usd,
            latency_ms=latency_s * 1000,
            ttft_ms=record.ttft_s * 1000 if record.ttft_s is not None else None,
            cache=record.cache,
            client_disconnected=record.client_disconnected,
            user=record.user,
            trace=trace.to_dict() if trace else None,
            prompt=record.prompt if self.store_content else None,
            response=record.response if self.store_content else None,
            route_version=trace.version if trace else None,
        ))

    def _metrics(self, record: RequestRecord, latency_s: float) -> None:
        m = self.metrics
        trace = record.trace
        model = trace.model if trace and trace.model else "none"
        m.requests.labels(record.endpoint, record.route_label, model, str(record.status)).inc()
        m.latency.labels(record.route_label, "true" if record.stream else "false").observe(latency_s)
        if record.ttft_s is not None:
            m.ttft.labels(record.route_label).observe(record.ttft_s)
        if record.cache != "none":
            m.cache_requests.labels(record.route_label, record.cache).inc()
            if record.cache in ("hit", "semantic-hit"):
                m.cache_saved.labels(record.route_label, record.cache).inc(record.cache_saved_usd)
                return  # no model was called: no tokens, spend or errors to count
        if trace is None:
            return
        if trace.model:
            m.tokens.labels(trace.model, "input").inc(record.usage.prompt_tokens)
            m.tokens.labels(trace.model, "output").inc(record.usage.completion_tokens)
            m.cost.labels(trace.model).inc(record.cost_usd)
        for attempt in trace.attempts:
            if attempt.called and attempt.outcome != "ok":
                m.upstream_errors.labels(attempt.model, attempt.outcome).inc()
        calls = [a.model for a in trace.attempts if a.called]
        for position, name in enumerate(calls):
            if name in calls[:position]:
                m.retries.labels(name).inc()
        if trace.fallbacks and not trace.tiers:
            m.fallbacks.labels(record.route_label).inc(trace.fallbacks)
        if trace.tiers:
            self._cascade_metrics(record.route_label, trace)
        for compression in trace.compressions:
            m.compressions.labels(compression.model, compression.outcome).inc()
            if compression.outcome == "compressed":
                m.compression_tokens_removed.labels(compression.model).inc(compression.tokens_removed)
                m.compression_saved.labels(compression.model).inc(compression.saved_usd)
            if compression.latency_s:  # prompts found too short were scored too
                m.compression_latency.labels(compression.model).observe(compression.latency_s)

    def _cascade_metrics(self, route: str, trace: DecisionTrace) -> None:
        m = self.metrics
        if self.estimates is not None:
            self.estimates.request(route, trace.to_dict())
        m.cascade_depth.labels(route).observe(len(trace.tiers))
        accepted = trace.accepted_tier
        if accepted is not None:
            m.cascade_accepted.labels(route, str(accepted), trace.tiers[accepted - 1].model).inc()
        if trace.accepted is not None:
            m.cascade_answers.labels(route, "true" if trace.accepted else "false").inc()
        for tier in trace.tiers:
            if tier.reason is not None:
                m.cascade_escalations.labels(route, tier.model, tier.reason).inc()
        if trace.saved_usd is not None:
            m.cascade_saved.labels(route).inc(trace.saved_usd)
