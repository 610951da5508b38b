"""Weight-only block quantization in the layout of onnxruntime's `MatMulNBits` contrib operator.

`MatMulNBits` computes Y = A @ W^T with W (N x K) stored as `bits`-bit integers in blocks of
`block_size` along K, each block with a float scale and an integer zero point: w = (q - zp) * scale.
Without a zero-point input the zero point is 2^(bits-1) (symmetric quantization).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Quantized:
    packed: np.ndarray  # uint8 [N, k_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [N * k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks * bits / 8)], or None (symmetric)
    n: int
    k: int
    bits: int
    block_size: int


def quantize(weight: np.ndarray, bits: int, block_size: int = 32, symmetric: bool = True) -> Quantized:
    """Quantize W (N x K, float32) blockwise along K."""
    if bits not in (4, 8):
        raise ValueError("bits must be 4 or 8")
    n, k = weight.shape
    blocks = -(-k // block_size)
    padded = np.zeros((n, blocks * block_size), dtype=np.float32)
    padded[:, :k] = weight
    w = padded.reshape(n, blocks, block_size)
    levels = (1 << bits) - 1
    if symmetric:
        half = 1 << (bits - 1)
        absmax = np.abs(w).max(axis=2, keepdims=True)
        scale = absmax / (half - 1)
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(w / scale), -half, half - 1) + half
        zero = None
    else:
        low = np.minimum(w.min(axis=2, keepdims=True), 0.0)
        high = np.maximum(w.max(axis=2, keepdims=True), 0.0)
        scale = (high - low) / levels
        scale[scale == 0] = 1.0
        zero = np.clip(np.rint(-low / scale), 0, levels)
        q = np.clip(np.rint(w / scale) + zero, 0, levels)
    q = q.astype(np.uint8)
    if bits == 4:
        q = q[:, :, 0::2] | (q[:, :, 1::2] << 4)
    zero_points = None
    if zero is not None:
        z = zero.reshape(n, blocks).astype(np.uint8)
        if bits == 4:
            if blocks % 2:
                z = np.concatenate([z, np.zeros((n, 1), dtype=np.uint8)], axis=1)
            z = z[:, 0::2] | (z[:, 1::2] << 4)
        zero_points = np.ascontiguousarray(z)
    return Quantized(np.ascontiguousarray(q), scale.reshape(-1).astype(np.float32), zero_points, n, k, bits,
                     block_size)


def dequantize(quantized: Quantized) -> np.ndarray:
    """The float32 weights a `Quantized` stands for (tests and error measurement)."""
    q = quantized.packed
    if quantized.bits == 4:
        q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(q.shape[0], q.shape[1], -1)
    q = q.astype(np.float32)
    n, blocks = q.shape[0], q.shape[1]
    if quantized.zero_points is None:
        zero = np.full((n, blocks, 1), float(1 << (quantized.bits - 1)), dtype=np.float32)
    else:
        z = quantized.zero_points
        if quantized.bits == 4:
            z = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(n, -1)[:, :blocks]
        zero = z.astype(np.float32).reshape(n, blocks, 1)
    w = (q - zero) * quantized.scales.reshape(n, blocks, 1)
    return w.reshape(n, -1)[:, : quantized.k]


#: GGUF block types whose blocks (32 weights along K) map exactly onto MatMulNBits blocks.
EXACT_GGUF_TYPES = frozenset({"Q4_0", "Q4_1", "Q8_0"})
GGUF_BLOCK = 32


def _halves(blocks: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, :, start:start + 2]).view(np.float16).astype(np.float32)[..., 0]


def from_gguf_blocks(raw: np.ndarray, type_name: str, bits: int) -> tuple[Quantized, np.ndarray | None]:
    """GGUF quantized rows (uint8 [N, bytes per row]) as `bits`-bit MatMulNBits weights, without
    re-quantizing: the same integers and scales, so the weights are exactly the source's.

    Q4_0 (w = d * (q - 8)) and Q8_0 (w = d * q) fit MatMulNBits' symmetric form directly. Q4_1
    (w = d * q + m) becomes the symmetric form d * (q - 8) plus a per-block constant c = m + 8d, returned
    as `correction` [N, K / 32]: y = MatMulNBits(x) + blocksum(x) @ correction^T.
    """
    if type_name not in EXACT_GGUF_TYPES:
        raise ValueError(f"{type_name} blocks do not map exactly onto MatMulNBits")
    n = raw.shape[0]
    correction = None
    if type_name == "Q8_0":
        blocks = raw.reshape(n, -1, 34)
        scale = _halves(blocks, 0)
        signed = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).astype(np.int16)
        if bits == 4:
            raise ValueError("Q8_0 weights do not fit in 4 bits exactly")
        q = (signed + 128).astype(np.uint8)
    else:
        size = 18 if type_name == "Q4_0" else 20
        blocks = raw.reshape(n, -1, size)
        scale = _halves(blocks, 0)
        packed = blocks[:, :, size - 16:]
        # ggml packs element j in the low nibble of byte j and element j + 16 in its high nibble.
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.uint8)
        if type_name == "Q4_1":
            correction = (_halves(blocks, 2) + 8.0 * scale).astype(np.float32)
        if bits == 8:
            q = (q.astype(np.int16) - 8 + 128).astype(np.uint8)
    block_count = q.shape[1]
    if bits == 4:
        q = q[:, :, 0::2] | (q[:, :, 1::2] << 4)
    quantized = Quantized(np.ascontiguousarray(q), scale.reshape(-1).astype(np.float32), None, n,
                          block_count * GGUF_BLOCK, bits, GGUF_BLOCK)
    return quantized, correction
