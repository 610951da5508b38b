"""Plain-numpy reference forward pass of a llama-family decoder loaded from GGUF.

Written from first principles and the GGUF / llama.cpp conventions, to serve as ground truth in tests.
Everything is computed in float32 on dequantized weights:

* RMSNorm: ``x / sqrt(mean(x**2) + eps) * w``.
* Linear layers: GGUF dequantizes to ``(out_features, in_features)``, so ``y = x @ W.T``.
* RoPE: for llama/mistral the converter permuted the Q/K rows, so llama.cpp's "normal" mode rotates
  adjacent pairs ``(x[2i], x[2i+1])`` (``rope_interleaved=True``); qwen2 uses "neox" mode on
  unpermuted weights, pairs ``(x[i], x[i + d/2])`` (``rope_interleaved=False``).
  ``theta_i = base ** (-2i / head_dim)``, angle ``pos * theta_i``.
* Causal grouped-query attention, scale ``1/sqrt(head_dim)``; query head ``h`` reads KV head
  ``h // (n_heads // n_kv_heads)``.
* SwiGLU FFN ``down(silu(gate(x)) * up(x))``, pre-norm residual blocks, final norm, output projection
  (tied to ``token_embd.weight`` when the file has no ``output.weight``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

#: Architectures whose GGUF Q/K weights are permuted for llama.cpp's adjacent-pair ("normal") RoPE.
_INTERLEAVED_ARCHS = {"llama": True, "mistral": True, "qwen2": False}

#: One layer's cache entry: (keys after RoPE, values), each float32 [n_kv_heads, past_len, head_dim].
KVCache = list[tuple[np.ndarray, np.ndarray]]


@dataclass
class LayerWeights:
    """Float32 weights of one decoder block; matrices are (out_features, in_features)."""

    attn_norm: np.ndarray
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    ffn_norm: np.ndarray
    w_gate: np.ndarray
    w_up: np.ndarray
    w_down: np.ndarray
    bq: np.ndarray | None = None
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None


@dataclass
class LlamaWeights:
    """Hyper-parameters and float32 weights of a llama-family decoder."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    eps: float
    rope_base: float
    rope_interleaved: bool
    vocab: int
    token_embd: np.ndarray  # (vocab, d_model)
    output_norm: np.ndarray  # (d_model,)
    output: np.ndarray  # (vocab, d_model); the same array as token_embd when tied
    layers: list[LayerWeights]
    architecture: str = "llama"

    def with_rope_interleaved(self, interleaved: bool) -> LlamaWeights:
        """A shallow copy sharing the arrays, with the RoPE pairing convention replaced."""
        return dataclasses.replace(self, rope_interleaved=interleaved)


def _field(reader: gguf.GGUFReader, key: str, default: object = None) -> object:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise KeyError(f"GGUF metadata {key!r} missing")
        return default
    return field.contents()


def _dequant(tensor: gguf.gguf_reader.ReaderTensor) -> np.ndarray:
    array = gguf.dequantize(tensor.data, tensor.tensor_type)
    return np.ascontiguousarray(array, dtype=np.float32)


