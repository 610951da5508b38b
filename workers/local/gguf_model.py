"""Reading a llama-family GGUF: hyper-parameters, and weights dequantized to float32 by `gguf`.

Supported layouts: llama (and mistral, which GGUF stores as llama) and qwen2. They differ in two ways
that matter here: qwen2 has biases on the Q/K/V projections, and llama.cpp's converter permutes llama's
Q/K rows so that RoPE rotates adjacent pairs ("normal" mode, interleaved), while qwen2 keeps the
rotate-half pairing ("neox" mode).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: architecture -> (RoPE on adjacent pairs?, Q/K/V biases?)
SUPPORTED: dict[str, tuple[bool, bool]] = {"llama": (True, False), "mistral": (True, False), "qwen2": (False, True)}


class UnsupportedModel(ValueError):
    """The GGUF holds something this builder cannot turn into a graph."""


@dataclass(frozen=True, slots=True)
class LlamaShape:
    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    context_length: int
    rms_eps: float
    rope_base: float
    rope_interleaved: bool
    qkv_bias: bool
    tied_output: bool

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class GGUFModel:
    """A GGUF file opened for building: its shape, its metadata and its tensors."""

    def __init__(self, path: Path) -> None:
        import gguf  # noqa: PLC0415  (a build-time dependency; keep imports of the engine light)

        self.path = Path(path)
        self.reader = gguf.GGUFReader(str(self.path))
        self._gguf = gguf
        arch = str(_field(self.reader, "general.architecture", "unknown"))
        if arch not in SUPPORTED:
            raise UnsupportedModel(f"unsupported architecture {arch!r} in {self.path.name}: this builder handles "
                                   f"the llama family ({', '.join(sorted(SUPPORTED))})")
        self._tensors = {t.name: t for t in self.reader.tensors}
        interleaved, qkv_bias = SUPPORTED[arch]
        n_heads = int(_field(self.reader, f"{arch}.attention.head_count"))
        d_model = int(_field(self.reader, f"{arch}.embedding_length"))
        head_dim = int(_field(self.reader, f"{arch}.rope.dimension_count", d_model // n_heads))
        tokens = _field(self.reader, "tokenizer.ggml.tokens", [])
        self.shape = LlamaShape(
            architecture=arch,
            n_layers=int(_field(self.reader, f"{arch}.block_count")),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=int(_field(self.reader, f"{arch}.attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            ffn=int(_field(self.reader, f"{arch}.feed_forward_length")),
            vocab=int(_field(self.reader, f"{arch}.vocab_size", len(tokens))),
            context_length=int(_field(self.reader, f"{arch}.context_length", 4096)),
            rms_eps=float(_field(self.reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=float(_field(self.reader, f"{arch}.rope.freq_base", 10000.0)),
            rope_interleaved=interleaved,
            qkv_bias=qkv_bias and "blk.0.attn_q.bias" in self._tensors,
            tied_output="output.weight" not in self._tensors,
        )
        if head_dim * n_heads != d_model:
            raise UnsupportedModel(f"{self.path.name}: head_dim {head_dim} x heads {n_heads} != d_model {d_model}")

    def metadata(self, key: str, default: Any = None) -> Any:
        return _field(self.reader, key, default)

    def tensor(self, name: str) -> np.ndarray:
        """A tensor dequantized to float32, shaped (out_features, in_features) for projections."""
        if name not in self._tensors:
            raise UnsupportedModel(f"{self.path.name}: tensor {name} is missing")
        tensor = self._tensors[name]
        return np.ascontiguousarray(self._gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)

    def raw(self, name: str) -> tuple[np.ndarray, str]:
        """A tensor's stored rows (uint8 blocks for quantized types) and its GGUF type name."""
        if name not in self._tensors:
            raise UnsupportedModel(f"{self.path.name}: tensor {name} is missing")
        tensor = self._tensors[name]
        return np.asarray(tensor.data), tensor.tensor_type.name

    def matrix_names(self) -> list[str]:
        """The two-dimensional tensors (projections, embeddings, output layer)."""
        return [name for name, tensor in self._tensors.items() if len(tensor.shape) == 2]

    def has(self, name: str) -> bool:
        return name in self._tensors

    def tensor_type(self, name: str) -> str:
        return self._tensors[name].tensor_type.name
