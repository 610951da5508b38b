"""Judges answers: P(correct | query, answer, model, earlier tiers' answers).

Features (`features`, `vectors`), training and calibration (`train`), ONNX export (`export`), ONNX Runtime
scoring (`runtime`), quality measures (`quality`), and the labelled data they learn from (`dataset`).
See docs/scorer.md. Knows nothing of the other packages.
"""
