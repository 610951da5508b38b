"""OpenAI-format response bodies and server-sent-event frames, built from our result types."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from workers.backend import Choice, RequestKind, StreamChunk, TokenLogprob, Usage


def json_response(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def logprobs_json(kind: RequestKind, logprobs: list[TokenLogprob] | None) -> Any:
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
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in logprobs],
        "text_offset": [],
    }


def usage_json(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _choice_json(kind: RequestKind, choice: Choice) -> dict[str, Any]:
    body: dict[str, Any] = {"index": choice.index}
    if kind == "chat":
        body["message"] = {"role": "assistant", "content": choice.text, "refusal": None}
    else:
        body["text"] = choice.text
    body["logprobs"] = logprobs_json(kind, choice.logprobs)
    body["finish_reason"] = choice.finish_reason or "stop"
    return body


def completion_body(kind: RequestKind, response_id: str, created: int, model: str, choices: list[Choice],
                    usage: Usage) -> bytes:
    return orjson.dumps({
        "id": response_id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [_choice_json(kind, c) for c in choices],
        "usage": usage_json(usage),
        "system_fingerprint": None,
    })


class SSEWriter:
    """Frames for one streamed response."""

    __slots__ = ("kind", "response_id", "created", "model", "include_usage", "_object")

    def __init__(self, kind: RequestKind, response_id: str, created: int, model: str, include_usage: bool):
        self.kind = kind
        self.response_id = response_id
        self.created = created
        self.model = model
        self.include_usage = include_usage
        self._object = "chat.completion.chunk" if kind == "chat" else "text_completion"

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
            choice["delta"] = {"content": chunk.text} if chunk.text else {}
        else:
            choice["text"] = chunk.text
        choice["logprobs"] = logprobs_json(self.kind, chunk.logprobs)
        choice["finish_reason"] = chunk.finish_reason
        return self._frame([choice])

    def usage(self, usage: Usage) -> bytes:
        return self._frame([], usage)

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(body) + b"\n\n"

    DONE = b"data: [DONE]\n\n"
