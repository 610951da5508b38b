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

HEAD_FILE = "head_q8.npz"
CANDIDATES = 16


def save_head(out_dir: Path, q8: np.ndarray, scales: np.ndarray) -> None:
    """`q8` int8 [vocab, d_model], `scales` float32 [vocab, d_model / 32]: weight = q8 * scale per block."""
    np.savez(out_dir / HEAD_FILE, q8=q8.astype(np.int8), scales=scales.astype(np.float32))


def head_from_weights(weight: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 blocks for float weights (for heads whose source is not Q8_0)."""
    v, k = weight.shape
    blocks = weight.reshape(v, k // block, block)
    scales = np.abs(blocks).max(axis=2) / 127.0
    scales[scales == 0] = 1.0
    q8 = np.clip(np.rint(blocks / scales[..., None]), -127, 127).astype(np.int8).reshape(v, k)
    return q8, scales.astype(np.float32)


class ExactHead:
    def __init__(self, model_dir: Path) -> None:
        data = np.load(Path(model_dir) / HEAD_FILE)
        self.q8 = data["q8"]
        self.scales = data["scales"]
        self.block = self.q8.shape[1] // self.scales.shape[1]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        q = self.q8[ids].astype(np.float32).reshape(len(ids), -1, self.block)
        return (q * self.scales[ids][..., None]).reshape(len(ids), -1)

    def rescore(self, logits: np.ndarray, hidden: np.ndarray, candidates: int = CANDIDATES) -> np.ndarray:
        """`logits` [vocab] with its top `candidates` replaced by exact float32 values."""
        top = np.argpartition(-logits, candidates)[:candidates]
        exact = self.rows(top) @ hidden.astype(np.float32)
        fixed = logits.copy()
        fixed[top] = exact
        return fixed
