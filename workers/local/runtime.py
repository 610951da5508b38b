"""An ONNX Runtime session for a built decoder, with a KV cache that lives in place.

The cache is one pre-allocated buffer per layer and kind ([1, kv_heads, capacity, head_dim]) bound both
as `past_key_values.*` and as `present.*`: GroupQueryAttention then writes the new keys and values into
it where they belong (its shared past/present buffer mode), so a decode step copies no cache at all.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workers.local.head import HEAD_FILE, ExactHead

DECODE_GRAPH = "model_decode.onnx"

log = logging.getLogger("frugal.local")


def choose_providers(preference: str = "auto") -> list[str]:
    """CUDA when asked for or (auto) when onnxruntime-gpu and a GPU are both present; else CPU."""
    import onnxruntime as ort  # noqa: PLC0415

    available = ort.get_available_providers()
    has_gpu = Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()
    if preference == "cuda" or (preference == "auto" and "CUDAExecutionProvider" in available and has_gpu):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass(frozen=True, slots=True)
class DecoderInfo:
    name: str
    quant: str
    n_layers: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    context_length: int
    d_model: int

    @classmethod
    def load(cls, model_dir: Path) -> DecoderInfo:
        config = json.loads((model_dir / "frugal_model.json").read_text())
        shape = config["shape"]
        return cls(config["name"], config["quant"], shape["n_layers"], shape["n_kv_heads"], shape["head_dim"],
                   shape["vocab"], min(shape["context_length"], config.get("max_positions", 8192)), shape["d_model"])


class CacheTensors(dict):  # type: ignore[type-arg]
    """A cache's OrtValues by (layer, "key" | "value"). A dict that can be weakly referenced: a session keeps
    its IO binding for these tensors exactly as long as they live (`DecoderSession._binding`)."""


class KVCache:
    """One sequence's keys and values, `length` tokens of `capacity` filled."""

    def __init__(self, info: DecoderInfo, capacity: int) -> None:
        import onnxruntime as ort  # noqa: PLC0415

        self.capacity = capacity
        self.length = 0
        shape = (1, info.n_kv_heads, capacity, info.head_dim)
        self.values = CacheTensors({(i, kind): ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=np.float32))
                                    for i in range(info.n_layers) for kind in ("key", "value")})

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(v.shape())) * 4 for v in self.values.values())


