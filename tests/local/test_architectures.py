"""The graph builder on synthetic GGUFs of each supported layout (llama with tied output, qwen2 with
Q/K/V biases, rotate-half RoPE and an untied output) and each exactly-mapped block type (Q4_0, Q4_1,
Q8_0), against the independent numpy reference. Random weights: no such model is installable here."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.local.reference_llama import forward, load_gguf_weights
from workers.local.gguf_model import GGUFModel
from workers.local.llama_graph import COMPUTE_LEVELS, build_hidden_graph, build_llama_graph
from workers.local.quantize import symmetric_blocks
from workers.local.runtime import DecoderSession

D, HEADS, KV, FFN, VOCAB, LAYERS = 64, 4, 2, 128, 320, 2
QT = gguf.GGMLQuantizationType


#: Where each K-quant block keeps its float16 super-block scales, and a size for them that gives weights of
#: about the magnitude of the other types' (d·sc·q with 6-bit sc, or Q6_K's 8-bit sc, and the quant's q).
K_SCALES = {QT.Q4_K: ((0, 2), 2e-4), QT.Q5_K: ((0, 2), 1e-4), QT.Q6_K: ((208,), 3e-5)}


def random_k_blocks(rng: np.random.Generator, shape: tuple[int, int], qtype: QT) -> np.ndarray:
    """Rows of random K-quant blocks (gguf-py cannot quantize to K-quants): every packed value, scale and minimum
    random, the float16 super-block scales small."""
    rows, cols = shape
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    starts, top = K_SCALES[qtype]
    for start in starts:
        raw[:, :, start:start + 2] = (rng.random((rows, cols // 256, 1)) * top).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def write_gguf(path: Path, arch: str, weight_type: QT, seed: int = 0,
               transform: Callable[[np.ndarray], np.ndarray] | None = None, *, d: int = D, ffn: int = FFN,
               types: Callable[[str], QT] | None = None, chat_template: str | None = None) -> Path:
    """A random model; `transform` is applied to every float matrix before it is written; `types` chooses a
    matrix's type by name (K-quants need `d` and `ffn` multiples of 256)."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(d // HEADS)
    writer.add_vocab_size(VOCAB)
    if chat_template is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list([chr(c) for c in range(33, 33 + VOCAB)])
        writer.add_token_types([1] * VOCAB)
        writer.add_token_merges([])
        writer.add_eos_token_id(0)
        writer.add_chat_template(chat_template)

    def tensor(name: str, shape: tuple[int, ...], scale: float = 0.08, quantize: bool = True) -> None:
        value = (rng.normal(size=shape) * scale).astype(np.float32)
        if transform is not None and len(shape) == 2:
            value = transform(value)
        kind = types(name) if types is not None and len(shape) == 2 else weight_type
        if kind in K_SCALES:
            writer.add_tensor(name, random_k_blocks(rng, (shape[0], shape[1]), kind), raw_dtype=kind)
        elif quantize and kind != QT.F32 and len(shape) == 2:
            writer.add_tensor(name, gguf.quants.quantize(value, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, value)

    tensor("token_embd.weight", (VOCAB, d), 0.5)
    for i in range(LAYERS):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", (1 + rng.normal(size=d) * 0.1).astype(np.float32))
        writer.add_tensor(p + "ffn_norm.weight", (1 + rng.normal(size=d) * 0.1).astype(np.float32))
        tensor(p + "attn_q.weight", (d, d))
        tensor(p + "attn_k.weight", (KV * d // HEADS, d))
        tensor(p + "attn_v.weight", (KV * d // HEADS, d))
        tensor(p + "attn_output.weight", (d, d))
        tensor(p + "ffn_gate.weight", (ffn, d))
        tensor(p + "ffn_up.weight", (ffn, d))
        tensor(p + "ffn_down.weight", (d, ffn))
        if arch == "qwen2":
            for n, size in (("q", d), ("k", KV * d // HEADS), ("v", KV * d // HEADS)):
                tensor(p + f"attn_{n}.bias", (size,), 0.1, quantize=False)
    writer.add_tensor("output_norm.weight", (1 + rng.normal(size=d) * 0.1).astype(np.float32))
    if arch == "qwen2":
        tensor("output.weight", (VOCAB, d), 0.3)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build(tmp: Path, source: Path, quant: str, compute: str) -> Path:
    model = GGUFModel(source)
    folder = tmp / f"{source.stem}-{quant}-{compute}"
    build_llama_graph(model, quant, folder / "model.onnx", accuracy_level=COMPUTE_LEVELS[compute],
                      head_accuracy_level=COMPUTE_LEVELS[compute])
    (folder / "frugal_model.json").write_text(json.dumps({"name": source.stem, "quant": quant,
                                                          "shape": model.shape.to_json()}))
    return folder


CASES = [
    ("llama", QT.F32, "fp32"), ("qwen2", QT.F32, "fp32"),
    ("llama", QT.Q4_1, "int4"), ("llama", QT.Q4_0, "int4"), ("llama", QT.Q8_0, "int8"), ("llama", QT.Q8_0, "int4"),
    ("qwen2", QT.Q4_1, "int4"), ("qwen2", QT.Q4_1, "int8"),
]


@pytest.mark.parametrize(("arch", "weight_type", "quant"), CASES, ids=[f"{a}-{w.name}-{q}" for a, w, q in CASES])
def test_graph_matches_the_reference(tmp_path: Path, arch: str, weight_type: QT, quant: str) -> None:
    source = write_gguf(tmp_path / f"{arch}-{weight_type.name}.gguf", arch, weight_type)
    assert GGUFModel(source).shape.rope_interleaved == (arch == "llama")
    # float32 activations: with the GGUF blocks kept exactly, quantized graphs must be as exact as fp32.
    session = DecoderSession(build(tmp_path, source, quant, "fp32"), threads=1)
    ids = np.random.default_rng(1).integers(0, VOCAB, size=40)
    expected, _ = forward(load_gguf_weights(source), ids)
    cache = session.new_cache(64)
    got = np.concatenate([session.forward(ids[:25], cache, 0), session.forward(ids[25:], cache, 0)])
    assert np.abs(got - expected).max() < 1e-3


def q4_k_m_like(name: str) -> QT:
    """A mix of types as a Q4_K_M file has them, with every exactly-mapped type and both block sizes inside one
    packed projection (Q/K in Q4_K, V in Q6_K: blocks of 32 with offsets next to blocks of 16)."""
    for part, kind in (("attn_q", QT.Q4_K), ("attn_k", QT.Q4_K), ("attn_v", QT.Q6_K), ("attn_output", QT.Q5_0),
                       ("ffn_gate", QT.Q5_K), ("ffn_up", QT.Q5_1), ("ffn_down", QT.Q6_K), ("output", QT.Q8_0)):
        if part in name:
            return kind
    return QT.Q5_0  # token_embd


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_k_quants_and_5_bit_blocks_are_computed_exactly(tmp_path: Path, quant: str) -> None:
    source = write_gguf(tmp_path / "qwen2-kquants.gguf", "qwen2", QT.F32, d=256, ffn=512, types=q4_k_m_like)
    model = GGUFModel(source)
    assert {model.tensor_type(n) for n in model.matrix_names()} == {"Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0"}
    session = DecoderSession(build(tmp_path, source, quant, "fp32"), threads=1)
    ids = np.random.default_rng(6).integers(0, VOCAB, size=40)
    expected, _ = forward(load_gguf_weights(source), ids)
    got = session.forward(ids, session.new_cache(48), 0)
    assert np.abs(expected).max() > 1.0  # the logits are not trivially small
    assert np.abs(got - expected).max() < 1e-3


def test_the_builder_reports_how_each_type_is_held(tmp_path: Path) -> None:
    from workers.local.catalog import weight_report

    source = write_gguf(tmp_path / "qwen2-kquants.gguf", "qwen2", QT.F32, d=256, ffn=512, types=q4_k_m_like)
    report = weight_report(GGUFModel(source), "int8")
    assert {kind: entry["held"] for kind, entry in report.items()} == dict.fromkeys(
        ["Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0"], "exact")
    assert report["Q6_K"]["tensors"] == 2 * LAYERS
    mixed = write_gguf(tmp_path / "q2k.gguf", "llama", QT.F32)
    assert weight_report(GGUFModel(mixed), "int8")["F32"]["held"] == "mixed"  # embeddings float, layers 8-bit
    assert weight_report(GGUFModel(source), "fp32")["Q6_K"]["held"] == "fp32"


def test_a_q6_k_output_layer_is_kept_exactly_for_re_scoring(tmp_path: Path) -> None:
    from workers.local.catalog import build as build_model
    from workers.local.head import ExactHead

    def types(name: str) -> QT:
        return QT.Q6_K if name == "output.weight" else q4_k_m_like(name)

    source = write_gguf(tmp_path / "qwen2-q6k-head.gguf", "qwen2", QT.F32, d=256, ffn=512, types=types,
                        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    folder = build_model(str(source), "int8", root=tmp_path / "models")
    rows = np.arange(VOCAB)
    expected = load_gguf_weights(source).output
    np.testing.assert_allclose(ExactHead(folder).rows(rows), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("template", "message"), [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "Python internals"),
    ("{% for m in messages %}{{ m.content.__init__.__globals__ }}{% endfor %}", "Python internals"),
    ("{% for m in messages %}{{ m['content'] }", "cannot render"),
])
def test_a_hostile_or_broken_chat_template_stops_the_build(tmp_path: Path, template: str, message: str) -> None:
    from workers.local.catalog import build as build_model
    from workers.local.gguf_model import UnsupportedModel

    source = write_gguf(tmp_path / "hostile.gguf", "llama", QT.F32, chat_template=template)
    with pytest.raises(UnsupportedModel, match=message):
        build_model(str(source), "int8", root=tmp_path / "models")
    assert not list((tmp_path / "models").glob("*/frugal_model.json"))  # nothing built


def test_int8_activations_stay_close(tmp_path: Path) -> None:
    source = write_gguf(tmp_path / "llama.gguf", "llama", QT.Q4_1)
    session = DecoderSession(build(tmp_path, source, "int4", "int8"), threads=1)
    ids = np.random.default_rng(2).integers(0, VOCAB, size=32)
    expected, _ = forward(load_gguf_weights(source), ids)
    got = session.forward(ids, session.new_cache(40), 0)
    assert np.abs(got - expected).max() < 0.2


def eight_bit(weight: np.ndarray) -> np.ndarray:
    blocks = symmetric_blocks(weight, 8)
    return (blocks.q.astype(np.float32) * blocks.scale[..., None]).reshape(weight.shape)


def test_int8_from_float_weights_computes_their_8_bit_blocks_exactly(tmp_path: Path) -> None:
    """A float source becomes symmetric 8-bit blocks run with float activations (split into two 4-bit
    halves): exact for weights that are 8-bit blocks already, and far closer to a float model than 4 bits."""
    ids = np.random.default_rng(3).integers(0, VOCAB, size=32)

    def logits(source: Path, quant: str) -> np.ndarray:
        session = DecoderSession(build(tmp_path, source, quant, "fp32"), threads=1)
        return session.forward(ids, session.new_cache(40), 0)

    rounded = write_gguf(tmp_path / "llama-8bit-values.gguf", "llama", QT.F32, transform=eight_bit)
    assert np.abs(logits(rounded, "int8") - forward(load_gguf_weights(rounded), ids)[0]).max() < 1e-3
    source = write_gguf(tmp_path / "llama-f32.gguf", "llama", QT.F32)
    expected, _ = forward(load_gguf_weights(source), ids)
    error = {quant: np.abs(logits(source, quant) - expected).max() for quant in ("int8", "int4")}
    assert error["int8"] * 10 < error["int4"], error


@pytest.mark.parametrize("weight_type", [QT.Q4_1, QT.Q8_0])
def test_the_decode_graph_stays_as_close_as_float_activations(tmp_path: Path, weight_type: QT) -> None:
    """The decode graph (two-pass int8 activations) against the reference, next to plain int8 activations:
    its error is a small fraction of theirs."""
    source = write_gguf(tmp_path / f"llama-{weight_type.name}.gguf", "llama", weight_type)
    model = GGUFModel(source)
    folder = tmp_path / "decode"
    build_llama_graph(model, "int8", folder / "model.onnx", accuracy_level=COMPUTE_LEVELS["fp32"],
                      head_accuracy_level=COMPUTE_LEVELS["fp32"], decode_graph=True)
    (folder / "frugal_model.json").write_text(json.dumps({"name": "t", "quant": "int8",
                                                          "shape": model.shape.to_json()}))
    session = DecoderSession(folder, threads=1)
    assert session.decode_session is not None
    ids = np.random.default_rng(4).integers(0, VOCAB, size=24)
    expected, _ = forward(load_gguf_weights(source), ids)

    def error(graph: str) -> float:
        cache = session.new_cache(32)
        logits, _ = session.run(ids.reshape(1, -1), np.ones((1, len(ids)), np.int64), cache.values, 0, graph)
        return float(np.abs(logits[0] - expected).max())

    fast = DecoderSession(build(tmp_path, source, "int8", "int8"), threads=1)
    int8_error = float(np.abs(fast.forward(ids, fast.new_cache(32), 0) - expected).max())
    assert error("main") < 1e-3
    assert error("decode") < int8_error / 20, (error("decode"), int8_error)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_scoring_graph_returns_the_reference_surprisal(tmp_path: Path, arch: str) -> None:
    """The compression scorer's graph (`build_hidden_graph` with a partial output layer), here with every
    layer and every output row, tied (llama) and untied (qwen2): -log softmax of the reference's logits at
    each following token."""
    import onnxruntime as ort

    source = write_gguf(tmp_path / f"{arch}.gguf", arch, QT.F32)
    path = build_hidden_graph(GGUFModel(source), "fp32", tmp_path / "scoring" / "model.onnx", layers=LAYERS,
                              accuracy_level=COMPUTE_LEVELS["fp32"], surprisal_rows=VOCAB)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(5).integers(0, VOCAB, size=30)
    feed = {"input_ids": ids.reshape(1, -1), "attention_mask": np.ones((1, len(ids)), np.int64)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros((1, KV, 0, D // HEADS), np.float32)
    (surprisal,) = session.run(["surprisal"], feed)
    logits, _ = forward(load_gguf_weights(source), ids)
    peak = logits.max(axis=1, keepdims=True)
    log_softmax = logits - peak - np.log(np.exp(logits - peak).sum(axis=1, keepdims=True))
    expected = -log_softmax[np.arange(len(ids) - 1), ids[1:]]
    assert surprisal.shape == (1, len(ids) - 1)
    assert np.abs(surprisal[0] - expected).max() < 1e-3
