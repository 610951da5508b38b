"""Weight-only block quantization in the layout of onnxruntime's `MatMulNBits` contrib operator.

`MatMulNBits` computes Y = A @ W^T with W (N x K) stored as `bits`-bit unsigned integers in blocks of
`block_size` along K, each block with a float scale and an integer zero point: w = (q - zp) * scale.
Without a zero-point input the zero point is 2^(bits-1) (symmetric quantization).

Weights pass through one representation, `IntBlocks` (signed integers and a scale per block of 32 or 16
weights, plus an optional per-block offset), whether they come from a GGUF's own blocks (kept exactly) or from
float weights quantized here; they then become 4-bit blocks, 8-bit blocks, or 8-bit values split into two
4-bit halves (`split_int8`).

Which GGUF block types are kept exactly (`gguf_blocks`), with w = scale·q + offset per block:

| type | block | q | offset |
|---|---|---|---|
| Q4_0 | 32 | 4-bit, q − 8 | none |
| Q4_1 | 32 | 4-bit, q − 8 | m + 8d |
| Q5_0 | 32 | 5-bit, q − 16 (8-bit path) | none |
| Q5_1 | 32 | 5-bit, q − 16 (8-bit path) | m + 16d |
| Q8_0 | 32 | 8-bit | none |
| Q4_K | 32 (sub-block of 256) | 4-bit, q − 8, scale d·sc | −dmin·m + 8·d·sc |
| Q5_K | 32 (sub-block of 256) | 5-bit, q − 16 (8-bit path), scale d·sc | −dmin·m + 16·d·sc |
| Q6_K | 16 (sub-block of 256) | 6-bit, q − 32 (8-bit path), scale d·sc | none |

Every other type (Q2_K, Q3_K, the IQ types, …) is dequantized and quantized again by the builder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: GGUF block types whose (sub-)blocks map exactly onto MatMulNBits blocks (table above).
EXACT_GGUF_TYPES = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"})
#: The block of the builder's own quantization, and of every GGUF type but Q6_K.
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
    """w = scale · q (+ offset) per block of `block` weights along K (32, or 16 for Q6_K)."""

    q: np.ndarray  # int8 [N, k_blocks, block]
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
    def block(self) -> int:
        return self.q.shape[2]

    def weights(self) -> np.ndarray:
        """The float32 weights [N, K] these blocks stand for (tests and error measurement)."""
        w = self.q.astype(np.float32) * self.scale[..., None]
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.reshape(self.n, -1)

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
    return Quantized(packed, blocks.scale.reshape(-1).astype(np.float32), None, blocks.n, blocks.k, bits,
                     blocks.block)


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
    return Quantized(packed, scale.reshape(-1), _pack_nibbles(zero), n, 2 * blocks.k, 4, blocks.block)


def with_block(blocks: IntBlocks, block: int) -> IntBlocks:
    """The same weights in blocks of `block` (a divisor of `blocks.block`): each block's scale and offset
    repeated over its pieces, so blocks of several tensors can be stacked into one projection exactly."""
    if block == blocks.block:
        return blocks
    if blocks.block % block:
        raise ValueError(f"blocks of {blocks.block} cannot be cut into blocks of {block}")
    pieces = blocks.block // block
    n, count = blocks.scale.shape

    def spread(values: np.ndarray | None) -> np.ndarray | None:
        return None if values is None else np.repeat(values, pieces, axis=1)

    return IntBlocks(blocks.q.reshape(n, count * pieces, block), spread(blocks.scale), spread(blocks.offset))


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
    integers and scales, so the weights are exactly the source's (the table at the top of this module).

    The K-quants' super-blocks of 256 weights carry a float16 `d` (and `dmin`) and small integer scales (and
    minimums) per sub-block; their products d·sc are exact in float32, so each sub-block becomes one block.
    """
    if type_name not in EXACT_GGUF_TYPES:
        raise ValueError(f"{type_name} blocks do not map exactly onto MatMulNBits")
    n = raw.shape[0]
    reader = _READERS[type_name]
    blocks = raw.reshape(n, -1, reader[0])
    q, scale, offset = reader[1](blocks)
    return IntBlocks(np.ascontiguousarray(q.reshape(n, -1, reader[2]).astype(np.int8)),
                     np.ascontiguousarray(scale.reshape(n, -1), dtype=np.float32),
                     None if offset is None else np.ascontiguousarray(offset.reshape(n, -1), dtype=np.float32))


