"""Exact re-scoring of the output layer's top candidates.

The fast output layer (MatMulNBits with int8 activations) computes all ~50k logits cheaply but not
exactly, and near-ties between the best candidates can flip (measured: SmolLM2's first answer token to
"What is the capital of France?" is "The" by 0.06 nats in fp32, and "L" with int8 activations, which
derails the whole answer). So the top candidates' logits are recomputed in float32 from the final hidden
state and the output weights kept exactly as int8 blocks with scales (lossless for GGUF Q8_0): 16 dot
products of length d_model per token, nothing measurable next to the layer itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workers.local.quantize import IntBlocks

HEAD_FILE = "head_q8.npz"
CANDIDATES = 16
#: Logits are scanned in chunks of this many for `top_candidates`.
CHUNK = 128


def top_candidates(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` largest values of each row of `logits` [n, vocab] (in no particular order), ties
    broken arbitrarily: [n, k].

    `np.argpartition` over a 49,152-wide row costs ~0.5 ms, 5% of a decode step. Here each row is cut into
    chunks of `CHUNK`, and only the k chunks with the largest maxima are searched: every one of the k largest
    values lies in a chunk whose maximum is at least the k-th largest value, and at most k chunks can hold
    such a maximum, so those k chunks hold them all (~0.07 ms a row, measured)."""
    n, vocab = logits.shape
    chunks = -(-vocab // CHUNK)
    if chunks <= k:
        return np.argpartition(logits, vocab - k, axis=-1)[:, vocab - k:]
    padded = logits
    if vocab % CHUNK:
        padded = np.full((n, chunks * CHUNK), -np.inf, dtype=logits.dtype)
        padded[:, :vocab] = logits
    blocks = padded.reshape(n, chunks, CHUNK)
    best = np.argpartition(blocks.max(axis=-1), chunks - k, axis=-1)[:, chunks - k:]  # [n, k] chunk numbers
    window = np.take_along_axis(blocks, best[:, :, None], axis=1).reshape(n, k * CHUNK)
    inside = np.argpartition(window, k * CHUNK - k, axis=-1)[:, k * CHUNK - k:]  # [n, k] within the window
    return best[np.arange(n)[:, None], inside // CHUNK] * CHUNK + inside % CHUNK


def save_head(out_dir: Path, blocks: IntBlocks) -> None:
    """The output weights as int8 blocks with a scale each: weight = q8 * scale per block (of 32, or 16)."""
    np.savez(out_dir / HEAD_FILE, q8=blocks.q.reshape(blocks.n, -1), scales=blocks.scale)


class ExactHead:
    def __init__(self, model_dir: Path) -> None:
        data = np.load(Path(model_dir) / HEAD_FILE)
        self.q8 = data["q8"]
        self.scales = data["scales"]
        self.block = self.q8.shape[1] // self.scales.shape[1]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Exact float32 weights of the output rows `ids` (any shape): [*ids.shape, d_model]."""
        q = self.q8[ids].astype(np.float32).reshape(*ids.shape, -1, self.block)
        return (q * self.scales[ids][..., None]).reshape(*ids.shape, -1)

    def rescore_rows(self, logits: np.ndarray, hidden: np.ndarray, candidates: int = CANDIDATES) -> None:
        """Each row of `logits` [n, vocab] with its top `candidates` replaced, in place, by exact float32
        values computed from that row's final hidden state `hidden` [n, d_model]."""
        top = top_candidates(logits, candidates)
        exact = np.einsum("ncd,nd->nc", self.rows(top), hidden.astype(np.float32))
        np.put_along_axis(logits, top, exact, axis=-1)
