"""Prometheus metrics, in a registry of the app's own (so several apps can live in one process).

Labels stay low-cardinality: route and model names come from the config (anything else is "unknown"),
never key ids, users or prompts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("frugal_requests", "API requests by route, answering model and HTTP status",
                                ["endpoint", "route", "model", "status"], registry=r)
        self.tokens = Counter("frugal_tokens", "Tokens by model and direction (input/output)",
                              ["model", "direction"], registry=r)
        self.cost = Counter("frugal_cost_usd", "Spend in USD by model (configured prices)", ["model"], registry=r)
        self.latency = Histogram("frugal_request_duration_seconds", "Request latency, end to end",
                                 ["route", "stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("frugal_time_to_first_token_seconds", "Time to first streamed token",
                              ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_errors = Counter("frugal_upstream_errors", "Failed calls to models by kind",
                                       ["model", "kind"], registry=r)
        self.retries = Counter("frugal_retries", "Repeated calls to the same model", ["model"], registry=r)
        self.fallbacks = Counter("frugal_fallbacks", "Moves to the next model of a route", ["route"], registry=r)
        self.cooldowns = Gauge("frugal_models_in_cooldown", "Models in cooldown now", registry=r)
        self.in_flight = Gauge("frugal_requests_in_flight", "Requests being answered now", registry=r)
        self.cascade_depth = Histogram("frugal_cascade_depth", "Cascade tiers called per request", ["route"],
                                       buckets=(1, 2, 3, 4, 5, 6, 8), registry=r)
        self.cascade_accepted = Counter("frugal_cascade_accepted", "Cascade answers by the tier that gave them",
                                        ["route", "tier", "model"], registry=r)
        # A gauge, not a counter: a request whose last tier answered costs more than the reference model
        # alone, so the running total can go down.
        self.cascade_saved = Gauge("frugal_cascade_saved_usd", "Net USD saved by cascades against each route's "
                                   "most expensive model, since start", ["route"], registry=r)
        self.ledger_written = Gauge("frugal_ledger_rows_written", "Ledger rows written by this process",
                                    registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
