"""Reading OpenAI-format response bodies into our result types.

Both remote backends end up with OpenAI-shaped dicts (the HTTP backend from the wire, the litellm
backend from `model_dump()` of litellm's translated response), so one reader serves both.
"""

from __future__ import annotations

from typing import Any

from workers.backend import Choice, RequestKind, StreamChunk, TokenLogprob, TopLogprob, Usage


def content_text(content: Any) -> str:
    """The text of a chat message's `content`: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _chat_logprobs(raw: Any) -> list[TokenLogprob] | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("content"), list):
        return None
    out: list[TokenLogprob] = []
    for item in raw["content"]:
        top = [
            TopLogprob(str(t.get("token", "")), float(t.get("logprob", 0.0)))
            for t in item.get("top_logprobs") or []
        ]
        out.append(TokenLogprob(str(item.get("token", "")), float(item.get("logprob", 0.0)), top))
    return out


def _completion_logprobs(raw: Any) -> list[TokenLogprob] | None:
    """The legacy `/v1/completions` shape: parallel lists of tokens and their log-probs."""
    if not isinstance(raw, dict) or not isinstance(raw.get("tokens"), list):
        return None
    tokens = raw["tokens"]
    values = raw.get("token_logprobs") or [0.0] * len(tokens)
    tops = raw.get("top_logprobs") or [None] * len(tokens)
    out = []
    for token, value, top in zip(tokens, values, tops, strict=False):
        top_list = [TopLogprob(str(k), float(v)) for k, v in (top or {}).items()]
        out.append(TokenLogprob(str(token), float(value or 0.0), top_list))
    return out


def parse_logprobs(kind: RequestKind, raw: Any) -> list[TokenLogprob] | None:
    return _chat_logprobs(raw) if kind == "chat" else _completion_logprobs(raw)


def parse_usage(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    prompt = raw.get("prompt_tokens")
    completion = raw.get("completion_tokens")
    if prompt is None and completion is None:
        return None
    return Usage(int(prompt or 0), int(completion or 0))


def parse_response(kind: RequestKind, body: dict[str, Any]) -> tuple[list[Choice], Usage | None]:
    """Choices and usage of a non-streaming response."""
    choices = []
    for position, raw in enumerate(body.get("choices") or []):
        if kind == "chat":
            message = raw.get("message") or {}
            text = message.get("content") or ""
        else:
            text = raw.get("text") or ""
        choices.append(
            Choice(
                index=int(raw.get("index", position)),
                text=text,
                finish_reason=raw.get("finish_reason"),
                logprobs=parse_logprobs(kind, raw.get("logprobs")),
            )
        )
    return choices, parse_usage(body.get("usage"))


def parse_stream_chunk(kind: RequestKind, body: dict[str, Any]) -> tuple[list[StreamChunk], Usage | None]:
    """Text increments of one streamed chunk, and usage if the chunk carries it."""
    chunks = []
    for raw in body.get("choices") or []:
        if kind == "chat":
            text = (raw.get("delta") or {}).get("content") or ""
        else:
            text = raw.get("text") or ""
        finish = raw.get("finish_reason")
        logprobs = parse_logprobs(kind, raw.get("logprobs"))
        if text or finish or logprobs:
            chunks.append(StreamChunk(int(raw.get("index", 0)), text, finish, logprobs))
    return chunks, parse_usage(body.get("usage"))


def error_message(body: Any, fallback: str) -> str:
    """The `error.message` of an OpenAI-style error body, or `fallback`."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if body.get("detail"):
            return str(body["detail"])
    return fallback
