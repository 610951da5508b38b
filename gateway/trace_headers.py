"""The `x-frugal-*` response headers: what the decision trace says about a request, for the client."""

from __future__ import annotations

from router.trace import DecisionTrace


def trace_headers(trace: DecisionTrace) -> dict[str, str]:
    """The route, the models tried and the model that answered; a cascade's decision and prompt compression
    when the trace has them."""
    headers = {"x-frugal-route": trace.route, "x-frugal-models-tried": ",".join(trace.models_tried)}
    if trace.model:
        headers["x-frugal-model"] = trace.model
    if trace.tiers:
        headers.update(cascade_headers(trace))
    if trace.compressions:
        headers.update(compression_headers(trace))
    return headers


def cascade_headers(trace: DecisionTrace) -> dict[str, str]:
    """The cascade's decision, tier by tier (comma-separated in tier order; `-` where not applicable)."""

    def number(value: float | None, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    headers = {
        "x-frugal-tiers": ",".join(t.model for t in trace.tiers),
        "x-frugal-tier-outcomes": ",".join(t.outcome for t in trace.tiers),
        "x-frugal-scores": ",".join(number(t.score) for t in trace.tiers),
        "x-frugal-thresholds": ",".join(number(t.threshold) for t in trace.tiers),
        "x-frugal-tier-costs-usd": ",".join(f"{t.cost_usd:.10f}" for t in trace.tiers),
        "x-frugal-tier-latencies-ms": ",".join(f"{t.latency_s * 1000:.1f}" for t in trace.tiers),
        "x-frugal-escalations": ",".join(t.reason or "-" for t in trace.tiers),
    }
    if trace.accepted is not None:
        headers["x-frugal-accepted"] = "true" if trace.accepted else "false"
    accepted = trace.accepted_tier
    if accepted is not None:
        headers["x-frugal-tier-accepted"] = str(accepted)
    if trace.saved_usd is not None:
        headers["x-frugal-saved-usd"] = f"{trace.saved_usd:.10f}"
    if trace.version is not None:
        headers["x-frugal-route-version"] = trace.version
    return headers


def compression_headers(trace: DecisionTrace) -> dict[str, str]:
    """`x-frugal-compression`: per model that answered, what compression did (docs/compression.md)."""
    return {"x-frugal-compression": ",".join(f"{c.model}:{c.outcome}:{c.ratio:.3f}" for c in trace.compressions),
            "x-frugal-compression-tokens-removed": str(sum(c.tokens_removed for c in trace.compressions))}
