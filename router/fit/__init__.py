"""Offline work on cascades: the optimizer that fits tiers and thresholds to labelled outcomes, evaluation,
reports, published reference curves and plots (`frugal cascade fit / eval`). The serving path never imports
this package (tests/test_layout.py); what serving and fitting share lives in `router.tiers`."""
