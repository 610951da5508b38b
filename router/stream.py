"""A route's answer as a stream, keeping the request's books however the stream ends.

A stream ends in one of three ways: it finishes (the route settles: a cascade computes its savings), the
upstream fails mid-stream, or the client goes away. Providers bill what they generated, so in the last two
cases the tokens already streamed are counted (with a tokenizer when the provider's own count never came)
and priced into the decision trace. The gateway only iterates the chunks and closes the stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from router.trace import Attempt, DecisionTrace
from workers.backend import Choice, GenerationRequest, GenerationResult, StreamChunk, TokenLogprob, Usage
from workers.errors import BackendError
from workers.openai_format import as_deltas, merge_tool_call_deltas, tool_call_text
from workers.pricing import TokenPrice
from workers.tokens import complete_usage

#: Outcome recorded for the partial answer of a stream the client abandoned.
CLIENT_CLOSED = "client_closed"


class RouteStream:
    """The answer of one model, streamed: committed to `model` once its first chunk has arrived.

    `async for chunk in stream` yields the chunks that carry text, a finish reason or log-probs (usage
    arrives in `usage`); `aclose()` must follow, always, however the response ended. A stream that neither
    finished nor failed by then was abandoned by its client: what was generated is billed."""

    def __init__(self, model: str, first: StreamChunk, rest: AsyncIterator[StreamChunk], *, trace: DecisionTrace,
                 request: GenerationRequest, price: TokenPrice, started: float, usage: Usage | None = None,
                 billed: bool = False) -> None:
        self.model = model
        #: The provider's usage once it arrived; otherwise counted when the stream ends early.
        self.usage = usage or Usage()
        self._first: StreamChunk | None = first
        self._rest = rest
        self._trace = trace
        self._request = request
        self._price = price
        self._started = started
        #: True when the answer was generated (and its attempt billed) in full before it was streamed.
        self._billed = billed
        self._state = "open"  # then "finished", "failed" or "abandoned"
        self._answer = _StreamedAnswer()
        self._on_finish: list[Callable[[Usage], None]] = []
        self._chunks: AsyncGenerator[StreamChunk, None] | None = None

    @classmethod
    def replay(cls, result: GenerationResult, *, trace: DecisionTrace, request: GenerationRequest,
               price: TokenPrice) -> RouteStream:
        """An answer already generated (and billed) in full, as a stream: its text at once, then the finish."""
        chunks: list[StreamChunk] = []
        for choice in result.choices:
            chunks.append(StreamChunk(choice.index, choice.text, None, choice.logprobs,
                                      tool_calls=as_deltas(choice.tool_calls)))
            chunks.append(StreamChunk(choice.index, "", choice.finish_reason or "stop"))
        chunks.append(StreamChunk(usage=result.usage, cost_usd=result.cost_usd))
        return cls(result.model, chunks[0], _iterate(chunks[1:]), trace=trace, request=request, price=price,
                   started=time.perf_counter(), usage=result.usage, billed=True)

    def on_finish(self, settle: Callable[[Usage], None]) -> None:
        """Call `settle` with the usage once the stream has finished (not when it failed or was abandoned)."""
        self._on_finish.append(settle)

    @property
    def cost_usd(self) -> float:
        """What the request has cost so far: every attempt of the route, this stream's included."""
        return self._trace.cost_usd

    @property
    def finished(self) -> bool:
        return self._state == "finished"

    def choices(self) -> list[Choice]:
        """What was streamed, put back together choice by choice."""
        return self._answer.choices()

    @property
    def text(self) -> str:
        """The first choice's text as streamed so far."""
        return self._answer.text(0)

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        if self._chunks is None:
            self._chunks = self._iterate()
        return self._chunks

    async def _iterate(self) -> AsyncGenerator[StreamChunk, None]:
        chunk = self._first
        self._first = None
        try:
            while chunk is not None:
                if chunk.usage is not None:
                    self.usage = chunk.usage
                if chunk.has_content:
                    self._answer.add(chunk)
                    yield chunk
                chunk = await anext(self._rest, None)
        except BackendError:
            self._state = "failed"
            self._bill_partial(None)
            raise
        self._state = "finished"
        for settle in self._on_finish:
            settle(self.usage)

    async def aclose(self) -> None:
        """End the stream: bill an abandoned answer's generated part, then release the upstream stream."""
        if self._state == "open":
            self._state = "abandoned"
            self._bill_partial(CLIENT_CLOSED)
        if self._chunks is not None:
            await self._chunks.aclose()
        await close_iterator(self._rest)

    def _bill_partial(self, outcome: str | None) -> None:
        """Usage and cost of an answer cut short: the provider bills what it generated. `outcome` None: the
        upstream failed (its failed attempt is already in the trace and gets the cost)."""
        if self.usage.total_tokens == 0:
            self.usage = complete_usage(None, self._request, [c.text + tool_call_text(c.tool_calls)
                                                              for c in self._answer.choices()])
        if self._billed:
            return
        cost = self._price.cost(self.usage.prompt_tokens, self.usage.completion_tokens)
        attempts = self._trace.attempts
        if outcome is None and attempts and attempts[-1].model == self.model:
            attempts[-1].cost_usd = cost
        else:
            attempts.append(Attempt(self.model, outcome or "failed_midstream", time.perf_counter() - self._started,
                                    cost))


class _StreamedAnswer:
    """A streamed answer put back together, choice by choice."""

    def __init__(self) -> None:
        self._texts: dict[int, list[str]] = {}
        self._finish: dict[int, str | None] = {}
        self._logprobs: dict[int, list[TokenLogprob] | None] = {}
        self._tool_calls: dict[int, list[dict[str, Any]]] = {}

    def add(self, chunk: StreamChunk) -> None:
        self._texts.setdefault(chunk.index, []).append(chunk.text)
        if chunk.finish_reason:
            self._finish[chunk.index] = chunk.finish_reason
        if chunk.logprobs:
            self._logprobs[chunk.index] = (self._logprobs.get(chunk.index) or []) + chunk.logprobs
        if chunk.tool_calls:
            merge_tool_call_deltas(self._tool_calls.setdefault(chunk.index, []), chunk.tool_calls)

    def text(self, index: int) -> str:
        return "".join(self._texts.get(index, ()))

    def choices(self) -> list[Choice]:
        return [Choice(i, "".join(self._texts[i]), self._finish.get(i), self._logprobs.get(i),
                       self._tool_calls.get(i)) for i in sorted(self._texts)]


async def _iterate(chunks: list[StreamChunk]) -> AsyncIterator[StreamChunk]:
    for chunk in chunks:
        yield chunk


async def close_iterator(iterator: AsyncIterator[StreamChunk]) -> None:
    """`aclose()` an async iterator that has one (a generator), whatever it is."""
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()
