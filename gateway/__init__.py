"""The HTTP edge of Frugal: OpenAI-compatible API, keys and limits, spend ledger, metrics, CLI."""
