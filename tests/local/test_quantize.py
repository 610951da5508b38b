"""The block layouts handed to MatMulNBits hold exactly the weights they stand for."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from workers.local.quantize import IntBlocks, dequantize, gguf_blocks, pack, split_int8, symmetric_blocks

QT = gguf.GGMLQuantizationType


def weights_of(blocks: IntBlocks) -> np.ndarray:
    w = blocks.q.astype(np.float32) * blocks.scale[..., None]
    if blocks.offset is not None:
        w = w + blocks.offset[..., None]
    return w.reshape(blocks.n, -1)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0])
def test_gguf_blocks_are_the_gguf_weights(qtype: QT) -> None:
    w = np.random.default_rng(0).normal(size=(24, 128)).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    expected = gguf.quants.dequantize(raw, qtype)
    np.testing.assert_allclose(weights_of(gguf_blocks(raw, qtype.name)), expected, rtol=0, atol=1e-6)


def test_split_int8_holds_the_8_bit_values_exactly() -> None:
    rng = np.random.default_rng(1)
    q = rng.integers(-128, 128, size=(16, 4, 32)).astype(np.int8)
    q[0, 0, :4] = [-128, 127, -1, 0]  # the extremes and the sign boundary
    blocks = IntBlocks(q, rng.random((16, 4), dtype=np.float32) + 0.01)
    split = split_int8(blocks)
    assert (split.bits, split.k, split.n) == (4, 2 * blocks.k, blocks.n)
    halves = dequantize(split)  # [N, 2K]: x @ (hi + lo)^T is what MatMulNBits(concat(x, x)) computes
    np.testing.assert_allclose(halves[:, :blocks.k] + halves[:, blocks.k:], weights_of(blocks), rtol=1e-6, atol=0)


def test_pack_keeps_4_and_8_bit_values_and_refuses_what_does_not_fit() -> None:
    q = np.random.default_rng(2).integers(-8, 8, size=(8, 2, 32)).astype(np.int8)
    blocks = IntBlocks(q, np.full((8, 2), 0.5, np.float32))
    for bits in (4, 8):
        np.testing.assert_array_equal(dequantize(pack(blocks, bits)), weights_of(blocks))
    wide = IntBlocks(q * 16, blocks.scale)
    assert not wide.fits_4_bits
    with pytest.raises(ValueError, match="4 bits"):
        pack(wide, 4)


def test_symmetric_8_bit_blocks_lose_at_most_half_a_step() -> None:
    w = np.random.default_rng(3).normal(size=(32, 96)).astype(np.float32)
    blocks = symmetric_blocks(w, 8)
    step = np.repeat(blocks.scale, 32, axis=1)
    assert np.all(np.abs(weights_of(blocks) - w) <= step / 2 + 1e-7)
