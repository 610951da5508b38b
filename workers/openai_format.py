"""Reading OpenAI-format response bodies into our result types.

Both remote backends end up with OpenAI-shaped dicts (the HTTP backend from the wire, the litellm
backend from `model_dump()` of litellm's translated response), so one reader serves both.
"""

from __future__ import annotations

from typing import Any

from workers.backend import Choice, RequestKind, StreamChunk, TokenLogprob, TopLogprob, Usage


def content_text(content: Any) -> str:
    """The text of a chat message's `content`: a string, or the text (and refusal) parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text") or p.get("refusal") or "") for p in content
                       if isinstance(p, dict) and p.get("type", "text") in ("text", "refusal"))
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
        tool_calls = None
        if kind == "chat":
            message = raw.get("message") or {}
            text = content_text(message.get("content"))
            tool_calls = _tool_calls(message)
        else:
            text = raw.get("text") or ""
        choices.append(
            Choice(
                index=int(raw.get("index", position)),
                text=text,
                finish_reason=raw.get("finish_reason"),
                logprobs=parse_logprobs(kind, raw.get("logprobs")),
                tool_calls=tool_calls,
            )
        )
    return choices, parse_usage(body.get("usage"))


def _tool_calls(message: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A message's tool calls; a deprecated `function_call` becomes one (OpenAI's current shape)."""
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:
        return [_whole_call(c) for c in calls if isinstance(c, dict)]
    call = message.get("function_call")
    if isinstance(call, dict) and call.get("name"):
        return [{"id": "call_0", "type": "function", "function": {"name": call["name"],
                                                                  "arguments": call.get("arguments") or ""}}]
    return None


def parse_stream_chunk(kind: RequestKind, body: dict[str, Any]) -> tuple[list[StreamChunk], Usage | None]:
    """Text increments of one streamed chunk, and usage if the chunk carries it."""
    chunks = []
    for raw in body.get("choices") or []:
        tool_calls = None
        if kind == "chat":
            delta = raw.get("delta") or {}
            text = content_text(delta.get("content"))
            tool_calls = [d for d in delta.get("tool_calls") or [] if isinstance(d, dict)] or None
        else:
            text = raw.get("text") or ""
        chunk = StreamChunk(int(raw.get("index", 0)), text, raw.get("finish_reason"),
                            parse_logprobs(kind, raw.get("logprobs")), tool_calls=tool_calls)
        if chunk.has_content:
            chunks.append(chunk)
    return chunks, parse_usage(body.get("usage"))


def _whole_call(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call in OpenAI's non-streamed shape only (some providers' translations add a stream `index`)."""
    if call.get("type") == "custom":
        return {"id": call.get("id", ""), "type": "custom", "custom": call.get("custom") or {}}
    function = call.get("function") or {}
    return {"id": call.get("id", ""), "type": "function",
            "function": {"name": function.get("name", ""), "arguments": function.get("arguments") or ""}}


def merge_tool_call_deltas(calls: list[dict[str, Any]], deltas: list[dict[str, Any]]) -> None:
    """Put streamed tool-call deltas into whole calls (`calls`, in place): a delta names its call by
    `index`; its `id`, `type` and function `name` arrive once, its `arguments` in pieces."""
    for delta in deltas:
        index = delta.get("index", len(calls))
        while len(calls) <= index:
            calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call = calls[index]
        if delta.get("id"):
            call["id"] = delta["id"]
        if delta.get("type"):
            call["type"] = delta["type"]
        function = delta.get("function") or {}
        if function.get("name"):
            call["function"]["name"] = function["name"]
        if function.get("arguments"):
            call["function"]["arguments"] += function["arguments"]


def as_deltas(calls: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Whole tool calls as the deltas of one streamed chunk (each with its `index`)."""
    return [{"index": i, **call} for i, call in enumerate(calls)] if calls else None


def tool_call_text(calls: list[dict[str, Any]] | None) -> str:
    """What tool calls say, as text to count tokens of (names and arguments)."""
    return "".join(f"{(c.get('function') or {}).get('name', '')}{(c.get('function') or {}).get('arguments', '')}"
                   for c in calls or ())


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
