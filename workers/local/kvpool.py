"""Keys and values for the sequences an engine decodes together.

One float32 array [layers, 2 (key, value), slots, kv_heads, capacity, head_dim] holds every slot. A batch of
n sequences decodes in slots 0 .. n-1, bound to the graph as one contiguous view per layer and kind
([n, kv_heads, capacity, head_dim], no copy); GroupQueryAttention writes each row's new key and value in
place, at that row's own length (its attention-mask sum). A sequence being prefilled uses a slot of its own,
bound as a batch of one. Moving a sequence between slots, and copying spans in and out of the prefix cache,
are single numpy copies across all layers at once.

The array is allocated zeroed and untouched: the operating system maps its pages only as sequences write
them, so memory grows with the tokens actually held, up to slots × capacity × `bytes_per_token`.
"""

from __future__ import annotations

import numpy as np

from workers.local.runtime import CacheTensors, DecoderInfo

KINDS = ("key", "value")


class KVPool:
    def __init__(self, info: DecoderInfo, slots: int, capacity: int) -> None:
        self.info = info
        self.slots = slots
        self.capacity = capacity
        self.data = np.zeros((info.n_layers, 2, slots, info.n_kv_heads, capacity, info.head_dim), dtype=np.float32)
        self._batches: dict[int, CacheTensors] = {}
        self._singles: dict[int, CacheTensors] = {}

    @property
    def bytes_per_token(self) -> int:
        return self.info.n_layers * 2 * self.info.n_kv_heads * self.info.head_dim * 4

    def _values(self, start: int, stop: int) -> CacheTensors:
        import onnxruntime as ort  # noqa: PLC0415

        # OrtValues over views of `data`: onnxruntime reads and writes this memory directly.
        return CacheTensors({(layer, kind): ort.OrtValue.ortvalue_from_numpy(self.data[layer, k, start:stop])
                             for layer in range(self.info.n_layers) for k, kind in enumerate(KINDS)})

    def batch(self, n: int) -> CacheTensors:
        """The cache of slots 0 .. n-1, as the graph's past/present bindings."""
        if n not in self._batches:
            self._batches[n] = self._values(0, n)
        return self._batches[n]

    def single(self, slot: int) -> CacheTensors:
        """The cache of one slot, as a batch of one."""
        if slot not in self._singles:
            self._singles[slot] = self._values(slot, slot + 1)
        return self._singles[slot]

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of slot `source` into slot `target`."""
        self.data[:, :, target, :, :length] = self.data[:, :, source, :, :length]

    def read(self, slot: int, start: int, stop: int) -> np.ndarray:
        """A copy of positions [start, stop) of a slot: [layers, 2, kv_heads, stop - start, head_dim]."""
        return self.data[:, :, slot, :, start:stop].copy()

    def write(self, slot: int, start: int, span: np.ndarray) -> None:
        """Put a span read by `read` (or several, concatenated on axis 3) at `start` in a slot."""
        self.data[:, :, slot, :, start:start + span.shape[3]] = span
