"""A backend for plain OpenAI-compatible servers (vLLM, llama.cpp server, TGI, OpenAI itself).

This is the hot-path transport: one pooled aiohttp session, the body forwarded as the client sent it,
the response read with orjson. litellm adds milliseconds of per-call work that a server already
speaking OpenAI's protocol does not need, and httpx's connection pool costs more per request than
aiohttp's (measured: docs/BENCHMARKS.md); providers that need translation use
`workers.litellm_backend` instead.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from workers.backend import GenerationRequest, GenerationResult, StreamChunk
from workers.errors import BackendError, FailureKind, kind_for_status, retry_after_seconds
from workers.openai_format import error_message, parse_response, parse_stream_chunk
from workers.remote import RemoteModel, StreamTally, check_credentials, priced_result, request_body


class HTTPBackend:
    """`Backend` over a direct HTTP connection to an OpenAI-compatible server."""

    def __init__(self, model: RemoteModel, *, max_connections: int = 512) -> None:
        if not model.api_base:
            raise ValueError(f"model {model.name!r}: the http transport needs an api_base")
        self.name = model.name
        self.price = model.price
        self._model = model
        #: The environment variable of the API key the configuration names and the environment lacks.
        self.missing_key_env = model.missing_key_env
        base = model.api_base.rstrip("/")
        self._urls = {"chat": f"{base}/chat/completions", "completion": f"{base}/completions"}
        self._headers = {"content-type": "application/json", **model.extra_headers}
        if model.api_key:
            self._headers["authorization"] = f"Bearer {model.api_key}"
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running event loop (aiohttp binds a session to its loop).
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers,
                                                  auto_decompress=True, raise_for_status=False)
        return self._session

    def _status_error(self, status: int, content: bytes, headers: Any) -> BackendError:
        try:
            body = orjson.loads(content) if content else None
        except orjson.JSONDecodeError:
            body = None
        message = error_message(body, content[:200].decode("utf-8", "replace") or f"HTTP {status}")
        return BackendError(kind_for_status(status), f"{self.name}: upstream answered {status}: {message}",
                            status=status, retry_after_s=retry_after_seconds(headers))

    def _transport_error(self, exc: BaseException) -> BackendError:
        if isinstance(exc, TimeoutError):
            return BackendError(FailureKind.TIMEOUT, f"{self.name}: upstream timed out")
        return BackendError(FailureKind.CONNECTION, f"{self.name}: upstream connection failed ({type(exc).__name__})")

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        started = time.perf_counter()
        check_credentials(self._model)
        content = orjson.dumps(request_body(self._model, request, stream=False))
        timeout = aiohttp.ClientTimeout(total=request.timeout_s, connect=min(request.timeout_s, 10.0))
        try:
            async with self._client().post(self._urls[request.kind], data=content, timeout=timeout) as response:
                raw = await response.read()
                if response.status >= 400:
                    raise self._status_error(response.status, raw, response.headers)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._transport_error(exc) from exc
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BackendError(FailureKind.SERVER, f"{self.name}: upstream sent invalid JSON") from exc
        choices, usage = parse_response(request.kind, body)
        return priced_result(self._model, request, choices, usage, started)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        check_credentials(self._model)
        content = orjson.dumps(request_body(self._model, request, stream=True))
        # No total deadline for a stream: each read (first token, then every chunk) gets timeout_s.
        timeout = aiohttp.ClientTimeout(total=None, connect=min(request.timeout_s, 10.0),
                                        sock_read=request.timeout_s)
        tally = StreamTally(self._model, request)
        try:
            async with self._client().post(self._urls[request.kind], data=content, timeout=timeout) as response:
                if response.status >= 400:
                    raise self._status_error(response.status, await response.read(), response.headers)
                async for raw_line in response.content:
                    if not raw_line.startswith(b"data:"):
                        continue
                    data = raw_line[5:].strip()
                    if data == b"[DONE]":
                        break
                    try:
                        body = orjson.loads(data)
                    except orjson.JSONDecodeError as exc:
                        raise BackendError(FailureKind.SERVER, f"{self.name}: invalid stream chunk") from exc
                    if isinstance(body, dict) and "error" in body:
                        raise BackendError(FailureKind.SERVER, error_message(body, "upstream stream error"))
                    for chunk in tally.add(*parse_stream_chunk(request.kind, body)):
                        yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._transport_error(exc) from exc
        yield tally.closing_chunk()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
