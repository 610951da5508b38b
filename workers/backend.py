"""The one extension point for text generation.

Every model Frugal can call (a remote provider through litellm, a plain OpenAI-compatible server over
HTTP, later the local ONNX Runtime engine) is a `Backend`. The router knows nothing else about them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args, runtime_checkable

from workers.pricing import TokenPrice

RequestKind = Literal["chat", "completion"]

#: OpenAI request parameters that a backend forwards to the model unchanged (when set).
FORWARDED_PARAMS: tuple[str, ...] = (
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "n",
    "user",
    "logprobs",
    "top_logprobs",
    "response_format",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "reasoning_effort",
    "verbosity",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
)

#: Forwarded parameters that only tag a request or hint at the provider's own caching: they never change
#: the answer, and a provider that does not know them may go without them.
HINT_PARAMS = frozenset({"user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
                         "prompt_cache_options"})

#: What a request may need of a model beyond text in, text out (`GenerationRequest.needs`); a model declares
#: what it can do (the configuration's `capabilities`), and routes skip the models that cannot.
Capability = Literal["tools", "images", "audio", "files"]
CAPABILITIES: tuple[str, ...] = get_args(Capability)


@dataclass(slots=True)
class GenerationRequest:
    """What to generate: chat messages (kind="chat") or a raw prompt (kind="completion")."""

    kind: RequestKind
    messages: list[dict[str, Any]] = field(default_factory=list)
    prompt: str = ""
    #: Parameters from `FORWARDED_PARAMS`, already validated by the gateway.
    params: dict[str, Any] = field(default_factory=dict)
    #: Seconds to wait for the whole answer (non-streaming) or for each chunk (streaming).
    timeout_s: float = 60.0
    #: Who is asking (the gateway's key id), for backends that keep per-tenant state such as cached prefixes.
    tenant: str | None = None
    #: False when the client opted out of prompt compression (`x-frugal-compress: off`).
    compress: bool = True
    #: What the request needs of a model beyond text (tools, images, audio, files).
    needs: frozenset[str] = frozenset()
    #: Extra answers to sample for a judge's self-consistency check (`GenerationResult.samples`). Only local
    #: backends produce them (beside the answer, sharing its prompt's keys and values); others ignore it.
    samples: int = 0
    #: The samples' temperature, whatever the answer's own (the judge's settings choose it); each sample is
    #: seeded by its number, so the same prompt gets the same samples.
    sample_temperature: float = 1.0


@dataclass(slots=True)
class TopLogprob:
    token: str
    logprob: float


@dataclass(slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: True when the provider gave no counts and they were counted with a tokenizer.
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Choice:
    index: int
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    #: Chat: the tool calls the model made, in OpenAI's shape (`{"id", "type", "function": {"name",
    #: "arguments"}}`), or None.
    tool_calls: list[dict[str, Any]] | None = None


@dataclass(slots=True)
class GenerationResult:
    """A finished answer, with what it cost and how long it took."""

    model: str
    choices: list[Choice]
    usage: Usage
    latency_s: float
    cost_usd: float
    #: The extra sampled answers the request asked for (`GenerationRequest.samples`), never sent to clients.
    samples: list[str] = field(default_factory=list)
    #: Tokens generated for those samples (not in `usage`: the client did not ask for them).
    sample_tokens: int = 0

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None


@dataclass(slots=True)
class StreamChunk:
    """One increment of a streamed answer.

    Text chunks carry `text` (and `logprobs` when asked for); tool-call chunks carry `tool_calls` deltas in
    OpenAI's streamed shape (each with its `index`; the first of a call with its `id`, `type` and function
    `name`, later ones more of its `arguments`); a choice's last chunk carries its `finish_reason`. The
    stream's final chunk carries `usage` and `cost_usd` (text empty).
    """

    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    usage: Usage | None = None
    cost_usd: float | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @property
    def has_content(self) -> bool:
        """Whether the chunk carries anything for the client (not only usage)."""
        return bool(self.text or self.finish_reason or self.logprobs or self.tool_calls)


@runtime_checkable
class Backend(Protocol):
    """A model that can answer a `GenerationRequest`.

    Implementations raise `workers.errors.BackendError` (or a subclass) for every failure, so the
    router can decide about retries and fallbacks without knowing the provider.
    """

    #: The deployment name from the configuration (what clients put in `model`).
    name: str
    price: TokenPrice

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Answer in full."""
        ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        """Answer incrementally; the last chunk carries usage and cost."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
