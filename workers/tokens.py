"""Token counting for when a provider reports no usage.

Uses tiktoken's cl100k_base encoding from the copy bundled inside the litellm package, so counting
works offline. Counts for non-OpenAI models are estimates; results that use them say so
(`Usage.estimated`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import orjson

from workers.backend import GenerationRequest, Usage


@functools.cache
def _encoding() -> Any:
    """cl100k_base, read from litellm's bundled copy without importing litellm (which would cost ~150 MB
    of memory and seconds of start-up for a tokenizer of a few MB)."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("litellm is not installed: its bundled tokenizer files are needed to count tokens")
    bundled = os.path.join(list(spec.submodule_search_locations)[0], "litellm_core_utils", "tokenizers")
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", bundled)
    import tiktoken

    return tiktoken.get_encoding("cl100k_base")


def load() -> None:
    """Load the tokenizer now (a few MB), so that the first request that needs a count does not pay for it."""
    _encoding()


def decode_tokens(ids: list[int]) -> str:
    """The text of cl100k_base token ids (the encoding of OpenAI's completion models); ValueError for an id
    that is not one of them."""
    encoding = _encoding()
    if any(not 0 <= i < encoding.n_vocab for i in ids):
        raise ValueError(f"token ids must be between 0 and {encoding.n_vocab - 1}")
    try:
        return encoding.decode(ids, errors="replace")
    except KeyError as exc:  # an id inside the range that names no token
        raise ValueError(f"token id {exc} is not a cl100k_base token") from exc


def count_tokens(text: str) -> int:
    """Number of cl100k_base tokens in `text`."""
    if not text:
        return 0
    return len(_encoding().encode(text, disallowed_special=()))


def split_tokens(text: str) -> list[str]:
    """`text` cut at cl100k_base token boundaries into pieces that join back to `text` exactly."""
    enc = _encoding()
    pieces: list[str] = []
    pending = b""
    for token_id in enc.encode(text, disallowed_special=()):
        pending += enc.decode_single_token_bytes(token_id)
        try:
            pieces.append(pending.decode("utf-8"))
        except UnicodeDecodeError:
            continue  # a character split across tokens: join it with the next token
        pending = b""
    if pending:
        pieces.append(pending.decode("utf-8", errors="replace"))
    return pieces


def count_message_tokens(messages: list[dict[str, Any]]) -> int:
    """Prompt tokens of a chat, with OpenAI's per-message framing overhead."""
    total = 3  # every reply is primed with <|start|>assistant<|message|>
    for message in messages:
        total += 3
        content = message.get("content")
        if isinstance(content, str):
            total += count_tokens(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += count_tokens(part["text"])
        if isinstance(message.get("name"), str):
            total += 1 + count_tokens(message["name"])
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                total += 3 + count_tokens(str(function.get("name") or "")) + count_tokens(
                    str(function.get("arguments") or ""))
    return total


def prompt_tokens_of(request: GenerationRequest) -> int:
    """The prompt's tokens, the tool definitions it carries included."""
    if request.kind != "chat":
        return count_tokens(request.prompt)
    total = count_message_tokens(request.messages)
    for name in ("tools", "functions"):
        if request.params.get(name):
            total += count_tokens(orjson.dumps(request.params[name]).decode())
    return total


def complete_usage(usage: Usage | None, request: GenerationRequest, texts: list[str]) -> Usage:
    """The provider's usage, or a tokenizer count when it reported none (so cost is never lost)."""
    if usage is not None:
        return usage
    return Usage(
        prompt_tokens=prompt_tokens_of(request),
        completion_tokens=sum(count_tokens(t) for t in texts),
        estimated=True,
    )
