"""Decides which models answer a request: one `Route` protocol (`route.py`) met by fallback routes and
cascades (tiers judged by a scorer), the pool that calls models with retries and cooldowns, streams that keep
their own books, and the decision trace. Offline, `router.fit` fits cascades to labelled outcomes.

Knows the `Backend` protocol of `workers` and a `Scorer` protocol (met by `scorer.runtime.OnnxScorer`),
nothing of HTTP.
"""
