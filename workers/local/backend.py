"""The local tier as a `Backend`: `model: local/smollm2-135m-instruct` answers through the same
protocol as any remote provider. Generation runs in a thread of its own (ONNX Runtime releases the GIL),
so the event loop keeps serving other requests; a stream's consumer going away cancels generation."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from workers.backend import (
    Choice,
    GenerationRequest,
    GenerationResult,
    StreamChunk,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from workers.errors import BackendError, FailureKind
from workers.local.generate import Generation, LocalGenerator, Step
from workers.local.sampling import SamplingParams
from workers.pricing import TokenPrice

DEFAULT_MAX_TOKENS = 512
UNSUPPORTED = {"response_format": "structured output is not supported by local models yet"}
_DONE = object()


class LocalBackend:
    """`Backend` over a `LocalGenerator`."""

    def __init__(self, name: str, model_dir: Path, *, price: TokenPrice | None = None, threads: int | None = None,
                 provider: str = "auto") -> None:
        self.name = name
        self.price = price or TokenPrice()
        self.generator = LocalGenerator(model_dir, threads=threads, provider=provider)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"local-{name}")
        #: How generations ended (stop, length, cancelled), for metrics and tests.
        self.finished: Counter[str] = Counter()

    # -- request translation ------------------------------------------------------------------------
    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.kind == "chat":
            try:
                text = self.generator.chat_prompt(request.messages)
            except Exception as exc:  # a template that cannot render these messages
                raise BackendError(FailureKind.BAD_REQUEST, f"{self.name}: cannot apply the chat template: {exc}") \
                    from exc
        else:
            text = request.prompt
        ids = self.generator.encode(text)
        if len(ids) >= self.generator.session.info.context_length:
            raise BackendError(FailureKind.CONTEXT_WINDOW, f"{self.name}: the prompt has {len(ids)} tokens; "
                               f"the context is {self.generator.session.info.context_length}")
        return ids

    def _params(self, request: GenerationRequest) -> tuple[SamplingParams, int, list[str], bool]:
        p = request.params
        for name, reason in UNSUPPORTED.items():
            if p.get(name) not in (None, {"type": "text"}):
                raise BackendError(FailureKind.BAD_REQUEST, f"{self.name}: {name}: {reason}")
        if request.kind == "chat":
            want_logprobs, top = bool(p.get("logprobs")), int(p.get("top_logprobs") or 0)
        else:
            want_logprobs, top = p.get("logprobs") is not None, int(p.get("logprobs") or 0)
        bias = tuple((int(k), float(v)) for k, v in (p.get("logit_bias") or {}).items())
        params = SamplingParams(
            temperature=float(p.get("temperature", 1.0)),
            top_p=float(p.get("top_p", 1.0)),
            seed=p.get("seed"),
            top_logprobs=top,
            presence_penalty=float(p.get("presence_penalty") or 0.0),
            frequency_penalty=float(p.get("frequency_penalty") or 0.0),
            logit_bias=bias,
        )
        max_tokens = int(p.get("max_completion_tokens") or p.get("max_tokens") or DEFAULT_MAX_TOKENS)
        stop = p.get("stop") or []
        return params, max_tokens, [stop] if isinstance(stop, str) else list(stop), want_logprobs

    def _steps(self, request: GenerationRequest, index: int, state: Generation,
               cancel: threading.Event) -> Iterator[Step]:
        params, max_tokens, stop, want_logprobs = self._params(request)
        if params.seed is not None and index:
            params = dataclasses.replace(params, seed=params.seed + index)  # n > 1: a different draw per choice
        return self.generator.stream(self._prompt_ids(request), params, max_tokens, stop, state, cancel,
                                     want_logprobs)

    @staticmethod
    def _logprobs(steps: list[Step]) -> list[TokenLogprob]:
        return [TokenLogprob(s.token_text, s.logprob, [TopLogprob(t, lp) for t, lp in s.top])
                for s in steps if s.token_id >= 0]

    # -- the protocol ------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        started = time.perf_counter()
        choices: list[Choice] = []
        usage = Usage()
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        try:
            for index in range(int(request.params.get("n", 1))):
                state = Generation()

                def run(index: int = index, state: Generation = state) -> list[Step]:
                    return list(self._steps(request, index, state, cancel))

                steps = await loop.run_in_executor(self._executor, run)
                self.finished[state.finish_reason or "unknown"] += 1
                want = bool(request.params.get("logprobs"))
                choices.append(Choice(index, state.text, state.finish_reason, self._logprobs(steps) if want else None))
                usage.prompt_tokens = state.prompt_tokens
                usage.completion_tokens += state.completion_tokens
        except asyncio.CancelledError:
            cancel.set()
            raise
        except ValueError as exc:
            raise BackendError(FailureKind.BAD_REQUEST, f"{self.name}: {exc}") from exc
        return GenerationResult(self.name, choices, usage, time.perf_counter() - started,
                                self.price.cost(usage.prompt_tokens, usage.completion_tokens))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        n = int(request.params.get("n", 1))
        want = bool(request.params.get("logprobs"))
        usage = Usage()

        def produce() -> None:
            try:
                for index in range(n):
                    state = Generation()
                    for step in self._steps(request, index, state, cancel):
                        loop.call_soon_threadsafe(queue.put_nowait, (index, step))
                    self.finished[state.finish_reason or "unknown"] += 1
                    if state.finish_reason == "cancelled":
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, (index, state))
            except BaseException as exc:  # delivered to the consumer, which raises it
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        future = loop.run_in_executor(self._executor, produce)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    if isinstance(item, BackendError):
                        raise item
                    raise BackendError(FailureKind.BAD_REQUEST, f"{self.name}: {item}") from item
                index, payload = item
                if isinstance(payload, Generation):
                    usage.prompt_tokens = payload.prompt_tokens
                    usage.completion_tokens += payload.completion_tokens
                    yield StreamChunk(index=index, finish_reason=payload.finish_reason)
                elif payload.text or (want and payload.token_id >= 0):
                    yield StreamChunk(index=index, text=payload.text,
                                      logprobs=self._logprobs([payload]) if want else None)
        finally:
            cancel.set()  # the consumer left (or finished): stop generating, free the cache
            if not future.done():
                await asyncio.shield(future)  # the producer stops within one token
        yield StreamChunk(usage=usage, cost_usd=self.price.cost(usage.prompt_tokens, usage.completion_tokens))

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
