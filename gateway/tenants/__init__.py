"""Tenants: virtual keys, teams, budgets and the admin audit log (docs/keys-and-budgets.md)."""
