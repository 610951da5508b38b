"""The stand-in's OpenAI API: `POST /v1/chat/completions` and `POST /v1/completions`, streaming or not, with
log-probs spread from the recorded confidence."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from standin.core import Answer, StandIn, error_response, json_response, query_candidates
from standin.faults import Behaviour
from standin.tools import ToolCall, openai_call
from workers.openai_format import content_text
from workers.tokens import count_tokens, split_tokens


def _logprobs(kind: str, answer: Answer, pieces: list[str], top_n: int) -> Any:
    if answer.token_logprob is None:
        return None
    value = answer.token_logprob
    if kind == "chat":
        return {
            "content": [
                {
                    "token": p,
                    "logprob": value,
                    "bytes": list(p.encode()),
                    "top_logprobs": [{"token": p, "logprob": value, "bytes": list(p.encode())}][:top_n],
                }
                for p in pieces
            ]
        }
    return {
        "tokens": pieces,
        "token_logprobs": [value] * len(pieces),
        "top_logprobs": [{p: value} for p in pieces] if top_n else None,
        "text_offset": [],
    }


async def handle(standin: StandIn, request: Request, kind: str) -> Response:
    """`POST /v1/chat/completions` (kind chat) and `POST /v1/completions` (kind completion)."""
    admitted = await standin.admit(request)
    if isinstance(admitted, Response):
        return admitted
    body, model, behaviour = admitted
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return error_response(400, "messages must be a non-empty list")
        candidates = query_candidates(messages)
        prompt_tokens = sum(count_tokens(content_text(m.get("content"))) + 3 for m in messages) + 3
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return error_response(400, "prompt must be a string")
        candidates = [prompt]
        prompt_tokens = count_tokens(prompt)
    n = int(body.get("n") or 1)
    call = openai_call(model, body, candidates[-1]) if kind == "chat" else None
    if call is not None:
        return _tool_call_response(model, call, n, prompt_tokens, body)
    answer = standin.answer(model, candidates, prompt_tokens, body)
    top_n = int(body.get("top_logprobs") or 0) if kind == "chat" else int(body.get("logprobs") or 0)
    want_logprobs = bool(body.get("logprobs"))
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(
            _stream(kind, model, answer, n, want_logprobs, top_n, include_usage, behaviour),
            media_type="text/event-stream",
        )
    choices = []
    for index in range(n):
        logprobs = _logprobs(kind, answer, answer.pieces, top_n) if want_logprobs else None
        if kind == "chat":
            message = {"role": "assistant", "content": answer.text}
            choices.append({"index": index, "message": message, "logprobs": logprobs,
                            "finish_reason": answer.finish_reason})
        else:
            choices.append({"index": index, "text": answer.text, "logprobs": logprobs,
                            "finish_reason": answer.finish_reason})
    return json_response({
        "id": f"standin-{uuid.uuid4().hex}",
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens * n,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens * n,
        },
    })


async def _stream(kind: str, model: str, answer: Answer, n: int, want_logprobs: bool,
                  top_n: int, include_usage: bool, behaviour: Behaviour) -> AsyncIterator[bytes]:
    ident = f"standin-{uuid.uuid4().hex}"
    created = int(time.time())
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def frame(choices: list[dict], usage: dict | None = None) -> bytes:
        payload: dict[str, Any] = {"id": ident, "object": obj, "created": created, "model": model,
                                   "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    if kind == "chat":
        yield frame([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                     for i in range(n)])
    for position, piece in enumerate(answer.pieces):
        if position == behaviour.fail_after_chunks:
            raise ConnectionAbortedError("injected mid-stream failure")  # the server drops the connection
        if behaviour.chunk_latency_ms:
            await asyncio.sleep(behaviour.chunk_latency_ms / 1000)
        logprobs = _logprobs(kind, answer, [piece], top_n) if want_logprobs else None
        if kind == "chat":
            yield frame([{"index": i, "delta": {"content": piece}, "logprobs": logprobs,
                          "finish_reason": None} for i in range(n)])
        else:
            yield frame([{"index": i, "text": piece, "logprobs": logprobs, "finish_reason": None}
                         for i in range(n)])
    if kind == "chat":
        yield frame([{"index": i, "delta": {}, "finish_reason": answer.finish_reason} for i in range(n)])
    else:
        yield frame([{"index": i, "text": "", "finish_reason": answer.finish_reason} for i in range(n)])
    if include_usage:
        usage = {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens * n,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens * n,
        }
        yield frame([], usage)
    yield b"data: [DONE]\n\n"


def _tool_call_response(model: str, call: ToolCall, n: int, prompt_tokens: int, body: dict[str, Any]) -> Response:
    """A chat answer that calls a tool (every choice the same call), streamed or not."""
    completion_tokens = count_tokens(call.name) + count_tokens(call.arguments) + 3
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens * n,
             "total_tokens": prompt_tokens + completion_tokens * n}
    whole = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    if not body.get("stream"):
        return json_response({
            "id": f"standin-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "usage": usage,
            "choices": [{"index": i, "message": {"role": "assistant", "content": None, "tool_calls": [whole]},
                         "logprobs": None, "finish_reason": "tool_calls"} for i in range(n)],
        })
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return StreamingResponse(_tool_call_stream(model, call, n, usage if include_usage else None),
                             media_type="text/event-stream")


async def _tool_call_stream(model: str, call: ToolCall, n: int, usage: dict[str, int] | None) -> AsyncIterator[bytes]:
    ident = f"standin-{uuid.uuid4().hex}"
    created = int(time.time())

    def frame(deltas: list[dict[str, Any]] | None, finish: str | None = None, last_usage: bool = False) -> bytes:
        choices = [] if last_usage else [{"index": i, "delta": {"tool_calls": deltas} if deltas else {},
                                          "logprobs": None, "finish_reason": finish} for i in range(n)]
        payload: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk", "created": created,
                                   "model": model, "choices": choices}
        if usage is not None:
            payload["usage"] = usage if last_usage else None
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    yield frame([{"index": 0, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}])
    for piece in split_tokens(call.arguments):
        yield frame([{"index": 0, "function": {"arguments": piece}}])
    yield frame(None, "tool_calls")
    if usage is not None:
        yield frame(None, last_usage=True)
    yield b"data: [DONE]\n\n"
