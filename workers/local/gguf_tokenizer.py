"""Tokenizer and chat template for a GGUF model, built from the GGUF's own metadata.

A GGUF file carries everything needed to tokenize for its model: the vocabulary, the BPE merges, the token types,
the special token ids, the name of the pre-tokenizer and the chat template. Building the tokenizer from those fields
(instead of fetching a ``tokenizer.json`` from a hub, or going through torch/transformers) keeps the local tier
offline and guarantees that the ids we feed the model are the ones its GGUF was converted with.

Fidelity target is llama.cpp (``src/llama-vocab.cpp``), since it is the reference consumer of GGUF files: the
pre-tokenizer is picked from ``tokenizer.ggml.pre`` the way llama.cpp picks its regex list, control tokens are
matched whole, and a missing chat template falls back to ChatML as llama.cpp does.

Only byte-level BPE (``tokenizer.ggml.model == 'gpt2'``) is supported; other models raise `UnsupportedTokenizer`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

if TYPE_CHECKING:
    import gguf
    import jinja2

__all__ = [
    "DEFAULT_CHATML_TEMPLATE",
    "ChatTemplate",
    "TokenizerBundle",
    "TokenizerInfo",
    "UnsupportedTokenizer",
    "build_tokenizer",
    "build_tokenizer_from_metadata",
    "load_gguf_tokenizer",
    "load_tokenizer",
    "read_tokenizer_metadata",
    "save_tokenizer",
]

# GGUF token types (gguf.TokenType / llama.cpp's llama_token_type).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Pre-tokenizer families, keyed by the `tokenizer.ggml.pre` names llama.cpp maps to each regex list.
# Digits-first: llama.cpp isolates every \p{N} code point, then applies the GPT-2 regex to each piece.
_DIGITS_THEN_GPT2 = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"})
# Plain GPT-2 regex.
_GPT2 = frozenset({"gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "jina-es", "jina-de", "jina-v2-es",
                   "jina-v2-de", "gigachat", "trillion", "granite-docling", "mellum"})
# Llama 3: case-insensitive contractions, numbers in groups of up to three, and llama.cpp ignores merges for words
# that are already whole vocabulary entries.
_LLAMA3 = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"})
# Qwen 2: like Llama 3 but numbers are single digits.
_QWEN2 = frozenset({"qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"})
# Families for which llama.cpp prepends BOS when the GGUF does not say (tokenizer.ggml.add_bos_token).
_ADD_BOS_BY_DEFAULT = _LLAMA3

_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# Token texts llama.cpp treats as end-of-generation even when the metadata names only the EOS id.
_END_TOKEN_TEXTS = (
    "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>",
    "<EOT>", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
)

DEFAULT_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class UnsupportedTokenizer(ValueError):
    """The GGUF describes a tokenizer this module cannot reproduce faithfully.

    Raised instead of guessing: a tokenizer that is slightly off still "works" but feeds the model ids it was not
    trained on, which degrades output silently.
    """


def read_tokenizer_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """The ``tokenizer.*`` fields of a GGUF as plain Python values.

    Everything else in this module works on this dict, so it can be tested with hand-made metadata and the
    (slow to open) GGUF is read once.
    """
    return {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    # ByteLevel(use_regex=True) applies the GPT-2 split regex itself
    # ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+) before mapping bytes to chars.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2:
        return byte_level
    if pre in _DIGITS_THEN_GPT2:
        # Digits(individual_digits=True) isolates every Unicode number character (Rust's char::is_numeric is
        # categories Nd, Nl and No, i.e. \p{N}), which is llama.cpp's first "\p{N}" pass.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    for family, pattern in ((_LLAMA3, _LLAMA3_REGEX), (_QWEN2, _QWEN2_REGEX)):
        if pre in family:
            return pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
    known = sorted(_GPT2 | _DIGITS_THEN_GPT2 | _LLAMA3 | _QWEN2)
    raise UnsupportedTokenizer(
        f"GGUF pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported; known values: {', '.join(known)}"
    )


def _token_text(meta: Mapping[str, Any], key: str) -> str | None:
    token_id = meta.get(key)
    tokens = meta["tokenizer.ggml.tokens"]
    if token_id is None or not 0 <= int(token_id) < len(tokens):
        return None
    return str(tokens[int(token_id)])


def _add_bos(meta: Mapping[str, Any]) -> bool:
    if "tokenizer.ggml.add_bos_token" in meta:
        return bool(meta["tokenizer.ggml.add_bos_token"])
    return meta.get("tokenizer.ggml.pre") in _ADD_BOS_BY_DEFAULT


def build_tokenizer_from_metadata(meta: Mapping[str, Any]) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's for the GGUF whose ``tokenizer.*`` metadata is `meta`.

    Control (type 3) tokens become special added tokens and user-defined (type 4) tokens plain added tokens, so
    both are matched whole in the input (``"<|im_start|>"`` is one id, never split into characters) while
    ``decode(..., skip_special_tokens=True)`` drops only the control ones, as llama.cpp's detokenizer does. When the
    model wants a BOS token, the post-processor prepends it; pass ``add_special_tokens=False`` to `encode` for
    text that already starts with one.
    """
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise UnsupportedTokenizer(
            f"GGUF tokenizer model tokenizer.ggml.model={model!r} is not supported: only 'gpt2' (byte-level BPE) is; "
            "'llama' (SentencePiece), 'bert', 't5' and others need a different tokenizer model"
        )
    pre = meta.get("tokenizer.ggml.pre")
    pre_tokenizer = _pre_tokenizer(pre)

    tokens = [str(token) for token in meta["tokenizer.ggml.tokens"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges: list[tuple[str, str]] = []
    for merge in meta.get("tokenizer.ggml.merges", []):
        left, sep, right = str(merge).partition(" ")
        if not sep or not left or not right or " " in right:
            raise UnsupportedTokenizer(f"malformed BPE merge {merge!r} in tokenizer.ggml.merges")
        merges.append((left, right))

    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in _LLAMA3))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()

    token_types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(token_types) != len(tokens):
        raise UnsupportedTokenizer(f"{len(token_types)} token types for {len(tokens)} tokens")
    control = [token for token, kind in zip(tokens, token_types, strict=True) if kind == TOKEN_TYPE_CONTROL]
    user = [token for token, kind in zip(tokens, token_types, strict=True) if kind == TOKEN_TYPE_USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in user])

    bos = _token_text(meta, "tokenizer.ggml.bos_token_id")
    if _add_bos(meta) and bos is not None:
        bos_id = int(meta["tokenizer.ggml.bos_token_id"])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    return tokenizer


