"""What the gateway and the workers agree on: the task, the Redis keys, and the events of a request's stream.

One request is one Celery task (`TASK`) on its model's queue, with arguments
`(request_id, queue, mode, request, enqueued_at)`. Its answer never goes through Celery's result backend: the
worker appends events to the request's own Redis Stream (`stream_key`), which the gateway reads as they come:

    start   {"worker": id}                                  the worker took the request
    chunk   StreamChunk                                     a streamed increment (mode "stream")
    end     StreamChunk with usage                          the stream's last event (mode "stream")
    result  GenerationResult                                the whole answer (mode "generate")
    error   {"kind", "message", "status", "retry_after_s"}  the request failed; nothing follows

A client that goes away sets `cancel_key`; the worker checks it while generating. `claim_key` makes sure a
request runs once even if its task is delivered twice. Each worker refreshes `worker_key` while it lives, so
a gateway can tell a dead worker from a slow one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from workers.backend import (
    Choice,
    GenerationRequest,
    GenerationResult,
    StreamChunk,
    TokenLogprob,
    TopLogprob,
    Usage,
)

TASK = "frugal.generate"
PREFIX = "frugal:pool:"
#: Seconds a worker's heartbeat key lives; it is refreshed every third of that.
HEARTBEAT_TTL_S = 3.0


def stream_key(request_id: str) -> str:
    return f"{PREFIX}stream:{request_id}"


def cancel_key(request_id: str) -> str:
    return f"{PREFIX}cancel:{request_id}"


def claim_key(request_id: str) -> str:
    return f"{PREFIX}claim:{request_id}"


def worker_key(worker_id: str) -> str:
    return f"{PREFIX}worker:{worker_id}"


def wait_key(queue: str) -> str:
    """The workers' recent wait (enqueue to start) on `queue`, in seconds; it expires when nothing runs."""
    return f"{PREFIX}wait:{queue}"


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def request_to_dict(request: GenerationRequest) -> dict[str, Any]:
    data = dataclasses.asdict(request)
    data["needs"] = sorted(request.needs)
    return data


def request_from_dict(data: dict[str, Any]) -> GenerationRequest:
    return GenerationRequest(**{**data, "needs": frozenset(data.get("needs") or ())})


def chunk_to_dict(chunk: StreamChunk) -> dict[str, Any]:
    """A streamed increment, without what it does not carry (per token: `dataclasses.asdict` costs more)."""
    data: dict[str, Any] = {"index": chunk.index, "text": chunk.text, "finish_reason": chunk.finish_reason}
    if chunk.logprobs is not None:
        data["logprobs"] = [{"token": t.token, "logprob": t.logprob,
                             "top": [{"token": o.token, "logprob": o.logprob} for o in t.top]} for t in chunk.logprobs]
    if chunk.tool_calls is not None:
        data["tool_calls"] = chunk.tool_calls
    return data


def _logprobs(items: list[dict[str, Any]] | None) -> list[TokenLogprob] | None:
    if items is None:
        return None
    return [TokenLogprob(i["token"], i["logprob"], [TopLogprob(t["token"], t["logprob"]) for t in i["top"]])
            for i in items]


def chunk_from_dict(data: dict[str, Any]) -> StreamChunk:
    usage = data.get("usage")
    return StreamChunk(index=data["index"], text=data["text"], finish_reason=data.get("finish_reason"),
                       logprobs=_logprobs(data.get("logprobs")), usage=Usage(**usage) if usage else None,
                       cost_usd=data.get("cost_usd"), tool_calls=data.get("tool_calls"))


def result_from_dict(data: dict[str, Any]) -> GenerationResult:
    choices = [Choice(c["index"], c["text"], c["finish_reason"], _logprobs(c.get("logprobs")), c.get("tool_calls"))
               for c in data["choices"]]
    return GenerationResult(data["model"], choices, Usage(**data["usage"]), data["latency_s"], data["cost_usd"],
                            samples=list(data.get("samples") or []), sample_tokens=data.get("sample_tokens", 0))