def load_gguf_weights(path: str | Path, n_layers: int | None = None) -> LlamaWeights:
    """Dequantize a llama/mistral/qwen2 GGUF to float32.

    ``n_layers`` keeps only the first k blocks (for fast tests); the output norm and output
    projection are still applied on top of them.
    """
    reader = gguf.GGUFReader(str(path))
    arch = str(_field(reader, "general.architecture"))
    if arch not in _INTERLEAVED_ARCHS:
        raise NotImplementedError(f"architecture {arch!r} not supported")
    total_layers = int(_field(reader, f"{arch}.block_count"))
    d_model = int(_field(reader, f"{arch}.embedding_length"))
    n_heads = int(_field(reader, f"{arch}.attention.head_count"))
    n_kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", n_heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", d_model // n_heads))
    rope_dims = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise NotImplementedError(f"partial rotary ({rope_dims} of {head_dim} dims) not supported")
    if n_heads % n_kv_heads:
        raise ValueError(f"head_count {n_heads} not a multiple of head_count_kv {n_kv_heads}")

    tensors = {t.name: t for t in reader.tensors}
    keep = total_layers if n_layers is None else n_layers
    if not 0 <= keep <= total_layers:
        raise ValueError(f"n_layers must be in [0, {total_layers}], got {n_layers}")

    def get(name: str) -> np.ndarray:
        return _dequant(tensors[name])

    def get_opt(name: str) -> np.ndarray | None:
        return _dequant(tensors[name]) if name in tensors else None

    layers = []
    for i in range(keep):
        p = f"blk.{i}."
        layers.append(
            LayerWeights(
                attn_norm=get(p + "attn_norm.weight"),
                wq=get(p + "attn_q.weight"),
                wk=get(p + "attn_k.weight"),
                wv=get(p + "attn_v.weight"),
                wo=get(p + "attn_output.weight"),
                ffn_norm=get(p + "ffn_norm.weight"),
                w_gate=get(p + "ffn_gate.weight"),
                w_up=get(p + "ffn_up.weight"),
                w_down=get(p + "ffn_down.weight"),
                bq=get_opt(p + "attn_q.bias"),
                bk=get_opt(p + "attn_k.bias"),
                bv=get_opt(p + "attn_v.bias"),
            )
        )
    token_embd = get("token_embd.weight")
    output = get_opt("output.weight")
    weights = LlamaWeights(
        n_layers=keep,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn=int(_field(reader, f"{arch}.feed_forward_length")),
        eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_base=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_interleaved=_INTERLEAVED_ARCHS[arch],
        vocab=int(token_embd.shape[0]),
        token_embd=token_embd,
        output_norm=get("output_norm.weight"),
        output=token_embd if output is None else output,
        layers=layers,
        architecture=arch,
    )
    _check_shapes(weights)
    return weights


def _check_shapes(w: LlamaWeights) -> None:
    q_out, kv_out = w.n_heads * w.head_dim, w.n_kv_heads * w.head_dim
    assert w.token_embd.shape == (w.vocab, w.d_model), w.token_embd.shape
    assert w.output.shape == (w.vocab, w.d_model), w.output.shape
    for layer in w.layers:
        assert layer.wq.shape == (q_out, w.d_model), layer.wq.shape
        assert layer.wk.shape == (kv_out, w.d_model), layer.wk.shape
        assert layer.wv.shape == (kv_out, w.d_model), layer.wv.shape
        assert layer.wo.shape == (w.d_model, q_out), layer.wo.shape
        assert layer.w_gate.shape == (w.ffn, w.d_model), layer.w_gate.shape
        assert layer.w_up.shape == (w.ffn, w.d_model), layer.w_up.shape
        assert layer.w_down.shape == (w.d_model, w.ffn), layer.w_down.shape


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x**2) + eps) * weight`` over the last axis, in float32."""
    mean_sq = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(mean_sq + np.float32(eps)) * weight).astype(np.float32)


def rope_cos_sin(positions: np.ndarray, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of ``pos * base**(-2i/head_dim)``, float32 [len(positions), head_dim // 2]."""
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool) -> np.ndarray:
    """Rotate x [seq, heads, head_dim] by per-position angles (cos/sin [seq, head_dim // 2]).

    ``interleaved``: pairs (x[2i], x[2i+1]) (llama.cpp "normal" mode); else (x[i], x[i + d/2]) ("neox").
    """
    half = x.shape[-1] // 2
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    ra, rb = a * c - b * s, a * s + b * c
    out = np.empty_like(x)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., :half], out[..., half:] = ra, rb
    return out


def _linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    y = x @ w.T
    return y if b is None else y + b


