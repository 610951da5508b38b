"""How the builder holds each GGUF block type, and the weight error that costs (docs/local.md, "GGUF block types").

For every type: whether its blocks are kept exactly (`workers.local.quantize.EXACT_GGUF_TYPES`) or dequantized and
quantized again, and the measured difference between the weights the graph computes with and gguf's own
dequantization of the source (max |Δw| and RMS |Δw| / RMS |w|).

- Types found in the real GGUFs (SmolLM2-135M Q4_1; Qwen2.5-Coder 0.5B and 1.5B Q4_K_M when fetched): every
  tensor of that type, as the builder reads it.
- Exact types no real file here uses (Q4_0, Q5_1 from a real tensor with gguf-py's quantizer; Q5_K from random
  blocks, which gguf-py cannot write): the same measurement.
- The re-quantized path (every other type: Q2_K, Q3_K, the IQ types, F16/BF16/F32 sources): it starts from the
  dequantized float weights, so its error is that of the builder's own quantization, measured on real
  dequantized tensors: symmetric 8-bit blocks (`--quant int8`) and asymmetric 4-bit blocks (`--quant int4`).

    .venv/bin/python bench/gguf_types.py [--json] [--record]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import emit, markdown_table  # noqa: E402
from workers.local.catalog import smollm2_gguf  # noqa: E402
from workers.local.downloads import fetched_path  # noqa: E402
from workers.local.quantize import (  # noqa: E402
    EXACT_GGUF_TYPES,
    dequantize,
    gguf_blocks,
    quantize_asymmetric4,
    symmetric_blocks,
)

QT = gguf.GGMLQuantizationType


class Errors:
    """Max |Δw| and the RMS error relative to the weights' RMS, accumulated over tensors."""

    def __init__(self) -> None:
        self.max, self.squared, self.weight_squared, self.tensors, self.weights = 0.0, 0.0, 0.0, 0, 0

    def add(self, got: np.ndarray, want: np.ndarray) -> None:
        delta = (got.astype(np.float64) - want.astype(np.float64))
        self.max = max(self.max, float(np.abs(delta).max()))
        self.squared += float((delta ** 2).sum())
        self.weight_squared += float((want.astype(np.float64) ** 2).sum())
        self.tensors += 1
        self.weights += want.size

    def row(self, kind: str, how: str, source: str) -> list[object]:
        relative = (self.squared / self.weight_squared) ** 0.5 if self.weight_squared else 0.0
        return [kind, how, source, self.tensors, f"{self.weights:,}", f"{self.max:.3g}", f"{relative:.2e}"]


def sources() -> dict[str, Path]:
    found = {"SmolLM2-135M Q4_1": smollm2_gguf()}
    for name, label in (("qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B Q4_K_M"),
                        ("qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B Q4_K_M")):
        path = fetched_path(name)
        if path is not None:
            found[label] = path
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tensors", type=int, default=40, help="Tensors measured per type and file")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    rows: list[list[object]] = []
    float_samples: list[np.ndarray] = []
    for label, path in sources().items():
        reader = gguf.GGUFReader(str(path))
        by_type: dict[str, Errors] = {}
        for tensor in reader.tensors:
            kind = tensor.tensor_type.name
            if len(tensor.shape) != 2 or kind not in EXACT_GGUF_TYPES:
                continue
            errors = by_type.setdefault(kind, Errors())
            if errors.tensors >= args.max_tensors:
                continue
            want = gguf.dequantize(tensor.data, tensor.tensor_type)
            errors.add(gguf_blocks(np.asarray(tensor.data), kind).weights(), want)
            if len(float_samples) < 12 and "blk" in tensor.name and want.shape[1] % 32 == 0:
                float_samples.append(want.astype(np.float32))
        rows += [errors.row(kind, "exact", label) for kind, errors in sorted(by_type.items())]

    rng = np.random.default_rng(0)
    base = float_samples[0]
    for kind in (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0):
        errors = Errors()
        raw = gguf.quants.quantize(base, kind)
        errors.add(gguf_blocks(raw, kind.name).weights(), gguf.quants.dequantize(raw, kind))
        rows.append(errors.row(kind.name, "exact", "a real tensor quantized by gguf-py"))
    for kind in (QT.Q4_K, QT.Q5_K, QT.Q6_K):
        size = gguf.GGML_QUANT_SIZES[kind][1]
        raw = rng.integers(0, 256, size=(256, 4, size), dtype=np.uint8)
        starts = (208,) if kind == QT.Q6_K else (0, 2)
        for start in starts:
            raw[:, :, start:start + 2] = (rng.random((256, 4, 1)) * 1e-3).astype(np.float16).view(np.uint8)
        raw = raw.reshape(256, -1)
        errors = Errors()
        errors.add(gguf_blocks(raw, kind.name).weights(), gguf.quants.dequantize(raw, kind))
        rows.append(errors.row(kind.name, "exact", "random blocks"))

    int8, int4 = Errors(), Errors()
    for weights in float_samples:
        int8.add(symmetric_blocks(weights, 8).weights(), weights)
        int4.add(dequantize(quantize_asymmetric4(weights)), weights)
    rows.append(int8.row("any other (Q2_K, Q3_K, IQ*, F16, BF16, F32)", "re-quantized: 8-bit symmetric blocks "
                         "(--quant int8)", "real dequantized tensors"))
    rows.append(int4.row("any other", "re-quantized: 4-bit blocks with zero points (--quant int4)",
                         "real dequantized tensors"))

    headers = ["GGUF type", "held as", "measured on", "tensors", "weights", "max |Δw|", "RMS Δw / RMS w"]
    table = markdown_table(headers, rows)
    notes = ("Δw: the weights the ONNX graph computes with minus gguf's dequantization of the source. Exact types "
             "keep the source's integers and scales (w = scale·q + offset per block of 32, or 16 for Q6_K); "
             "0 means bit-identical float32 weights. Re-quantized types start from the dequantized floats.")
    emit(args, "GGUF block types: exact and re-quantized", "bench/gguf_types.py",
         {"headers": headers, "rows": rows}, table, notes)


if __name__ == "__main__":
    main()
