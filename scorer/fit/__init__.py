"""Offline work on the answer scorer: the labelled data it learns from (`dataset`), features of whole grids
(`grid_features`), training and calibration (`train`), ONNX export (`export`), grid scoring (`grid_scores`)
and quality measures (`quality`). Serving loads only what `export` writes, through `scorer.runtime`."""
