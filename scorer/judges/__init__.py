"""Judges packaged with Frugal, one folder per local model (`judge.onnx`, `judge.json`); built by
`frugal judge build` (docs/cascade.md, "The local judge")."""