class DecoderSession:
    """Runs the decoder graph: `forward(ids, cache)` appends `ids` to the cache and returns logits.

    A quantized build has a second graph, `model_decode.onnx` (two-pass int8 activations, the same weights),
    which is faster for decode steps of one or two sequences; `run` takes it when asked (`graph="decode"`).
    """

    def __init__(self, model_dir: Path, *, threads: int | None = None, provider: str = "auto") -> None:
        import onnxruntime as ort  # noqa: PLC0415

        self.model_dir = Path(model_dir)
        self.info = DecoderInfo.load(self.model_dir)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        self.providers = choose_providers(provider)
        self.session = ort.InferenceSession(str(self.model_dir / "model.onnx"), options, providers=self.providers)
        decode = self.model_dir / DECODE_GRAPH
        self.decode_session = ort.InferenceSession(str(decode), options, providers=self.providers) \
            if decode.exists() else None
        self.head = ExactHead(self.model_dir) if (self.model_dir / HEAD_FILE).exists() else None
        #: (session, cache, thread) -> (weak reference to the cache, binding): binding the 2 x layers cache
        #: tensors costs ~0.5 ms a step (measured), so a cache's binding is made once, dropped with the cache.
        self._bindings: dict[tuple[int, int, int], tuple[weakref.ref[CacheTensors], Any]] = {}
        log.info("local model %s (%s) on %s, %d threads%s", self.info.name, self.info.quant,
                 self.session.get_providers()[0], options.intra_op_num_threads,
                 ", with a decode graph" if self.decode_session else "")

    def new_cache(self, capacity: int | None = None) -> KVCache:
        return KVCache(self.info, min(capacity or self.info.context_length, self.info.context_length))

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, kv: Mapping[tuple[int, str], Any],
            logits_to_keep: int = 1, graph: str = "main") -> tuple[np.ndarray, np.ndarray]:
        """One pass over a batch: `input_ids` [batch, seq], `attention_mask` [batch, past + seq] (row b has ones
        for its own past and new tokens, zeros after), `kv` the OrtValues of the cache ([batch, kv_heads,
        capacity, head_dim] per layer and kind), written in place. Returns logits [batch, kept, vocab] and the
        final hidden states [batch, kept, d_model]. `graph="decode"` runs the decode graph where there is one."""
        session = self.decode_session if graph == "decode" and self.decode_session is not None else self.session
        binding = self._binding(session, kv)
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input("logits_to_keep", np.array([logits_to_keep], dtype=np.int64))
        if self.providers[0] != "CPUExecutionProvider":
            binding.bind_output("logits")  # unallocated again: the shapes change from run to run
            binding.bind_output("hidden")
            session.run_with_iobinding(binding)
            outputs = binding.get_outputs()  # logits, hidden, then the (in-place) presents
            return outputs[0].numpy(), outputs[1].numpy()
        # On CPU the outputs are written straight into fresh numpy arrays: `get_outputs()` would wrap all
        # 2 + 2 x layers outputs, the in-place cache included, in new OrtValues (~0.1 ms a step, measured).
        batch, seq = input_ids.shape
        kept = seq if logits_to_keep <= 0 else min(logits_to_keep, seq)
        logits = np.empty((batch, kept, self.info.vocab), dtype=np.float32)
        hidden = np.empty((batch, kept, self.info.d_model), dtype=np.float32)
        for name, array in (("logits", logits), ("hidden", hidden)):
            binding.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
        session.run_with_iobinding(binding)
        return logits, hidden

    def _binding(self, session: Any, kv: Mapping[tuple[int, str], Any]) -> Any:
        """The IO binding of `session` with `kv` bound as past and present: made once per `CacheTensors` (and
        thread) and dropped when they are; made afresh each time for any other mapping."""
        key = (id(session), id(kv), threading.get_ident())
        entry = self._bindings.get(key)
        if entry is not None and entry[0]() is kv:
            return entry[1]
        binding = session.io_binding()
        binding.bind_output("logits")  # first: get_outputs() keeps binding order
        binding.bind_output("hidden")
        for (layer, kind), value in kv.items():
            binding.bind_ortvalue_input(f"past_key_values.{layer}.{kind}", value)
            binding.bind_ortvalue_output(f"present.{layer}.{kind}", value)
        if isinstance(kv, CacheTensors):
            bindings = self._bindings
            self._bindings[key] = (weakref.ref(kv, lambda _gone: bindings.pop(key, None)), binding)
        return binding

    def rescore(self, logits: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """`logits` [n, vocab] with each row's best candidates re-scored exactly (`workers.local.head`), in
        place; unchanged for models without an exact head (float builds)."""
        if self.head is not None:
            self.head.rescore_rows(logits, hidden)
        return logits

    def forward(self, ids: np.ndarray | list[int], cache: KVCache, logits_to_keep: int = 1,
                exact: bool = True) -> np.ndarray:
        """Logits [len(ids) or logits_to_keep, vocab] for `ids` following what `cache` holds; each position's
        best candidates re-scored exactly unless `exact` is False."""
        tokens = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        total = cache.length + tokens.shape[1]
        if total > cache.capacity:
            raise ValueError(f"sequence of {total} tokens exceeds the cache capacity {cache.capacity}")
        graph = "decode" if tokens.shape[1] == 1 else "main"  # as the engine runs a lone sequence
        logits, hidden = self.run(tokens, np.ones((1, total), dtype=np.int64), cache.values, logits_to_keep, graph)
        cache.length = total
        return self.rescore(logits[0], hidden[0]) if exact else logits[0]

    def describe(self) -> dict[str, Any]:
        return {"name": self.info.name, "quant": self.info.quant, "providers": self.session.get_providers()}
