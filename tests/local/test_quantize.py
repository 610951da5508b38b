"""The block layouts handed to MatMulNBits hold exactly the weights they stand for."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from workers.local.quantize import (
    EXACT_GGUF_TYPES,
    IntBlocks,
    dequantize,
    gguf_blocks,
    pack,
    split_int8,
    symmetric_blocks,
    with_block,
)

QT = gguf.GGMLQuantizationType


def weights_of(blocks: IntBlocks) -> np.ndarray:
    return blocks.weights()


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0])
def test_gguf_blocks_are_the_gguf_weights(qtype: QT) -> None:
    w = np.random.default_rng(0).normal(size=(24, 128)).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    expected = gguf.quants.dequantize(raw, qtype)
    np.testing.assert_allclose(weights_of(gguf_blocks(raw, qtype.name)), expected, rtol=0, atol=1e-6)


#: Where each K-quant block keeps its float16 super-block scales (d, and dmin for Q4_K/Q5_K).
K_SCALES = {QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K, QT.Q6_K])
def test_k_quant_blocks_are_the_gguf_weights(qtype: QT) -> None:
    """gguf-py cannot quantize to K-quants, so the blocks are random bytes (every bit pattern of the packed
    values, scales and minimums) with sensible float16 super-block scales, read by gguf's reference dequantizer."""
    rng = np.random.default_rng(4)
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, size=(8, 3, size), dtype=np.uint8)
    for start in K_SCALES[qtype]:
        raw[:, :, start:start + 2] = (rng.random((8, 3, 1)) * 0.01).astype(np.float16).view(np.uint8)
    raw = raw.reshape(8, -1)
    blocks = gguf_blocks(raw, qtype.name)
    expected = gguf.quants.dequantize(raw, qtype)
    assert blocks.block == (16 if qtype == QT.Q6_K else 32)
    np.testing.assert_allclose(weights_of(blocks), expected, rtol=1e-6, atol=1e-7)
    assert blocks.fits_4_bits == (qtype == QT.Q4_K)  # 5- and 6-bit values take the 8-bit path


def test_blocks_cut_smaller_keep_their_weights() -> None:
    rng = np.random.default_rng(5)
    blocks = IntBlocks(rng.integers(-8, 8, size=(4, 3, 32)).astype(np.int8), rng.random((4, 3), dtype=np.float32),
                       rng.random((4, 3), dtype=np.float32))
    halved = with_block(blocks, 16)
    assert halved.block == 16 and halved.scale.shape == (4, 6)
    np.testing.assert_array_equal(weights_of(halved), weights_of(blocks))
    with pytest.raises(ValueError, match="cannot be cut"):
        with_block(halved, 32)


def test_other_types_are_not_claimed_exact() -> None:
    assert {"Q2_K", "Q3_K", "IQ4_NL", "BF16"}.isdisjoint(EXACT_GGUF_TYPES)
    with pytest.raises(ValueError, match="do not map exactly"):
        gguf_blocks(np.zeros((1, 84), np.uint8), "Q2_K")


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
