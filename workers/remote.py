"""What the two remote backends (litellm and plain HTTP) share: their settings, the request body, and turning
what a provider answered into a priced result or a stream's closing chunk."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from workers.backend import Choice, GenerationRequest, GenerationResult, StreamChunk, Usage
from workers.errors import BackendError, FailureKind
from workers.openai_format import tool_call_text
from workers.pricing import TokenPrice
from workers.tokens import complete_usage

#: litellm providers that speak OpenAI's protocol unchanged.
OPENAI_COMPATIBLE = frozenset({"openai", "hosted_vllm", "openai_like", "custom_openai", "llamafile", "lm_studio"})


def provider_of(litellm_model: str) -> str:
    """The litellm provider of a model string ("openai" when it names none)."""
    return litellm_model.split("/", 1)[0] if "/" in litellm_model else "openai"


def speaks_openai(litellm_model: str) -> bool:
    """Whether the model's provider speaks OpenAI's protocol unchanged (so a direct HTTP call can serve it)."""
    return provider_of(litellm_model) in OPENAI_COMPATIBLE


@dataclass(frozen=True, slots=True)
class RemoteModel:
    """A model served by a remote provider."""

    #: Deployment name (what clients ask for).
    name: str
    #: litellm model string, e.g. "openai/gpt-4o-mini", "anthropic/claude-3-5-haiku-latest".
    litellm_model: str
    price: TokenPrice = field(default_factory=TokenPrice)
    api_base: str | None = None
    api_key: str | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)
    #: The environment variable that should hold `api_key` but was unset when the backend was built.
    missing_key_env: str | None = None

    @property
    def provider(self) -> str:
        return provider_of(self.litellm_model)

    @property
    def openai_compatible(self) -> bool:
        return speaks_openai(self.litellm_model)

    @property
    def upstream_model(self) -> str:
        """The model name as the provider's own API spells it (litellm prefix removed)."""
        return self.litellm_model.split("/", 1)[1] if "/" in self.litellm_model else self.litellm_model


def check_credentials(model: RemoteModel) -> None:
    """Fail fast (not retryable) when the provider key the configuration names was never set."""
    if model.missing_key_env:
        raise BackendError(FailureKind.AUTH,
                           f"{model.name}: environment variable {model.missing_key_env} (its API key) is not set")


def priced_result(model: RemoteModel, request: GenerationRequest, choices: list[Choice], usage: Usage | None,
                  started: float) -> GenerationResult:
    """A provider's answer as a result: its usage (counted when the provider reported none), cost and latency."""
    usage = complete_usage(usage, request, [c.text + tool_call_text(c.tool_calls) for c in choices])
    return GenerationResult(model=model.name, choices=choices, usage=usage, latency_s=time.perf_counter() - started,
                            cost_usd=model.price.cost(usage.prompt_tokens, usage.completion_tokens))


class StreamTally:
    """What a provider's stream has sent so far, for the closing chunk that carries usage and cost (counted
    from the streamed text when the provider reported no usage)."""

    def __init__(self, model: RemoteModel, request: GenerationRequest) -> None:
        self._model = model
        self._request = request
        self._usage: Usage | None = None
        self._texts: dict[int, list[str]] = {}

    def add(self, chunks: list[StreamChunk], usage: Usage | None) -> list[StreamChunk]:
        """Count one provider event's chunks (and its usage, if it carried any); returns the chunks."""
        self._usage = usage or self._usage
        for chunk in chunks:
            self._texts.setdefault(chunk.index, []).append(chunk.text + tool_call_text(chunk.tool_calls))
        return chunks

    def closing_chunk(self) -> StreamChunk:
        usage = complete_usage(self._usage, self._request, ["".join(t) for t in self._texts.values()])
        return StreamChunk(usage=usage, cost_usd=self._model.price.cost(usage.prompt_tokens, usage.completion_tokens))


def request_body(model: RemoteModel, request: GenerationRequest, *, stream: bool) -> dict[str, Any]:
    """The OpenAI-format body for `request` (also the keyword arguments litellm takes)."""
    body: dict[str, Any] = {"model": model.upstream_model}
    if request.kind == "chat":
        body["messages"] = request.messages
    else:
        body["prompt"] = request.prompt
    body.update(request.params)
    if stream:
        body["stream"] = True
        # Always ask for usage: cost accounting needs it, whatever the client asked for.
        body["stream_options"] = {"include_usage": True}
    return body
