"""A backend for any provider litellm knows (OpenAI, Anthropic, vLLM, Ollama, Bedrock …).

litellm does the provider-specific request and response translation; we keep retries, fallbacks,
cooldowns and pricing in our own hands (litellm's `num_retries` is 0 here), so every provider
behaves the same way under the router.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from workers.backend import HINT_PARAMS, GenerationRequest, GenerationResult, StreamChunk
from workers.errors import BackendError, FailureKind, kind_for_status, retry_after_seconds
from workers.litellm_loader import load_litellm
from workers.openai_format import parse_response, parse_stream_chunk
from workers.remote import RemoteModel, StreamTally, check_credentials, priced_result, request_body


def _to_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    return obj.model_dump() if hasattr(obj, "model_dump") else dict(obj)


class LiteLLMBackend:
    """`Backend` that calls a provider through `litellm.acompletion` / `atext_completion`."""

    def __init__(self, model: RemoteModel) -> None:
        self.name = model.name
        self.price = model.price
        self._model = model
        #: The environment variable of the API key the configuration names and the environment lacks.
        self.missing_key_env = model.missing_key_env
        self._litellm = load_litellm()

    def _kwargs(self, request: GenerationRequest, *, stream: bool) -> dict[str, Any]:
        kwargs = request_body(self._model, request, stream=stream)
        kwargs["model"] = self._model.litellm_model
        kwargs["timeout"] = request.timeout_s
        kwargs["num_retries"] = 0
        if self._model.api_base:
            kwargs["api_base"] = self._model.api_base
        if self._model.api_key:
            kwargs["api_key"] = self._model.api_key
        if self._model.extra_headers:
            kwargs["extra_headers"] = dict(self._model.extra_headers)
        if not self._model.openai_compatible:
            for hint in (HINT_PARAMS - {"user"}) & kwargs.keys():  # tags and caching hints only OpenAI knows
                del kwargs[hint]
        if self._model.openai_compatible:
            # the server speaks OpenAI's protocol: what it takes is for it to say, not for litellm's model list
            kwargs["allowed_openai_params"] = sorted(request.params)
        if "user" in kwargs and self._model.openai_compatible:
            # litellm forwards `user` only for model names it knows as OpenAI's and drops it silently
            # for other OpenAI-compatible servers; the client asked for it, so it goes in the body.
            kwargs["extra_body"] = {"user": kwargs.pop("user")}
        return kwargs

    def _call(self, request: GenerationRequest) -> Any:
        if request.kind == "chat":
            return self._litellm.acompletion
        return self._litellm.atext_completion

    def _error(self, exc: Exception) -> BackendError:
        exceptions = self._litellm.exceptions
        message = f"{self.name}: {type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
        status = getattr(exc, "status_code", None)
        retry_after = retry_after_seconds(getattr(getattr(exc, "response", None), "headers", None))
        if isinstance(exc, exceptions.Timeout):
            kind = FailureKind.TIMEOUT
        elif isinstance(exc, exceptions.ContextWindowExceededError):
            kind = FailureKind.CONTEXT_WINDOW
        elif isinstance(exc, exceptions.APIConnectionError):
            kind = FailureKind.CONNECTION
        elif isinstance(status, int):
            kind = kind_for_status(status)
        else:
            kind = FailureKind.UNKNOWN
        return BackendError(kind, message, status=status if isinstance(status, int) else None,
                            retry_after_s=retry_after)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        started = time.perf_counter()
        check_credentials(self._model)
        try:
            response = await self._call(request)(**self._kwargs(request, stream=False))
        except BackendError:
            raise
        except Exception as exc:  # litellm raises its own exception tree; classify all of it
            raise self._error(exc) from exc
        choices, usage = parse_response(request.kind, _to_dict(response))
        return priced_result(self._model, request, choices, usage, started)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        check_credentials(self._model)
        tally = StreamTally(self._model, request)
        try:
            response = await self._call(request)(**self._kwargs(request, stream=True))
            async for raw in response:
                for chunk in tally.add(*parse_stream_chunk(request.kind, _to_dict(raw))):
                    yield chunk
        except BackendError:
            raise
        except Exception as exc:
            raise self._error(exc) from exc
        yield tally.closing_chunk()

    async def aclose(self) -> None:
        return None
