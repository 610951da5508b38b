"""Judges answers: P(correct | query, answer, model, earlier tiers' answers).

Serving: features (`features`, `vectors`) and ONNX Runtime scoring (`runtime`). Offline, in `scorer.fit`:
the labelled data, training and calibration, ONNX export and quality measures. See docs/scorer.md. Knows
nothing of the other packages.
"""
