"""What makes two requests the same: cache keys for the exact cache, partitions and texts for the
semantic cache. Keys are SHA-256 digests of canonical JSON (sorted keys), so equal requests written with
their fields in another order share an entry."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from workers.backend import HINT_PARAMS, GenerationRequest

#: Parameters that do not change the answer (tags for abuse monitoring, hints for a provider's own caching).
NEUTRAL_PARAMS = HINT_PARAMS

KEY_VERSION = b"frugal-cache-v1"


def _digest(*parts: Any) -> str:
    payload = orjson.dumps(parts, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return hashlib.sha256(KEY_VERSION + payload).hexdigest()


def answer_params(generation: GenerationRequest) -> dict[str, Any]:
    """The request's parameters that can change the answer."""
    return {k: v for k, v in generation.params.items() if k not in NEUTRAL_PARAMS}


def is_deterministic(generation: GenerationRequest) -> bool:
    """Would the model give the same answer again: greedy decoding (temperature 0) or a fixed seed."""
    params = generation.params
    return params.get("temperature") == 0 or params.get("seed") is not None


def exact_key(tenant: str, route: str, generation: GenerationRequest, variant: dict[str, Any] | None = None) -> str:
    """The exact cache's key: who asks (`tenant`), what they named (`route`), the whole conversation or
    prompt, every parameter that changes the answer, and `variant` (gateway-side options that change
    what the model is sent)."""
    content = generation.messages if generation.kind == "chat" else generation.prompt
    return _digest("exact", tenant, route, generation.kind, content, answer_params(generation), variant or {})


def _text_of(content: Any) -> str | None:
    """A message's text, or None when it holds anything but text (an image cannot be matched by meaning)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                return None
            texts.append(str(part.get("text", "")))
        return "\n".join(texts)
    return None


def semantic_question(generation: GenerationRequest) -> str | None:
    """The text the semantic cache matches by meaning: the last user message (chat) or the prompt
    (completion); None when there is none to match (the conversation does not end with a text question)."""
    if generation.kind == "completion":
        return generation.prompt if generation.prompt.strip() else None
    if not generation.messages or generation.messages[-1].get("role") != "user":
        return None
    text = _text_of(generation.messages[-1].get("content"))
    return text if text and text.strip() else None


def semantic_partition(tenant: str, route: str, generation: GenerationRequest,
                       variant: dict[str, Any] | None = None) -> str:
    """The semantic cache's hard filters, which must match exactly: tenant, route, parameters, and
    everything of the conversation but the question itself (system prompt, earlier turns)."""
    context = generation.messages[:-1] if generation.kind == "chat" else None
    return _digest("semantic", tenant, route, generation.kind, context, answer_params(generation), variant or {})
