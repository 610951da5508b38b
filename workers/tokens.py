"""Token counting for when a provider reports no usage.

Uses tiktoken's cl100k_base encoding from the copy bundled inside the litellm package, so counting
works offline. Counts for non-OpenAI models are estimates; results that use them say so
(`Usage.estimated`).
"""

from __future__ import annotations

import functools
import os
from typing import Any

from workers.backend import GenerationRequest, Usage


@functools.cache
def _encoding() -> Any:
    from workers.litellm_loader import load_litellm

    litellm = load_litellm()
    bundled = os.path.join(os.path.dirname(litellm.__file__), "litellm_core_utils", "tokenizers")
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", bundled)
    import tiktoken

    return tiktoken.get_encoding("cl100k_base")


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
    return total


def prompt_tokens_of(request: GenerationRequest) -> int:
    if request.kind == "chat":
        return count_message_tokens(request.messages)
    return count_tokens(request.prompt)


def complete_usage(usage: Usage | None, request: GenerationRequest, texts: list[str]) -> Usage:
    """The provider's usage, or a tokenizer count when it reported none (so cost is never lost)."""
    if usage is not None:
        return usage
    return Usage(
        prompt_tokens=prompt_tokens_of(request),
        completion_tokens=sum(count_tokens(t) for t in texts),
        estimated=True,
    )
