"""OpenAI-format response bodies and server-sent-event frames, built from our result types."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import orjson
from starlette.responses import Response

from workers.backend import Choice, RequestKind, StreamChunk, TokenLogprob, Usage


def json_response(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def logprobs_json(kind: RequestKind, logprobs: list[TokenLogprob] | None, text_start: int = 0) -> Any:
    """Log-probs in the endpoint's shape; for completions `text_offset` counts characters from the start of
    the prompt (`text_start`: where this piece of the answer begins), as OpenAI's does."""
    if logprobs is None:
        return None
    if kind == "chat":
        return {
            "content": [
                {
                    "token": lp.token,
                    "logprob": lp.logprob,
                    "bytes": list(lp.token.encode()),
                    "top_logprobs": [
                        {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())} for t in lp.top
                    ],
                }
                for lp in logprobs
            ],
            "refusal": None,
        }
    offsets = []
    for lp in logprobs:
        offsets.append(text_start)
        text_start += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def usage_json(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _choice_json(kind: RequestKind, choice: Choice, text_start: int) -> dict[str, Any]:
    body: dict[str, Any] = {"index": choice.index}
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
        if choice.tool_calls:
            message["tool_calls"] = choice.tool_calls
            message["content"] = choice.text or None
        body["message"] = message
    else:
        body["text"] = choice.text
    body["logprobs"] = logprobs_json(kind, choice.logprobs, text_start)
    body["finish_reason"] = choice.finish_reason or ("tool_calls" if choice.tool_calls else "stop")
    return body


def completion_body(kind: RequestKind, response_id: str, created: int, model: str, choices: list[Choice],
                    usage: Usage, text_start: Callable[[int], int] = lambda index: 0) -> bytes:
    """A whole response. `text_start(choice index)`: the length of the prompt the choice answers
    (completions' `text_offset`)."""
    return orjson.dumps({
        "id": response_id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [_choice_json(kind, c, text_start(c.index)) for c in choices],
        "usage": usage_json(usage),
    })


class SSEWriter:
    """Frames for one streamed response."""

    __slots__ = ("kind", "response_id", "created", "model", "include_usage", "_object", "_text_at")

    def __init__(self, kind: RequestKind, response_id: str, created: int, model: str, include_usage: bool,
                 prompt_chars: int = 0):
        self.kind = kind
        self.response_id = response_id
        self.created = created
        self.model = model
        self.include_usage = include_usage
        self._object = "chat.completion.chunk" if kind == "chat" else "text_completion"
        #: Completions: where each choice's text has got to, counted from the start of the prompt.
        self._text_at: dict[int, int] = {}
        if kind == "completion":
            self._text_at = defaultdict(lambda: prompt_chars)

    def _frame(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": self.response_id,
            "object": self._object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage_json(usage) if usage is not None else None
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def role(self, n: int) -> bytes:
        """The opening chunk of a chat stream, announcing the assistant role for every choice."""
        return self._frame([
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for i in range(n)
        ])

    def chunk(self, chunk: StreamChunk) -> bytes:
        choice: dict[str, Any] = {"index": chunk.index}
        if self.kind == "chat":
            delta: dict[str, Any] = {"content": chunk.text} if chunk.text else {}
            if chunk.tool_calls:
                delta["tool_calls"] = chunk.tool_calls
            choice["delta"] = delta
            choice["logprobs"] = logprobs_json(self.kind, chunk.logprobs)
        else:
            choice["text"] = chunk.text
            start = self._text_at[chunk.index]
            choice["logprobs"] = logprobs_json(self.kind, chunk.logprobs, start)
            self._text_at[chunk.index] = start + len(chunk.text)
        choice["finish_reason"] = chunk.finish_reason
        return self._frame([choice])

    def usage(self, usage: Usage) -> bytes:
        return self._frame([], usage)

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(body) + b"\n\n"

    DONE = b"data: [DONE]\n\n"
