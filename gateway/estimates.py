"""What a cascade's labels say (docs/learning.md, "Estimates"): per route and tier, how often an accepted
answer is wrong (the false-accept rate, with a Wilson 95% interval), how often the tier is passed over, what
share of its accepted answers carry a label, and what audits cost.

The false-accept rate is estimated from audit labels only: audits sample accepted answers at random (at the
route's `audit_rate`), so bad / audited is an unbiased estimate. Client feedback is counted apart: clients
report what they choose to, which is not a random sample.

Two views: `LiveEstimates`, counted by this process since it started and exported to Prometheus at each
scrape; and `ledger_estimates`, read from the ledger over a bounded time window (the admin API).
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import select

from gateway.ledger import Ledger, labels_table, requests_table

#: z of a two-sided 95% interval.
Z95 = 1.959963984540054


def wilson(bad: int, n: int, z: float = Z95) -> tuple[float, float, float] | None:
    """(estimate, low, high) of a proportion `bad / n` with its Wilson score interval; None when n is 0."""
    if n <= 0:
        return None
    p = bad / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # the interval always holds the estimate (rounding at p = 0 or 1 must not put it outside)
    return p, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


@dataclass
class TierCounts:
    """One tier of one route: what happened to its answers."""

    #: Requests that reached the tier (it was called or skipped).
    reached: int = 0
    #: Its answer was accepted (returned to the client).
    accepted: int = 0
    #: Passed over: rejected, failed or skipped.
    escalated: int = 0
    audited_good: int = 0
    audited_bad: int = 0
    #: Accepted answers with any label (audit or client).
    labelled: int = 0
    client_good: int = 0
    client_bad: int = 0
    audit_cost_usd: float = 0.0

    def summary(self) -> dict[str, Any]:
        interval = wilson(self.audited_bad, self.audited_good + self.audited_bad)
        return {
            "reached": self.reached,
            "accepted": self.accepted,
            "escalation_rate": self.escalated / self.reached if self.reached else None,
            "audited": self.audited_good + self.audited_bad,
            "audited_bad": self.audited_bad,
            "false_accept_rate": None if interval is None else
            {"estimate": interval[0], "low": interval[1], "high": interval[2], "confidence": 0.95},
            "label_coverage": self.labelled / self.accepted if self.accepted else None,
            "client_labels": {"good": self.client_good, "bad": self.client_bad},
            "audit_cost_usd": self.audit_cost_usd,
        }


@dataclass
class RouteCounts:
    tiers: dict[str, TierCounts] = field(default_factory=lambda: defaultdict(TierCounts))
    audit_cost_usd: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"audit_cost_usd": self.audit_cost_usd,
                "tiers": {model: counts.summary() for model, counts in self.tiers.items()}}


def count_trace(counts: RouteCounts, trace: dict[str, Any]) -> None:
    """Add one request's cascade trace (its `tiers`) to `counts`."""
    for tier in trace.get("tiers") or []:
        tally = counts.tiers[tier["model"]]
        tally.reached += 1
        if tier["outcome"] == "accepted":
            tally.accepted += 1
        elif tier["outcome"] != "fallback_accepted":
            tally.escalated += 1


def count_label(counts: RouteCounts, model: str, source: str, label: str, *, accepted: bool) -> None:
    """Add one label of `model`'s answer (`accepted`: the answer the client got was that tier's)."""
    tally = counts.tiers[model]
    if source == "audit":
        if label == "good":
            tally.audited_good += 1
        else:
            tally.audited_bad += 1
    elif source == "client":
        if label == "good":
            tally.client_good += 1
        else:
            tally.client_bad += 1
    if accepted and source in ("audit", "client"):
        tally.labelled += 1


class LiveEstimates:
    """Counted by this process; read by Prometheus at each scrape (`collect`)."""

    def __init__(self) -> None:
        self._routes: dict[str, RouteCounts] = defaultdict(RouteCounts)
        self._lock = threading.Lock()

    def request(self, route: str, trace: dict[str, Any]) -> None:
        with self._lock:
            count_trace(self._routes[route], trace)

    def label(self, route: str, model: str, source: str, label: str, *, accepted: bool) -> None:
        with self._lock:
            count_label(self._routes[route], model, source, label, accepted=accepted)

    def audit_cost(self, route: str, model: str, usd: float) -> None:
        with self._lock:
            self._routes[route].audit_cost_usd += usd
            self._routes[route].tiers[model].audit_cost_usd += usd

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {route: counts.summary() for route, counts in self._routes.items()}

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        rate = GaugeMetricFamily("frugal_false_accept_rate", "Share of a tier's accepted answers that audits found "
                                 "wrong, since start (bound: estimate, or the Wilson 95% interval's low/high)",
                                 labels=["route", "model", "bound"])
        coverage = GaugeMetricFamily("frugal_label_coverage", "Share of a tier's accepted answers with a label "
                                     "(audit or client), since start", labels=["route", "model"])
        escalation = GaugeMetricFamily("frugal_escalation_rate", "Share of the requests reaching a tier that it "
                                       "passed on (rejected, failed or skipped), since start",
                                       labels=["route", "model"])
        for route, counts in self.summary().items():
            for model, tier in counts["tiers"].items():
                if tier["false_accept_rate"] is not None:
                    for bound in ("estimate", "low", "high"):
                        rate.add_metric([route, model, bound], tier["false_accept_rate"][bound])
                if tier["label_coverage"] is not None:
                    coverage.add_metric([route, model], tier["label_coverage"])
                if tier["escalation_rate"] is not None:
                    escalation.add_metric([route, model], tier["escalation_rate"])
        yield from (rate, coverage, escalation)


#: The ledger view reads at most this many requests (newest first) per call: a bounded query.
MAX_ROWS = 200_000


def ledger_estimates(ledger: Ledger, route: str, since: datetime, until: datetime,
                     max_rows: int = MAX_ROWS) -> dict[str, Any]:
    """The estimates of `route` from the ledger's requests and labels in [since, until)."""
    counts = RouteCounts()
    r = requests_table.c
    query = (select(r.id, r.trace, r.model, r.purpose, r.cost_usd)
             .where(r.route == route, r.created_at >= since, r.created_at < until)
             .order_by(r.created_at.desc()).limit(max_rows))
    answered_by: dict[str, str | None] = {}
    with ledger.engine.connect() as connection:
        rows = connection.execute(query).all()
        for row in rows:
            if row.purpose == "audit":
                counts.audit_cost_usd += row.cost_usd
                audited = (row.trace or {}).get("audit", {}).get("model")
                if audited:
                    counts.tiers[audited].audit_cost_usd += row.cost_usd
                continue
            if row.trace:
                count_trace(counts, row.trace)
            answered_by[row.id] = row.model
        c = labels_table.c
        labels = connection.execute(select(c.request_id, c.model, c.source, c.label)
                                    .where(c.route == route, c.created_at >= since)).all()
    seen: set[tuple[str, str]] = set()
    for label in labels:
        if label.request_id not in answered_by:
            continue  # its request is outside the window
        accepted = answered_by[label.request_id] == label.model
        first = (label.request_id, label.model) not in seen  # an answer labelled twice is covered once
        seen.add((label.request_id, label.model))
        count_label(counts, label.model, label.source, label.label, accepted=accepted and first)
    return {"route": route, "since": since.isoformat(), "until": until.isoformat(), "requests": len(answered_by),
            "truncated": len(rows) >= max_rows, **counts.summary()}
