"""The exact output head finds the same best candidates as a full sort."""

from __future__ import annotations

import numpy as np
import pytest

from workers.local.head import CHUNK, top_candidates


@pytest.mark.parametrize("vocab", [49152, 49152 + 77, 3 * CHUNK + 5, 20])
def test_top_candidates_are_the_largest_values(vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((5, vocab)).astype(np.float32)
    logits[1] = np.round(logits[1], 1)  # many ties
    logits[2, :] = -3.0
    logits[2, [7, vocab - 1]] = 4.0  # the best values at the edges of the row
    logits[3, : min(vocab, 16 * CHUNK)] += 10  # all of them crowded into the first chunks
    k = min(16, vocab - 1)
    top = top_candidates(logits, k)
    assert top.shape == (5, k)
    for row, ids in zip(logits, top, strict=True):
        assert len(set(ids.tolist())) == k
        np.testing.assert_array_equal(np.sort(row[ids]), np.sort(row)[-k:])
