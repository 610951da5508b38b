"""Judges answers: features, training, calibration, ONNX export and scoring (the cascade issue).

Knows nothing of the other packages.
"""
