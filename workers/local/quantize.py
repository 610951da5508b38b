"""Weight-only block quantization in the layout of onnxruntime's `MatMulNBits` contrib operator.

`MatMulNBits` computes Y = A @ W^T with W (N x K) stored as `bits`-bit unsigned integers in blocks of
`block_size` along K, each block with a float scale and an integer zero point: w = (q - zp) * scale.
Without a zero-point input the zero point is 2^(bits-1) (symmetric quantization).

Weights pass through one representation, `IntBlocks` (signed integers and a scale per block of 32, plus
an optional per-block offset), whether they come from a GGUF's own blocks (kept exactly) or from float
weights quantized here; they then become 4-bit blocks, 8-bit blocks, or 8-bit values split into two 4-bit
halves (`split_int8`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: GGUF block types whose blocks (32 weights along K) map exactly onto MatMulNBits blocks.
EXACT_GGUF_TYPES = frozenset({"Q4_0", "Q4_1", "Q8_0"})
GGUF_BLOCK = 32


@dataclass(frozen=True, slots=True)
class Quantized:
    packed: np.ndarray  # uint8 [N, k_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [N * k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks * bits / 8)], or None (symmetric)
    n: int
    k: int
    bits: int
    block_size: int


@dataclass(frozen=True, slots=True)
class IntBlocks:
    """w = scale · q (+ offset) per block of `GGUF_BLOCK` weights along K."""

    q: np.ndarray  # int8 [N, k_blocks, 32]
    scale: np.ndarray  # float32 [N, k_blocks]
    #: float32 [N, k_blocks]: a constant added to every weight of the block (Q4_1's minimum), or None.
    offset: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.q.shape[0]

    @property
    def k(self) -> int:
        return self.q.shape[1] * self.q.shape[2]

    @property
    def fits_4_bits(self) -> bool:
        return bool(self.q.min(initial=0) >= -8 and self.q.max(initial=0) <= 7)


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """uint8 values < 16 along the last axis, two per byte, the first in the low nibble."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), dtype=np.uint8)], axis=-1)
    return np.ascontiguousarray(values[..., 0::2] | (values[..., 1::2] << 4))


def pack(blocks: IntBlocks, bits: int) -> Quantized:
    """Symmetric MatMulNBits blocks (implicit zero point 2^(bits-1)) holding exactly `blocks.q`."""
    if bits == 4 and not blocks.fits_4_bits:
        raise ValueError("these weights do not fit in 4 bits exactly")
    unsigned = (blocks.q.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    packed = _pack_nibbles(unsigned) if bits == 4 else np.ascontiguousarray(unsigned)
    return Quantized(packed, blocks.scale.reshape(-1).astype(np.float32), None, blocks.n, blocks.k, bits, GGUF_BLOCK)


def split_int8(blocks: IntBlocks) -> Quantized:
    """8-bit weights as 4-bit MatMulNBits blocks over a doubled K, computed exactly by the fast kernel.

    q = 16·hi + lo with hi = q >> 4 in [-8, 7] and lo = q & 15 in [0, 15], so w = d·q = (16d)·hi + d·lo.
    The first K columns hold hi (zero point 8, scale 16d), the next K hold lo (zero point 0, scale d):
    `MatMulNBits(concat(x, x))` is x @ W^T with W's 8-bit values exactly. onnxruntime's CPU kernel for
    8-bit weights is fast only with int8 activations (float activations: ~20x slower, measured); its 4-bit
    kernel has a fast float path. `blocks.offset` is not part of the result.
    """
    q = blocks.q
    hi = ((q >> 4) + 8).astype(np.uint8)
    lo = (q & 0x0F).astype(np.uint8)
    packed = np.concatenate([_pack_nibbles(hi), _pack_nibbles(lo)], axis=1)
    scale = np.concatenate([16.0 * blocks.scale, blocks.scale], axis=1).astype(np.float32)
    n, count = blocks.scale.shape
    zero = np.concatenate([np.full((n, count), 8, np.uint8), np.zeros((n, count), np.uint8)], axis=1)
    return Quantized(packed, scale.reshape(-1), _pack_nibbles(zero), n, 2 * blocks.k, 4, GGUF_BLOCK)


def symmetric_blocks(weight: np.ndarray, bits: int) -> IntBlocks:
    """Float weights W (N x K, K a multiple of 32) as symmetric `bits`-bit blocks: scale = absmax / (2^(bits-1) - 1)."""
    n, k = weight.shape
    if k % GGUF_BLOCK:
        raise ValueError(f"K={k} is not a multiple of {GGUF_BLOCK}")
    w = weight.astype(np.float32).reshape(n, k // GGUF_BLOCK, GGUF_BLOCK)
    top = (1 << (bits - 1)) - 1
    scale = np.abs(w).max(axis=2) / top
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale[..., None]), -top, top).astype(np.int8)
    return IntBlocks(q, scale.astype(np.float32))


def quantize_asymmetric4(weight: np.ndarray, block_size: int = GGUF_BLOCK) -> Quantized:
    """Float weights W (N x K) as 4-bit blocks with zero points (loses less than symmetric 4 bits)."""
    n, k = weight.shape
    blocks = -(-k // block_size)
    padded = np.zeros((n, blocks * block_size), dtype=np.float32)
    padded[:, :k] = weight
    w = padded.reshape(n, blocks, block_size)
    low = np.minimum(w.min(axis=2, keepdims=True), 0.0)
    high = np.maximum(w.max(axis=2, keepdims=True), 0.0)
    scale = (high - low) / 15
    scale[scale == 0] = 1.0
    zero = np.clip(np.rint(-low / scale), 0, 15)
    q = np.clip(np.rint(w / scale) + zero, 0, 15).astype(np.uint8)
    return Quantized(_pack_nibbles(q), scale.reshape(-1).astype(np.float32),
                     _pack_nibbles(zero.reshape(n, blocks).astype(np.uint8)), n, k, 4, block_size)


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


def _halves(blocks: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, :, start:start + 2]).view(np.float16).astype(np.float32)[..., 0]


def gguf_blocks(raw: np.ndarray, type_name: str) -> IntBlocks:
    """GGUF quantized rows (uint8 [N, bytes per row]) as `IntBlocks`, without re-quantizing: the same
    integers and scales, so the weights are exactly the source's.

    Q4_0 (w = d·(q - 8)) and Q8_0 (w = d·q) are symmetric blocks as they stand. Q4_1 (w = d·q + m)
    becomes d·(q - 8) plus the per-block offset m + 8d.
    """
    if type_name not in EXACT_GGUF_TYPES:
        raise ValueError(f"{type_name} blocks do not map exactly onto MatMulNBits")
    n = raw.shape[0]
    offset = None
    if type_name == "Q8_0":
        blocks = raw.reshape(n, -1, 34)
        scale = _halves(blocks, 0)
        q = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8)
    else:
        size = 18 if type_name == "Q4_0" else 20
        blocks = raw.reshape(n, -1, size)
        scale = _halves(blocks, 0)
        packed = blocks[:, :, size - 16:]
        # ggml packs element j in the low nibble of byte j and element j + 16 in its high nibble.
        q = (np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.int16) - 8).astype(np.int8)
        if type_name == "Q4_1":
            offset = (_halves(blocks, 2) + 8.0 * scale).astype(np.float32)
    return IntBlocks(np.ascontiguousarray(q), scale.astype(np.float32), offset)
