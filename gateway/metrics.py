"""Prometheus metrics, in a registry of the app's own (so several apps can live in one process).

Labels stay low-cardinality: route and model names come from the config (anything else is "unknown"),
never key ids, users or prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from workers.local.metrics import LocalEngineCollector

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
        self.cascade_answers = Counter("frugal_cascade_answers", "Cascade answers by whether a judge (or the last "
                                       "tier) accepted them (false: the best rejected answer, no higher tier "
                                       "could answer)", ["route", "accepted"], registry=r)
        self.cascade_escalations = Counter("frugal_cascade_escalations", "Cascade tiers passed over, by reason "
                                           "(score, error, timeout, capacity, context_length, capability, no_key, "
                                           "cooldown)", ["route", "model", "reason"], registry=r)
        # A gauge, not a counter: a request whose last tier answered costs more than the reference model
        # alone, so the running total can go down.
        self.cascade_saved = Gauge("frugal_cascade_saved_usd", "Net USD saved by cascades against each route's "
                                   "most expensive model, since start", ["route"], registry=r)
        self.cache_requests = Counter("frugal_cache_requests", "Requests by response-cache result (hit, "
                                      "semantic-hit, miss, bypass)", ["route", "result"], registry=r)
        self.cache_saved = Counter("frugal_cache_saved_usd", "USD not spent because the cache answered (what "
                                   "the cached answer cost when it was made)", ["route", "result"], registry=r)
        self.compressions = Counter("frugal_compressions", "Prompt compression decisions before models that "
                                    "answered, by outcome (compressed, opted_out, too_short, ...)",
                                    ["model", "outcome"], registry=r)
        self.compression_tokens_removed = Counter("frugal_compression_tokens_removed", "Prompt tokens removed by "
                                                  "compression (local tokenizer count)", ["model"], registry=r)
        self.compression_saved = Counter("frugal_compression_saved_usd", "Estimated USD saved by prompt "
                                         "compression (removed tokens x input price)", ["model"], registry=r)
        self.compression_latency = Histogram("frugal_compression_duration_seconds", "Time spent compressing a "
                                             "prompt", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.feedback = Counter("frugal_labels", "Labels of answers by source (client, audit, escalation) and "
                                "label (good, bad)", ["route", "source", "label"], registry=r)
        self.audits = Counter("frugal_audits", "Shadow audits of accepted lower-tier answers by the tier audited and "
                              "outcome (agree, disagree, unusable, failed, skipped_budget, skipped_busy)",
                              ["route", "model", "outcome"], registry=r)
        self.audit_spend = Counter("frugal_audit_spend_usd", "USD spent on shadow audits (the operator's, never "
                                   "billed to a client key)", ["route"], registry=r)
        self.ledger_written = Gauge("frugal_ledger_rows_written", "Ledger rows written by this process",
                                    registry=r)

    def watch(self, collector: object) -> None:
        """Export a collector read at each scrape (e.g. `gateway.estimates.LiveEstimates`)."""
        self.registry.register(collector)  # type: ignore[arg-type]

    def watch_local_engines(self, stats: Mapping[str, Callable[[], Mapping[str, float]]]) -> None:
        """Export the state of local models' engines (model name -> its `stats()`), read at each scrape."""
        self.registry.register(LocalEngineCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
