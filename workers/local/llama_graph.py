"""The llama-family decoder as an ONNX graph, written with `onnx` from GGUF tensors (no torch).

One graph serves prefill and decode. Inputs: `input_ids` [batch, seq], `attention_mask`
[batch, past + seq], `logits_to_keep` [1] (0 = logits for every position, k = the last k), and per layer
`past_key_values.{i}.key|value` [batch, kv_heads, past, head_dim]; outputs `logits` and
`present.{i}.key|value`. The fast paths of onnxruntime's contrib operators are used where they exist on
CPU and CUDA alike: `GroupQueryAttention` (KV cache, GQA and rotary embeddings in one kernel, fed a packed
QKV projection), `SimplifiedLayerNormalization` (RMSNorm) and, for quantized weights, `MatMulNBits`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from workers.local.gguf_model import GGUFModel, LlamaShape
from workers.local.quantize import (
    EXACT_GGUF_TYPES,
    GGUF_BLOCK,
    IntBlocks,
    Quantized,
    gguf_blocks,
    pack,
    quantize_asymmetric4,
    split_int8,
    symmetric_blocks,
    with_block,
)
from workers.local.runtime import DECODE_GRAPH

Quant = Literal["fp32", "fp16", "int8", "int4"]
QUANTS: tuple[str, ...] = ("int4", "int8", "fp16", "fp32")
Compute = Literal["fp32", "int8"]
#: MatMulNBits accuracy levels: 1 computes with float32 activations (exact with exact weights), 4 quantizes
#: the activations to int8 for int8 dot products (the fastest CPU path, but it perturbs every layer).
ACCURACY_LEVEL = 4
COMPUTE_LEVELS: dict[str, int] = {"fp32": 1, "int8": 4}
#: Activation precision by default: float32 everywhere (weight-only quantization). `--compute int8` is the
#: fast profile that quantizes activations too, as llama.cpp does.
DEFAULT_COMPUTE: dict[str, str] = {"int4": "fp32", "int8": "fp32", "fp16": "fp32", "fp32": "fp32"}
OPSET = 21


class _Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, quant: Quant, accuracy_level: int = ACCURACY_LEVEL, head_accuracy_level: int = ACCURACY_LEVEL,
                 two_pass: bool = False, dynamic_int8: bool = False):
        self.quant = quant
        self.accuracy_level = accuracy_level
        self.head_accuracy_level = head_accuracy_level
        #: Quantized layer projections take their activations in two int8 passes (`_two_pass`).
        self.two_pass = two_pass
        #: Every projection as `DynamicQuantizeMatMul` (`dynamic_int8_matmul`), whatever `quant` says.
        self.dynamic_int8 = dynamic_int8
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._shared: dict[str, str] = {}
        self._count = 0

    def block_indicator(self, k: int, block: int) -> str:
        """[k, k / block] with ones where row k belongs to block b: x @ it = per-block sums (shared)."""
        name = f"block_indicator_{k}_{block}"
        if name not in self._shared:
            indicator = np.zeros((k, k // block), dtype=np.float32)
            indicator[np.arange(k), np.arange(k) // block] = 1.0
            self._shared[name] = self.const(name, indicator)
        return self._shared[name]

    def level_for(self, projection: str) -> int:
        return self.head_accuracy_level if projection == "lm_head" else self.accuracy_level

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs: object) -> list[str]:
        outputs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=self.name(op_type), domain=domain,
                                           **attrs))
        return outputs

    def op1(self, op_type: str, inputs: list[str], domain: str = "", **attrs: object) -> str:
        return self.op(op_type, inputs, 1, domain, **attrs)[0]

    def projection(self, x: str, model: GGUFModel, tensors: list[str], name: str,
                   bias: np.ndarray | None = None) -> str:
        """x @ W^T for W = the named GGUF tensors stacked along N (e.g. Q, K and V as one packed QKV).

        Quantized modes keep GGUF blocks exactly where they map onto MatMulNBits (`EXACT_GGUF_TYPES`: Q4_0,
        Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K): the graph computes with the source's own integers and scales,
        4-bit values on 4-bit blocks and wider ones on the 8-bit path, in either mode (an 8-bit container would
        add nothing but bytes to 4-bit values; 4 bits would lose the others). Other types are dequantized and
        quantized again: 8-bit symmetric blocks (int8) or 4-bit blocks with zero points (int4)."""
        if self.dynamic_int8:
            return self.dynamic_int8_matmul(x, np.concatenate([model.tensor(t) for t in tensors], axis=0), name,
                                            bias)
        if self.quant in ("int8", "int4"):
            parts = [model.raw(t) for t in tensors]
            if {type_name for _, type_name in parts} <= EXACT_GGUF_TYPES:
                return self._blocks(x, _stack([gguf_blocks(raw, type_name) for raw, type_name in parts]), name,
                                    bias)
        weight = np.concatenate([model.tensor(t) for t in tensors], axis=0)
        if self.quant == "int8" and weight.shape[1] % GGUF_BLOCK == 0:
            return self._blocks(x, symmetric_blocks(weight, 8), name, bias)
        if self.quant == "int4":
            return self._matmul_nbits(x, quantize_asymmetric4(weight), name, bias)
        return self._float(x, weight, name, bias)

    def _blocks(self, x: str, blocks: IntBlocks, name: str, bias: np.ndarray | None) -> str:
        """x @ W^T for integer blocks: 4-bit values on 4-bit blocks; 8-bit values on 8-bit blocks with int8
        activations, or split into two 4-bit halves (`split_int8`) to keep float activations fast."""
        offsets = []
        if blocks.offset is not None:
            # Per-block offsets (Q4_1's and the K-quants' minimums): the sum of x over each block (one matmul
            # with a 0/1 block indicator), times the block's constant.
            sums = self.op1("MatMul", [x, self.block_indicator(blocks.k, blocks.block)])
            offsets.append(self.op1("MatMul", [sums, self.const(f"{name}.offsets_t",
                                                                np.ascontiguousarray(blocks.offset.T))]))
        if blocks.fits_4_bits:
            return self._matmul_nbits(x, pack(blocks, 4), name, bias, offsets)
        if self.level_for(name) == COMPUTE_LEVELS["int8"]:
            return self._matmul_nbits(x, pack(blocks, 8), name, bias, offsets)
        return self._matmul_nbits(self.op1("Concat", [x, x], axis=-1), split_int8(blocks), name, bias, offsets)

    def _matmul_nbits(self, x: str, q: Quantized, name: str, bias: np.ndarray | None,
                      addends: list[str] | None = None) -> str:
        """x @ W^T (+ bias) + the `addends`, summed in one operator."""
        if self.two_pass and name != "lm_head":
            return self._two_pass(x, q, name, bias, addends or [])
        y = self._nbits_node(x, q, name, bias, self.level_for(name))
        return self.op1("Sum", [y, *addends]) if addends else y

    def _two_pass(self, x: str, q: Quantized, name: str, bias: np.ndarray | None, addends: list[str]) -> str:
        """x @ W^T with int8 dot products that lose almost nothing: x = hi + lo, where hi is x on the int8 grid
        onnxruntime itself uses (per weight block, scale = absmax / 127), so its int8 quantization of hi is
        lossless, and lo = x - hi is small; both run as one MatMulNBits call of twice the rows (accuracy
        level 4), whose two halves are summed. The rounding left is that of lo's own quantization, ~1/127²
        of each block's range. A decode step of one to four sequences measured 1.2-1.5x faster than with float
        activations on one machine, only 0.95-1.1x on an AVX-512 one (docs/local.md); prefill and larger batches
        are faster with float activations."""
        if "two_pass_inverse_127" not in self._shared:
            self._shared["two_pass_inverse_127"] = self.const("two_pass_inverse_127", np.array(1 / 127, np.float32))
            self._shared["two_pass_axis1"] = self.const("two_pass_axis1", np.array([1], np.int64))
            self._shared["two_pass_minus_one"] = self.const("two_pass_minus_one", np.array([-1], np.int64))
        # Work on x as rows of one weight block each, [batch * seq * K / block, block], so that the quantization is
        # per row (per-axis): onnxruntime's per-axis (De)QuantizeLinear is 2-5x faster than its blocked form (measured).
        # A block of zeros gets scale 0: whatever QuantizeLinear makes of 0/0, DequantizeLinear multiplies it by
        # 0, so hi and lo are 0 there, as they should be (and onnxruntime's own quantization of it is 0 too).
        rows = f"two_pass_blocks_{q.block_size}"
        if rows not in self._shared:
            self._shared[rows] = self.const(rows, np.array([-1, q.block_size], np.int64))
        blocks = self.op1("Reshape", [x, self._shared[rows]])
        absmax = self.op1("ReduceMax", [self.op1("Abs", [blocks]), "two_pass_axis1"], keepdims=0)
        scale = self.op1("Mul", [absmax, "two_pass_inverse_127"])
        grid = self.op1("QuantizeLinear", [blocks, scale], axis=0, output_dtype=TensorProto.INT8)
        hi = self.op1("DequantizeLinear", [grid, scale], axis=0)
        # [hi blocks; lo blocks] back to [2 * batch, seq, K]: hi rows first, as the Split below expects.
        k = q.k
        if f"two_pass_shape_{k}" not in self._shared:  # [-1, seq, K], from the first input of this width
            self._shared[f"two_pass_shape_{k}"] = self.op1(
                "Concat", ["two_pass_minus_one", self.op1("Shape", [x], start=1)], axis=0)
        both = self.op1("Reshape", [self.op1("Concat", [hi, self.op1("Sub", [blocks, hi])], axis=0),
                                    self._shared[f"two_pass_shape_{k}"]])
        halves = self.op("Split", [self._nbits_node(both, q, name, None, COMPUTE_LEVELS["int8"])], n_out=2, axis=0,
                         num_outputs=2)
        if bias is not None:
            addends = [*addends, self.const(f"{name}.bias", bias.astype(np.float32))]
        return self.op1("Sum", [*halves, *addends])

    def _nbits_node(self, x: str, q: Quantized, name: str, bias: np.ndarray | None, level: int) -> str:
        inputs = [x, self.const(f"{name}.qweight", q.packed), self.const(f"{name}.scales", q.scales),
                  self.const(f"{name}.zero_points", q.zero_points) if q.zero_points is not None else ""]
        if bias is not None:
            inputs += ["", self.const(f"{name}.bias", bias.astype(np.float32))]  # g_idx unused
        while inputs[-1] == "":
            inputs.pop()
        return self.op1("MatMulNBits", inputs, domain="com.microsoft", K=q.k, N=q.n, bits=q.bits,
                        block_size=q.block_size, accuracy_level=level)

    def dynamic_int8_matmul(self, x: str, weight: np.ndarray, name: str, bias: np.ndarray | None = None) -> str:
        """x @ weight^T (+ bias) as `DynamicQuantizeMatMul`: the weight in int8, symmetric per output row
        (scale = the row's absmax / 127), the activations quantized to uint8 per tensor when it runs. The
        fastest CPU matmul for many rows (~3x MatMulNBits with int8 activations at 512 rows, measured), and
        the coarsest: one activation scale for the whole tensor. For the compression scorer's early exit, which
        only ranks tokens; the serving graphs never use it."""
        scale = np.abs(weight).max(axis=1) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(weight / scale[:, None]), -127, 127).astype(np.int8)
        inputs = [x, self.const(f"{name}.weight_t_int8", np.ascontiguousarray(q.T)),
                  self.const(f"{name}.weight_scale", scale.astype(np.float32)),
                  self.const(f"{name}.weight_zero_point", np.zeros(len(scale), np.int8))]
        if bias is not None:
            inputs.append(self.const(f"{name}.bias", bias.astype(np.float32)))
        return self.op1("DynamicQuantizeMatMul", inputs, domain="com.microsoft")

    def _float(self, x: str, weight: np.ndarray, name: str, bias: np.ndarray | None) -> str:
        """x @ weight^T (+ bias) with float weights: float16 storage (fp16) or float32."""
        if self.quant == "fp16":
            stored = self.const(f"{name}.weight_t", weight.T.astype(np.float16))
            w = self.op1("Cast", [stored], to=TensorProto.FLOAT)  # folded to fp32 when the session loads
        else:
            w = self.const(f"{name}.weight_t", weight.T.astype(np.float32))
        y = self.op1("MatMul", [x, w])
        if bias is not None:
            y = self.op1("Add", [y, self.const(f"{name}.bias", bias.astype(np.float32))])
        return y


def _stack(parts: list[IntBlocks]) -> IntBlocks:
    """Blocks of several tensors with the same K, stacked along N (one packed projection), in the smallest
    block any of them uses (Q4_K's Q and K with Q6_K's V: blocks of 16)."""
    block = min(p.block for p in parts)
    parts = [with_block(p, block) for p in parts]
    offset = None
    if any(p.offset is not None for p in parts):
        offset = np.concatenate([p.offset if p.offset is not None else np.zeros_like(p.scale) for p in parts])
    return IntBlocks(np.concatenate([p.q for p in parts]), np.concatenate([p.scale for p in parts]), offset)


def rotary_cache(shape: LlamaShape, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of position x inverse frequency, [max_positions, head_dim / 2]."""
    inv_freq = shape.rope_base ** (-np.arange(0, shape.head_dim, 2, dtype=np.float64) / shape.head_dim)
    angles = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def build_llama_graph(model: GGUFModel, quant: Quant, out_path: Path,
                      progress: Callable[[str], None] | None = None, max_positions: int | None = None,
                      accuracy_level: int = ACCURACY_LEVEL, head_accuracy_level: int = ACCURACY_LEVEL,
                      decode_graph: bool = False) -> Path:
    """Write `out_path` (model.onnx with its weights in model.onnx.data beside it) and, with `decode_graph`,
    `model_decode.onnx` beside it: the same model with two-pass int8 activations (`_Graph._two_pass`), for
    decode steps of few sequences, reading its weights from the same data file."""
    say = progress or (lambda _msg: None)
    proto = _llama_proto(model, _Graph(quant, accuracy_level, head_accuracy_level), say, max_positions)
    say("writing")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data = out_path.with_name(out_path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save_model(proto, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    if decode_graph and quant in ("int8", "int4"):
        say("decode graph")
        decode = _llama_proto(model, _Graph(quant, accuracy_level, head_accuracy_level, two_pass=True),
                              lambda _msg: None, max_positions)
        stored = {t.name: t for t in onnx.load(str(out_path), load_external_data=False).graph.initializer}
        for index, tensor in enumerate(decode.graph.initializer):  # the same weights: point at the same bytes
            if tensor.name in stored and stored[tensor.name].data_location == TensorProto.EXTERNAL:
                decode.graph.initializer[index].CopyFrom(stored[tensor.name])
        onnx.save_model(decode, str(out_path.with_name(DECODE_GRAPH)))
    return out_path


def build_hidden_graph(model: GGUFModel, quant: Quant, out_path: Path, *, layers: int,
                       accuracy_level: int = ACCURACY_LEVEL, surprisal_rows: int | None = None,
                       dynamic_int8: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Write an early-exit graph: the first `layers` layers, the final norm, and no output layer; it returns
    the final hidden state of every position and, with `surprisal_rows`, each token's surprisal given the
    tokens before it, normalized over that many rows of the output layer (`_surprisal`;
    `workers.local.surprisal` scores prompts with it). `dynamic_int8`: the projections and those rows as
    `_Graph.dynamic_int8_matmul` (the exact target logit stays float)."""
    graph = _Graph(quant, accuracy_level, accuracy_level, dynamic_int8=dynamic_int8)
    proto = _llama_proto(model, graph, progress or (lambda _msg: None),
                         None, layers=layers, head=False, surprisal_rows=surprisal_rows)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=out_path.name + ".data", size_threshold=1024)
    return out_path


def _llama_proto(model: GGUFModel, g: _Graph, say: Callable[[str], None],
                 max_positions: int | None, layers: int | None = None, head: bool = True,
                 surprisal_rows: int | None = None) -> onnx.ModelProto:
    """The decoder graph. `layers` keeps only the first layers (an early-exit model: the final norm follows
    the last kept layer); `head=False` leaves out the output layer, so the graph returns the final hidden
    state of every position (`hidden`) and takes no `logits_to_keep`; `surprisal_rows` (with `head=False`)
    adds the output `surprisal` (`_surprisal`)."""
    shape = model.shape
    n_layers = shape.n_layers if layers is None else max(1, min(layers, shape.n_layers))
    positions = max_positions or min(shape.context_length, 8192)
    kv_dims = ["batch", shape.n_kv_heads, "past", shape.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
    ]
    if head:
        inputs.append(helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]))
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "kept", shape.vocab]),
                   helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "kept", shape.d_model])]
    else:
        outputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", shape.d_model])]
        if surprisal_rows:
            outputs.append(helper.make_tensor_value_info("surprisal", TensorProto.FLOAT, ["batch", "following"]))
    for i in range(n_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv_dims))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", TensorProto.FLOAT, ["batch", shape.n_kv_heads, "total", shape.head_dim]))

    # Sequence bookkeeping for GroupQueryAttention: per-row index of the last real token, and total length.
    one = g.const("one_i64", np.array([1], dtype=np.int64))
    mask_sum = g.op1("ReduceSum", ["attention_mask", one], keepdims=0)
    seqlens_k = g.op1("Cast", [g.op1("Sub", [mask_sum, one])], to=TensorProto.INT32)
    total = g.op1("Cast", [g.op1("Gather", [g.op1("Shape", ["attention_mask"]), g.const("axis1", np.array(1))],
                                 axis=0)], to=TensorProto.INT32)
    cos, sin = rotary_cache(shape, positions)
    cos_name, sin_name = g.const("cos_cache", cos), g.const("sin_cache", sin)

    say("embeddings")
    embedding = model.tensor("token_embd.weight")  # [vocab, d_model]
    embed_tokens = g.const("embed_tokens", embedding)
    x = g.op1("Gather", [embed_tokens, "input_ids"], axis=0)
    scale = 1.0 / float(np.sqrt(shape.head_dim))

    def norm_with_residual(delta: str | None, residual: str, weight_name: str, tensor: str) -> tuple[str, str]:
        """RMSNorm of residual + delta, and that sum (the new residual): one fused operator."""
        gamma = g.const(weight_name, model.tensor(tensor))
        if delta is None:
            return g.op1("SimplifiedLayerNormalization", [residual, gamma], axis=-1, epsilon=shape.rms_eps,
                         stash_type=1), residual
        normed, total = g.name("normed"), g.name("residual")
        g.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [delta, residual, gamma],
                                        [normed, "", "", total], name=g.name("SkipNorm"), domain="com.microsoft",
                                        epsilon=shape.rms_eps))
        return normed, total

    delta: str | None = None
    for i in range(n_layers):
        say(f"layer {i + 1}/{n_layers}")
        p = f"blk.{i}"
        h, x = norm_with_residual(delta, x, f"{p}.attn_norm", f"{p}.attn_norm.weight")
        qkv_bias = None
        if shape.qkv_bias:
            qkv_bias = np.concatenate([model.tensor(f"{p}.attn_{n}.bias") for n in ("q", "k", "v")])
        qkv = g.projection(h, model, [f"{p}.attn_{n}.weight" for n in ("q", "k", "v")], f"{p}.attn_qkv", qkv_bias)
        attn = g.name("attn")
        g.nodes.append(helper.make_node(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total, cos_name,
             sin_name],
            [attn, f"present.{i}.key", f"present.{i}.value"], name=g.name("GQA"), domain="com.microsoft",
            num_heads=shape.n_heads, kv_num_heads=shape.n_kv_heads, scale=scale, do_rotary=1,
            rotary_interleaved=1 if shape.rope_interleaved else 0))
        attn_out = g.projection(attn, model, [f"{p}.attn_output.weight"], f"{p}.attn_output")
        h, x = norm_with_residual(attn_out, x, f"{p}.ffn_norm", f"{p}.ffn_norm.weight")
        gu = g.projection(h, model, [f"{p}.ffn_gate.weight", f"{p}.ffn_up.weight"], f"{p}.ffn_gate_up")
        gate, up = g.op("Split", [gu, g.const(f"{p}.split", np.array([shape.ffn, shape.ffn], dtype=np.int64))],
                        n_out=2, axis=-1)
        act = g.op1("Mul", [g.op1("Mul", [gate, g.op1("Sigmoid", [gate])]), up])
        delta = g.projection(act, model, [f"{p}.ffn_down.weight"], f"{p}.ffn_down")

    say("output")
    x, _ = norm_with_residual(delta, x, "output_norm", "output_norm.weight")
    if not head:
        g.nodes.append(helper.make_node("Identity", [x], ["hidden"], name="hidden_out"))
        if surprisal_rows:
            weight = embedding if shape.tied_output else model.tensor("output.weight")
            output = embed_tokens if shape.tied_output else g.const("output_weight", weight)
            _surprisal(g, x, output, weight[:surprisal_rows], "surprisal")
        return _model_proto(g, shape, inputs, outputs)
    start = g.op1("Neg", ["logits_to_keep"])
    kept = g.op1("Slice", [x, start, g.const("slice_end", np.array([np.iinfo(np.int64).max], dtype=np.int64)),
                           one])
    output_name = "token_embd.weight" if shape.tied_output else "output.weight"
    logits = g.projection(kept, model, [output_name], "lm_head")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits_out"))
    # The final hidden state, for exact re-scoring of the top candidates (see workers/local/head.py).
    g.nodes.append(helper.make_node("Identity", [kept], ["hidden"], name="hidden_out"))
    return _model_proto(g, shape, inputs, outputs)


def _surprisal(g: _Graph, x: str, output: str, head_rows: np.ndarray, name: str) -> None:
    """`name` [batch, seq - 1]: -log p(token i + 1 | tokens up to i) from the final hidden states `x` and the
    output layer `output` [vocab, d_model]: the exact logit of the token that follows, against the
    log-sum-exp over `head_rows` (the output layer's first rows, the most frequent tokens: BPE ids follow
    merge order) and that token when it is not among them. With every row it is the exact log-softmax
    (tested); the whole 49k-row product would cost more than the early exit's layers."""

    def ints(label: str, *values: int) -> str:
        return g.const(f"{name}_{label}", np.array(values, np.int64))

    last, seq = ints("last_axis", -1), ints("seq_axis", 1)
    before = g.op1("Slice", [x, ints("zero", 0), ints("minus_one", -1), seq])  # positions 0 .. n-2
    following = g.op1("Slice", ["input_ids", ints("one", 1), ints("end", 2**62), seq])  # tokens 1 .. n-1
    target = g.op1("ReduceSum", [g.op1("Mul", [before, g.op1("Gather", [output, following], axis=0)]), last],
                   keepdims=1)  # [batch, n-1, 1]
    if g.dynamic_int8:
        logits = g.dynamic_int8_matmul(before, head_rows, f"{name}_head")
    else:
        logits = g.op1("MatMul", [before, g.const(f"{name}_head_t", np.ascontiguousarray(head_rows.T))])
    outside = g.op1("Unsqueeze", [g.op1("GreaterOrEqual", [following, ints("rows", head_rows.shape[0])]), last])
    extra = g.op1("Where", [outside, target, g.const(f"{name}_minus_inf", np.array(-np.inf, np.float32))])
    total = g.op1("ReduceLogSumExp", [g.op1("Concat", [logits, extra], axis=-1), last], keepdims=0)
    if not g.dynamic_int8:
        g.nodes.append(helper.make_node("Sub", [total, g.op1("Squeeze", [target, last])], [name], name=g.name("Sub")))
        return
    # With int8 head rows the normalizer holds an approximation of the exact target logit, which can exceed
    # it by the rounding: a surprisal is never below 0.
    surprisal = g.op1("Sub", [total, g.op1("Squeeze", [target, last])])
    g.nodes.append(helper.make_node("Relu", [surprisal], [name], name=g.name("Relu")))


def _model_proto(g: _Graph, shape: LlamaShape, inputs: list[onnx.ValueInfoProto],
                 outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, f"frugal-{shape.architecture}", inputs, outputs, g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="frugal")
    proto.ir_version = 10
    return proto
