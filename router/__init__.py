"""Decides which models answer a request: fallback routes (retries, cooldowns) and cascades (tiers judged
by a scorer), the decision trace, and the optimizer that fits cascades to labelled outcomes.

Knows the `Backend` protocol of `workers` and a `Scorer` protocol (met by `scorer.runtime.OnnxScorer`),
nothing of HTTP.
"""
