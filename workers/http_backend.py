"""A backend for plain OpenAI-compatible servers (vLLM, llama.cpp server, TGI, OpenAI itself).

This is the hot-path transport: one pooled httpx client, the body forwarded as the client sent it,
the response read with orjson. litellm adds 5-7 ms of per-call work that a server already speaking
OpenAI's protocol does not need (see docs/BENCHMARKS.md); providers that need translation use
`workers.litellm_backend` instead.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import orjson

from workers.backend import GenerationRequest, GenerationResult, StreamChunk, Usage
from workers.errors import BackendError, FailureKind, kind_for_status
from workers.openai_format import error_message, parse_response, parse_stream_chunk
from workers.remote import RemoteModel, choice_texts, complete_usage, request_body


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _status_error(model: RemoteModel, status: int, content: bytes, response: httpx.Response) -> BackendError:
    try:
        body = orjson.loads(content) if content else None
    except orjson.JSONDecodeError:
        body = None
    message = error_message(body, content[:200].decode("utf-8", "replace") or f"HTTP {status}")
    return BackendError(
        kind_for_status(status),
        f"{model.name}: upstream answered {status}: {message}",
        status=status,
        retry_after_s=_retry_after(response),
    )


class HTTPBackend:
    """`Backend` over a direct HTTP connection to an OpenAI-compatible server."""

    def __init__(self, model: RemoteModel, *, max_connections: int = 512) -> None:
        if not model.api_base:
            raise ValueError(f"model {model.name!r}: the http transport needs an api_base")
        self.name = model.name
        self.price = model.price
        self._model = model
        headers = {"content-type": "application/json", **model.extra_headers}
        if model.api_key:
            headers["authorization"] = f"Bearer {model.api_key}"
        self._client = httpx.AsyncClient(
            base_url=model.api_base.rstrip("/"),
            headers=headers,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    def _path(self, request: GenerationRequest) -> str:
        return "/chat/completions" if request.kind == "chat" else "/completions"

    def _timeout(self, request: GenerationRequest) -> httpx.Timeout:
        return httpx.Timeout(request.timeout_s, connect=min(request.timeout_s, 10.0))

    def _transport_error(self, exc: httpx.HTTPError) -> BackendError:
        if isinstance(exc, httpx.TimeoutException):
            return BackendError(FailureKind.TIMEOUT, f"{self.name}: upstream timed out ({type(exc).__name__})")
        return BackendError(FailureKind.CONNECTION, f"{self.name}: upstream unreachable ({type(exc).__name__})")

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        started = time.perf_counter()
        content = orjson.dumps(request_body(self._model, request, stream=False))
        try:
            response = await self._client.post(
                self._path(request), content=content, timeout=self._timeout(request)
            )
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc
        if response.status_code >= 400:
            raise _status_error(self._model, response.status_code, response.content, response)
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise BackendError(FailureKind.SERVER, f"{self.name}: upstream sent invalid JSON") from exc
        choices, usage = parse_response(request.kind, body)
        usage = complete_usage(usage, request, choice_texts(choices))
        return GenerationResult(
            model=self.name,
            choices=choices,
            usage=usage,
            latency_s=time.perf_counter() - started,
            cost_usd=self.price.cost(usage.prompt_tokens, usage.completion_tokens),
        )

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        content = orjson.dumps(request_body(self._model, request, stream=True))
        usage: Usage | None = None
        texts: dict[int, list[str]] = {}
        try:
            async with self._client.stream(
                "POST", self._path(request), content=content, timeout=self._timeout(request)
            ) as response:
                if response.status_code >= 400:
                    raise _status_error(self._model, response.status_code, await response.aread(), response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        body = orjson.loads(data)
                    except orjson.JSONDecodeError as exc:
                        raise BackendError(FailureKind.SERVER, f"{self.name}: invalid stream chunk") from exc
                    if isinstance(body, dict) and "error" in body:
                        raise BackendError(FailureKind.SERVER, error_message(body, "upstream stream error"))
                    chunks, chunk_usage = parse_stream_chunk(request.kind, body)
                    usage = chunk_usage or usage
                    for chunk in chunks:
                        texts.setdefault(chunk.index, []).append(chunk.text)
                        yield chunk
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc
        final = complete_usage(usage, request, ["".join(t) for t in texts.values()])
        yield StreamChunk(
            usage=final, cost_usd=self.price.cost(final.prompt_tokens, final.completion_tokens)
        )

    async def aclose(self) -> None:
        await self._client.aclose()
