"""Decides which models answer a request: routes, fallbacks, retries, cooldowns (later: the cascade).

Knows the `Backend` protocol of `workers`, nothing of HTTP.
"""