_Parts = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # q [N, blocks, ...], scale, offset


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """ggml's 4-bit layout: element j in the low nibble of byte j, element j + len in its high nibble."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.int16)


def _high_bits(blocks: np.ndarray, start: int) -> np.ndarray:
    """The 32 fifth bits of Q5_0/Q5_1 (a little-endian uint32 at `start`), element j at bit j, shifted to 16."""
    qh = np.ascontiguousarray(blocks[:, :, start:start + 4]).view("<u4")[..., 0]
    return (((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int16)


def _q8_0(blocks: np.ndarray) -> _Parts:
    return np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8), _halves(blocks, 0), None


def _q4_0(blocks: np.ndarray) -> _Parts:
    return _nibbles(blocks[:, :, 2:]) - 8, _halves(blocks, 0), None


def _q4_1(blocks: np.ndarray) -> _Parts:
    d = _halves(blocks, 0)
    return _nibbles(blocks[:, :, 4:]) - 8, d, _halves(blocks, 2) + 8.0 * d


def _q5_0(blocks: np.ndarray) -> _Parts:
    return (_nibbles(blocks[:, :, 6:]) | _high_bits(blocks, 2)) - 16, _halves(blocks, 0), None


def _q5_1(blocks: np.ndarray) -> _Parts:
    d = _halves(blocks, 0)
    return (_nibbles(blocks[:, :, 8:]) | _high_bits(blocks, 4)) - 16, d, _halves(blocks, 2) + 16.0 * d


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 8 six-bit scales and 8 six-bit minimums, packed in 12 bytes (ggml's get_scale_min_k4)."""
    p = packed.astype(np.uint8)
    low, high = p[..., 0:4], p[..., 4:8]
    tail = p[..., 8:12]
    scales = np.concatenate([low & 63, (tail & 0x0F) | ((low >> 6) << 4)], axis=-1)
    minimums = np.concatenate([high & 63, (tail >> 4) | ((high >> 6) << 4)], axis=-1)
    return scales.astype(np.float32), minimums.astype(np.float32)


def _k_values(packed: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 4-bit values, [.., 8, 32]: sub-block 2c from the low nibbles of bytes 32c .. 32c + 31,
    sub-block 2c + 1 from their high nibbles."""
    chunks = packed.reshape(*packed.shape[:-1], 4, 32)
    return np.stack([chunks & 0x0F, chunks >> 4], axis=-2).reshape(*packed.shape[:-1], 8, 32).astype(np.int16)


def _q4_k(blocks: np.ndarray) -> _Parts:
    d, dmin = _halves(blocks, 0), _halves(blocks, 2)
    sc, m = _k_scales(blocks[:, :, 4:16])
    scale = d[..., None] * sc
    return _k_values(blocks[:, :, 16:144]) - 8, scale, 8.0 * scale - dmin[..., None] * m


def _q5_k(blocks: np.ndarray) -> _Parts:
    d, dmin = _halves(blocks, 0), _halves(blocks, 2)
    sc, m = _k_scales(blocks[:, :, 4:16])
    qh = blocks[:, :, 16:48].astype(np.int16)  # bit b of byte l: the fifth bit of sub-block b's element l
    fifth = ((qh[..., None, :] >> np.arange(8)[:, None]) & 1) << 4
    scale = d[..., None] * sc
    return (_k_values(blocks[:, :, 48:176]) | fifth) - 16, scale, 16.0 * scale - dmin[..., None] * m


def _q6_k(blocks: np.ndarray) -> _Parts:
    ql = blocks[:, :, 0:128].reshape(*blocks.shape[:2], 2, 64).astype(np.int16)
    qh = blocks[:, :, 128:192].reshape(*blocks.shape[:2], 2, 32).astype(np.int16)
    sc = np.ascontiguousarray(blocks[:, :, 192:208]).view(np.int8).astype(np.float32)
    d = _halves(blocks, 208)
    # Each half of 128: four runs of 32, low nibbles of ql[0:32], ql[32:64], then their high nibbles, with
    # two high bits each from qh (bits 0-1, 2-3, 4-5, 6-7).
    runs = [(ql[..., 0:32] & 0x0F), (ql[..., 32:64] & 0x0F), (ql[..., 0:32] >> 4), (ql[..., 32:64] >> 4)]
    q = np.stack([run | (((qh >> (2 * i)) & 3) << 4) for i, run in enumerate(runs)], axis=-2) - 32
    return q, d[..., None] * sc, None


#: type -> (bytes per block, reader, weights per output block)
_READERS: dict[str, tuple[int, Callable[[np.ndarray], _Parts], int]] = {
    "Q8_0": (34, _q8_0, 32), "Q4_0": (18, _q4_0, 32), "Q4_1": (20, _q4_1, 32),
    "Q5_0": (22, _q5_0, 32), "Q5_1": (24, _q5_1, 32),
    "Q4_K": (144, _q4_k, 32), "Q5_K": (176, _q5_k, 32), "Q6_K": (210, _q6_k, 16),
}
