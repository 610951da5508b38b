"""Text generation: the `Backend` protocol and its implementations.

Knows nothing of HTTP routing or cascades. The gateway builds backends from its configuration and
the router drives them through the protocol in `workers.backend`.
"""
