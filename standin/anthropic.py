"""The stand-in's Anthropic Messages API (`POST /v1/messages`), so that litellm's translation for a
non-OpenAI provider (`anthropic/...`) is exercised end to end, not just OpenAI pass-through."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from standin.core import Answer, StandIn, error_response, json_response, query_candidates
from standin.faults import Behaviour
from standin.tools import ToolCall, anthropic_call
from workers.openai_format import content_text
from workers.tokens import count_tokens, split_tokens

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


def as_openai_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Anthropic's top-level `system` plus `messages`, in OpenAI's one-list form."""
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if isinstance(system, list):
        system = "".join(block.get("text", "") for block in system if isinstance(block, dict))
    if system:
        messages.append({"role": "system", "content": system})
    messages.extend(m for m in body.get("messages") or [] if isinstance(m, dict))
    return messages


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


async def handle_messages(standin: StandIn, request: Request) -> Response:
    """`POST /v1/messages`, streaming or not."""
    admitted = await standin.admit(request)
    if isinstance(admitted, Response):
        return admitted
    body, model, behaviour = admitted
    messages = as_openai_messages(body)
    if not any(m.get("role") == "user" for m in messages):
        return error_response(400, "messages: at least one user message is required")
    if not isinstance(body.get("max_tokens"), int):
        return error_response(400, "max_tokens: Field required")
    prompt_tokens = sum(count_tokens(content_text(m.get("content"))) for m in messages)
    # a user turn that only carries tool results is not the question
    asked = [m for m in messages if m.get("role") != "user" or content_text(m.get("content"))]
    candidates = query_candidates(asked)
    message_id = f"msg_standin_{uuid.uuid4().hex[:20]}"
    call = anthropic_call(model, body, candidates[-1])
    if call is not None:
        return _tool_use(message_id, model, call, prompt_tokens, bool(body.get("stream")))
    params = {"max_tokens": body["max_tokens"], "stop": body.get("stop_sequences")}
    answer = standin.answer(model, candidates, prompt_tokens, params)
    stop_reason = STOP_REASONS[answer.finish_reason]
    if not body.get("stream"):
        return json_response({
            "id": message_id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": answer.text}],
            "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {"input_tokens": answer.prompt_tokens, "output_tokens": answer.completion_tokens},
        })
    return StreamingResponse(_stream(message_id, model, answer, stop_reason, behaviour),
                             media_type="text/event-stream")


async def _stream(message_id: str, model: str, answer: Answer, stop_reason: str,
                  behaviour: Behaviour) -> AsyncIterator[bytes]:
    yield _event("message_start", {"type": "message_start", "message": {
        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": answer.prompt_tokens, "output_tokens": 1}}})
    yield _event("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}})
    for piece in answer.pieces:
        if behaviour.chunk_latency_ms:
            await asyncio.sleep(behaviour.chunk_latency_ms / 1000)
        yield _event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "text_delta", "text": piece}})
    yield _event("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield _event("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                   "usage": {"output_tokens": answer.completion_tokens}})
    yield _event("message_stop", {"type": "message_stop"})


def _tool_use(message_id: str, model: str, call: ToolCall, prompt_tokens: int, stream: bool) -> Response:
    """An answer that uses a tool, as Anthropic sends one (`tool_use` block, stop reason `tool_use`)."""
    output_tokens = count_tokens(call.name) + count_tokens(call.arguments) + 3
    block = {"type": "tool_use", "id": call.id.replace("call_", "toolu_"), "name": call.name,
             "input": orjson.loads(call.arguments)}
    if not stream:
        return json_response({
            "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [block],
            "stop_reason": "tool_use", "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": output_tokens},
        })

    async def events() -> AsyncIterator[bytes]:
        yield _event("message_start", {"type": "message_start", "message": {
            "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": prompt_tokens, "output_tokens": 1}}})
        yield _event("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {**block, "input": {}}})
        for piece in split_tokens(call.arguments):
            yield _event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                 "delta": {"type": "input_json_delta", "partial_json": piece}})
        yield _event("content_block_stop", {"type": "content_block_stop", "index": 0})
        yield _event("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                                       "usage": {"output_tokens": output_tokens}})
        yield _event("message_stop", {"type": "message_stop"})

    return StreamingResponse(events(), media_type="text/event-stream")