def _silu(x: np.ndarray) -> np.ndarray:
    # x * sigmoid(x), with sigmoid(x) = (1 + tanh(x / 2)) / 2 to avoid exp overflow
    return x * (np.float32(0.5) * (np.float32(1.0) + np.tanh(x * np.float32(0.5))))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def forward(
    weights: LlamaWeights,
    token_ids: np.ndarray | Sequence[int],
    past: KVCache | None = None,
    start_pos: int = 0,
) -> tuple[np.ndarray, KVCache]:
    """Logits float32 [seq, vocab] for ``token_ids`` placed at positions ``start_pos..``.

    ``past`` is the cache returned by a previous call (covering positions ``0..start_pos-1``);
    the returned cache covers ``0..start_pos+seq-1``. The input cache is not modified.
    """
    w = weights
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    seq = ids.shape[0]
    if past is not None and len(past) != w.n_layers:
        raise ValueError(f"past has {len(past)} layers, model has {w.n_layers}")
    past_len = 0 if past is None or w.n_layers == 0 else past[0][0].shape[1]
    if past_len != start_pos:
        raise ValueError(f"start_pos {start_pos} does not match the cache length {past_len}")

    positions = np.arange(start_pos, start_pos + seq)
    cos, sin = rope_cos_sin(positions, w.head_dim, w.rope_base)
    total = start_pos + seq
    # causal mask: query at absolute position p sees keys at positions <= p
    allowed = np.arange(total)[None, :] <= positions[:, None]  # [seq, total]
    group = w.n_heads // w.n_kv_heads
    scale = np.float32(1.0 / np.sqrt(w.head_dim))

    x = w.token_embd[ids].astype(np.float32)  # [seq, d_model]
    new_cache: KVCache = []
    for li, layer in enumerate(w.layers):
        h = rms_norm(x, layer.attn_norm, w.eps)
        q = _linear(h, layer.wq, layer.bq).reshape(seq, w.n_heads, w.head_dim)
        k = _linear(h, layer.wk, layer.bk).reshape(seq, w.n_kv_heads, w.head_dim)
        v = _linear(h, layer.wv, layer.bv).reshape(seq, w.n_kv_heads, w.head_dim)
        q = apply_rope(q, cos, sin, w.rope_interleaved)
        k = apply_rope(k, cos, sin, w.rope_interleaved)
        k = k.transpose(1, 0, 2)  # [kv_heads, seq, head_dim]
        v = v.transpose(1, 0, 2)
        if past is not None:
            k = np.concatenate([past[li][0], k], axis=1)
            v = np.concatenate([past[li][1], v], axis=1)
        new_cache.append((k, v))

        kv_index = np.arange(w.n_heads) // group  # query head h -> kv head h // group
        k_full, v_full = k[kv_index], v[kv_index]  # [n_heads, total, head_dim]
        scores = np.matmul(q.transpose(1, 0, 2), k_full.transpose(0, 2, 1)) * scale  # [n_heads, seq, total]
        scores = np.where(allowed[None], scores, np.float32(-np.inf))
        attn = np.matmul(_softmax(scores), v_full)  # [n_heads, seq, head_dim]
        attn = attn.transpose(1, 0, 2).reshape(seq, w.n_heads * w.head_dim)
        x = x + _linear(attn, layer.wo)

        h = rms_norm(x, layer.ffn_norm, w.eps)
        x = x + _linear(_silu(_linear(h, layer.w_gate)) * _linear(h, layer.w_up), layer.w_down)

    logits = _linear(rms_norm(x, w.output_norm, w.eps), w.output)
    return logits.astype(np.float32), new_cache


def greedy(
    weights: LlamaWeights,
    token_ids: np.ndarray | Sequence[int],
    max_new_tokens: int,
    stop_ids: Iterable[int] = (),
) -> list[int]:
    """Greedy (argmax) continuation using the KV cache; the stop token, if hit, is included."""
    stops = set(stop_ids)
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    out: list[int] = []
    if max_new_tokens <= 0:
        return out
    logits, cache = forward(weights, ids)
    pos = ids.shape[0]
    while True:
        nxt = int(np.argmax(logits[-1]))
        out.append(nxt)
        if nxt in stops or len(out) >= max_new_tokens:
            return out
        logits, cache = forward(weights, np.array([nxt]), cache, pos)
        pos += 1
