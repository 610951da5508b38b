"""Offline: learning from the ledger (`frugal judge retrain`, `frugal cascade refit`; docs/learning.md).
Never imported by the serving path."""
