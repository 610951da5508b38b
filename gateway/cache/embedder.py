"""Question embeddings for the semantic cache: the local MiniLM encoder (ONNX Runtime, no torch).

The model folder is resolved (and built on first use, from the bundled safetensors) when the first text
is embedded, not when this module is imported or the object is made, so an app that never sees a
cacheable request never loads it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from workers.local.minilm import MiniLMEncoder

MODEL_NAME = "minilm-l6-v2"
DIM = 384
#: Texts per ONNX call in `embed_many`: padding to the longest text of a batch wastes work on long batches,
#: and past a few dozen texts a larger batch no longer runs faster per text on 2 cores.
BATCH = 64


class Embedder:
    """Unit-norm float32 sentence embeddings (all-MiniLM-L6-v2, 384 dimensions)."""

    def __init__(self, model_dir: Path | None = None, *, threads: int | None = None) -> None:
        """`model_dir`: a folder written by `frugal models build minilm-l6-v2` (default: the catalog's,
        built when missing). `threads` caps onnxruntime's intra-op threads."""
        self._model_dir = model_dir
        self._threads = threads
        self._encoder: MiniLMEncoder | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load (building it if missing) the encoder now rather than on the first text: blocking."""
        self._loaded()

    def _loaded(self) -> MiniLMEncoder:
        with self._lock:
            if self._encoder is None:
                from workers.local.catalog import resolve
                from workers.local.minilm import MiniLMEncoder

                folder = self._model_dir or resolve(MODEL_NAME)
                self._encoder = MiniLMEncoder(folder, threads=self._threads)
            return self._encoder

    def embed_many(self, texts: list[str], batch: int = BATCH) -> np.ndarray:
        """Embeddings of `texts`, float32 [len(texts), 384], in order; batched, blocking.

        Texts are sorted by length inside the call so that each batch pads to a similar length."""
        import numpy as np

        encoder = self._loaded()
        out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            out[rows] = encoder.embed([texts[i] for i in rows])
        return out

    async def embed(self, text: str) -> np.ndarray:
        """The embedding of one text, float32 (384,), computed in a worker thread off the event loop
        (loading the model, the first time, happens there too)."""
        return await asyncio.to_thread(self._embed_one, text)

    def _embed_one(self, text: str) -> np.ndarray:
        return self._loaded().embed([text])[0]


class SavedEmbeddings:
    """`embed_many` with a file of embeddings already computed (texts and vectors in one .npz), so that
    repeated calibration or benchmark runs embed each text once. Only texts missing from the file are
    embedded; the file is then rewritten with them."""

    def __init__(self, path: Path, embed_many: Callable[[list[str]], np.ndarray]) -> None:
        self._path = Path(path)
        self._embed_many = embed_many

    def __call__(self, texts: list[str]) -> np.ndarray:
        import numpy as np

        known: dict[str, np.ndarray] = {}
        if self._path.is_file():
            with np.load(self._path, allow_pickle=False) as saved:
                known = dict(zip(saved["texts"].tolist(), saved["vectors"], strict=True))
        missing = list(dict.fromkeys(t for t in texts if t not in known))
        if missing:
            known.update(zip(missing, self._embed_many(missing), strict=True))
            self._path.parent.mkdir(parents=True, exist_ok=True)
            with self._path.open("wb") as handle:
                np.savez(handle, texts=np.array(list(known)), vectors=np.stack(list(known.values())))
        return np.stack([known[t] for t in texts]) if texts else np.zeros((0, DIM), dtype=np.float32)