def build_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    """A `tokenizers.Tokenizer` built from the vocabulary and merges inside the GGUF `reader` has open.

    See `build_tokenizer_from_metadata`; raises `UnsupportedTokenizer` for tokenizers it cannot reproduce.
    """
    return build_tokenizer_from_metadata(read_tokenizer_metadata(reader))


@dataclass(frozen=True)
class TokenizerInfo:
    """The special-token facts a generation loop needs: what to prepend, what to pad with, when to stop."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    #: Ids that end generation: EOS first, then EOT/EOM and end-of-turn tokens found by text, as llama.cpp does,
    #: because chat models often end a turn with ``<|im_end|>``/``<|eot_id|>`` rather than their EOS.
    stop_ids: tuple[int, ...]
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> TokenizerInfo:
        """Read the ids from GGUF ``tokenizer.*`` metadata (see `read_tokenizer_metadata`)."""
        tokens = meta["tokenizer.ggml.tokens"]

        def token_id(key: str) -> int | None:
            value = meta.get(key)
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        stop: list[int] = []
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            found = token_id(key)
            if found is not None and found not in stop:
                stop.append(found)
        end_texts = set(_END_TOKEN_TEXTS)
        stop += [index for index, text in enumerate(tokens) if text in end_texts and index not in stop]

        return cls(
            bos_id=token_id("tokenizer.ggml.bos_token_id"),
            eos_id=token_id("tokenizer.ggml.eos_token_id"),
            pad_id=token_id("tokenizer.ggml.padding_token_id"),
            add_bos=_add_bos(meta),
            stop_ids=tuple(stop),
            bos_token=_token_text(meta, "tokenizer.ggml.bos_token_id"),
            eos_token=_token_text(meta, "tokenizer.ggml.eos_token_id"),
            pad_token=_token_text(meta, "tokenizer.ggml.padding_token_id"),
        )

    @classmethod
    def from_reader(cls, reader: gguf.GGUFReader) -> TokenizerInfo:
        """Read the ids from an open GGUF."""
        return cls.from_metadata(read_tokenizer_metadata(reader))


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and ', which would change tool schemas shown to the model.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _text_content(content: Any) -> Any:
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(f"only text content parts can be rendered for a local model, got {kind!r}")
        texts.append(str(part.get("text", "")))
    return "\n".join(texts)


class ChatTemplate:
    """The model's chat template, rendered the way Hugging Face renders it.

    Uses a sandboxed, immutable Jinja environment (templates ship inside downloaded model files, so they are
    untrusted) with ``trim_blocks`` and ``lstrip_blocks`` on, loop controls, a non-escaping ``tojson`` and the
    ``raise_exception`` and ``strftime_now`` helpers that published templates call. A GGUF without a template gets
    `DEFAULT_CHATML_TEMPLATE`, the same fallback llama.cpp uses.
    """

    def __init__(self, source: str | None, bos_token: str | None = None, eos_token: str | None = None,
                 strip_bos: bool = False) -> None:
        """Compile `source` (None or empty: ChatML).

        `strip_bos`: drop a leading `bos_token` from the rendered text, for models whose tokenizer already
        prepends BOS (`TokenizerInfo.add_bos`); llama.cpp does the same so the prompt does not start with two.
        """
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.is_fallback = not source
        self.source: str = source or DEFAULT_CHATML_TEMPLATE
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self.strip_bos = strip_bos
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        helpers: dict[str, Callable[..., Any]] = {
            "raise_exception": _raise_exception,
            "strftime_now": lambda fmt: datetime.now().strftime(fmt),
        }
        env.globals.update(helpers)
        self._template: jinja2.Template = env.from_string(self.source)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> ChatTemplate:
        """The template in GGUF ``tokenizer.*`` metadata, with that GGUF's BOS/EOS texts."""
        info = TokenizerInfo.from_metadata(meta) if "tokenizer.ggml.tokens" in meta else None
        return cls(
            meta.get("tokenizer.chat_template"),
            bos_token=info.bos_token if info else None,
            eos_token=info.eos_token if info else None,
            strip_bos=info.add_bos if info else False,
        )

    @classmethod
    def from_reader(cls, reader: gguf.GGUFReader) -> ChatTemplate:
        """The template of an open GGUF."""
        return cls.from_metadata(read_tokenizer_metadata(reader))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for `messages` (OpenAI-style dicts).

        A ``content`` given as a list of ``{"type": "text", "text": ...}`` parts is joined with newlines first,
        since most templates concatenate ``message['content']`` as a string; other part types raise ValueError.
        `extra` (e.g. ``tools``) is passed to the template as is.
        """
        prepared = [{**message, "content": _text_content(message.get("content"))} for message in messages]
        text = self._template.render(
            messages=prepared,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **extra,
        )
        if self.strip_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return text


class TokenizerBundle(NamedTuple):
    """What the local tier needs to turn chat messages into ids and back."""

    tokenizer: Tokenizer
    info: TokenizerInfo
    chat_template: ChatTemplate


def load_gguf_tokenizer(path: str | Path) -> TokenizerBundle:
    """Tokenizer, special ids and chat template of the GGUF file at `path`, read in one pass."""
    import gguf

    meta = read_tokenizer_metadata(gguf.GGUFReader(path))
    return TokenizerBundle(build_tokenizer_from_metadata(meta), TokenizerInfo.from_metadata(meta),
                           ChatTemplate.from_metadata(meta))


TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, info: TokenizerInfo,
                   chat_template: ChatTemplate) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` to `out_dir` so the model directory is self-contained.

    The config uses Hugging Face's key names (plus ``stop_token_ids``) so other tools can read it too. `info` and
    `chat_template` are needed because a `tokenizers.Tokenizer` does not know its BOS/EOS roles or template.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / TOKENIZER_FILE))
    config = {
        "bos_token": info.bos_token,
        "eos_token": info.eos_token,
        "pad_token": info.pad_token,
        "add_bos_token": info.add_bos,
        "stop_token_ids": list(info.stop_ids),
        "chat_template": chat_template.source,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return out


def load_tokenizer(model_dir: str | Path) -> TokenizerBundle:
    """Read back what `save_tokenizer` wrote."""
    directory = Path(model_dir)
    tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
    config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))

    def token_id(key: str) -> int | None:
        text = config.get(key)
        return tokenizer.token_to_id(text) if text is not None else None

    info = TokenizerInfo(
        bos_id=token_id("bos_token"),
        eos_id=token_id("eos_token"),
        pad_id=token_id("pad_token"),
        add_bos=bool(config.get("add_bos_token", False)),
        stop_ids=tuple(int(i) for i in config.get("stop_token_ids", [])),
        bos_token=config.get("bos_token"),
        eos_token=config.get("eos_token"),
        pad_token=config.get("pad_token"),
    )
    template = ChatTemplate(config.get("chat_template"), info.bos_token, info.eos_token, strip_bos=info.add_bos)
    return TokenizerBundle(tokenizer, info, template)
