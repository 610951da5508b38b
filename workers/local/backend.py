"""The local tier as a `Backend`: `model: local/smollm2-135m-instruct` answers through the same
protocol as any remote provider. Requests are submitted to the model's engine (`workers.local.engine`),
which decodes concurrent requests together in its own thread; the event loop only receives their steps.
A caller that goes away (a client that disconnects) cancels its sequences and frees their slots; a full
queue is refused at once (`FailureKind.OVERLOADED`, with a Retry-After) rather than left to grow."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator
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
from workers.local.decoding import Generation, Step
from workers.local.engine import EngineConfig, Overloaded, Sequence
from workers.local.generate import LocalGenerator
from workers.local.sampling import SamplingParams
from workers.pricing import TokenPrice

DEFAULT_MAX_TOKENS = 512
UNSUPPORTED = {"response_format": "structured output is not supported by local models yet"}
_DONE = object()


class LocalBackend:
    """`Backend` over a `LocalGenerator`."""

    def __init__(self, name: str, model_dir: Path, *, price: TokenPrice | None = None, threads: int | None = None,
                 provider: str = "auto", engine: EngineConfig | None = None, isolate_tenants: bool = False) -> None:
        self.name = name
        self.price = price or TokenPrice()
        self.generator = LocalGenerator(model_dir, threads=threads, provider=provider, engine=engine)
        self.engine = self.generator.engine
        #: Tenants never share cached keys and values when set (the prefix cache is salted with the tenant).
        self.isolate_tenants = isolate_tenants
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
        if len(ids) >= self.engine.capacity:
            raise BackendError(FailureKind.CONTEXT_WINDOW, f"{self.name}: the prompt has {len(ids)} tokens; "
                               f"this model serves at most {self.engine.capacity} (prompt and answer)")
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

    def _sequences(self, request: GenerationRequest, on_step: Any, on_done: Any) -> list[tuple[Sequence, Generation]]:
        """One engine sequence per choice (`n`), then one per self-consistency sample (`request.samples`,
        numbered after the choices); `on_step(index, step)` (choices only), `on_done(index, error)`. The
        choices are submitted first, so the samples find the prompt's keys and values in the prefix cache."""
        prompt = self._prompt_ids(request)
        params, max_tokens, stop, want_logprobs = self._params(request)
        salt = request.tenant if self.isolate_tenants else None
        choices = int(request.params.get("n", 1))
        made = []
        for index in range(choices + max(0, request.samples)):
            choice_params, logprobs = params, want_logprobs
            if index >= choices:  # a sample: drawn at the judge's temperature, seeded by its number
                choice_params = dataclasses.replace(params, temperature=request.sample_temperature, top_p=1.0,
                                                    seed=index - choices, top_logprobs=0)
                logprobs = False
            elif params.seed is not None and index:
                choice_params = dataclasses.replace(params, seed=params.seed + index)  # a different draw per choice
            state = Generation()

            def done(error: BaseException | None, index: int = index, state: Generation = state) -> None:
                self.finished[state.finish_reason or "error"] += 1
                on_done(index, error)

            def step(step: Step, index: int = index) -> None:
                if index < choices:
                    on_step(index, step)

            sequence = self.generator.sequence(prompt, choice_params, max_tokens, stop, state, step, done,
                                               logprobs, salt)
            made.append((sequence, state))
        return made

    def _submit(self, sequences: list[tuple[Sequence, Generation]]) -> None:
        try:
            for sequence, _ in sequences:
                self.engine.submit(sequence)
        except Overloaded as exc:
            for sequence, _ in sequences:
                self.engine.cancel(sequence)
            raise BackendError(FailureKind.OVERLOADED, f"{self.name}: {exc}", status=503,
                               retry_after_s=exc.retry_after_s) from exc
        except ValueError as exc:
            for sequence, _ in sequences:
                self.engine.cancel(sequence)
            raise BackendError(FailureKind.CONTEXT_WINDOW, f"{self.name}: {exc}") from exc

    @staticmethod
    def _logprobs(steps: list[Step]) -> list[TokenLogprob]:
        return [TokenLogprob(s.token_text, s.logprob, [TopLogprob(t, lp) for t, lp in s.top])
                for s in steps if s.token_id >= 0]

    # -- the protocol ------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        steps: dict[int, list[Step]] = {}
        waiting: dict[int, asyncio.Future[None]] = {}

        def on_step(index: int, step: Step) -> None:
            _call_soon(loop, steps.setdefault(index, []).append, step)

        def on_done(index: int, error: BaseException | None) -> None:
            _call_soon(loop, _settle, waiting[index], error)

        sequences = self._sequences(request, on_step, on_done)
        waiting.update({i: loop.create_future() for i in range(len(sequences))})
        self._submit(sequences)
        try:
            await asyncio.gather(*waiting.values())
        except asyncio.CancelledError:
            for sequence, _ in sequences:
                self.engine.cancel(sequence)
            raise
        except Exception as exc:
            raise BackendError(FailureKind.SERVER, f"{self.name}: the local engine failed: {exc}") from exc
        want = bool(request.params.get("logprobs"))
        count = int(request.params.get("n", 1))
        choices, usage = [], Usage()
        for index, (_, state) in enumerate(sequences[:count]):
            choices.append(Choice(index, state.text, state.finish_reason,
                                  self._logprobs(steps.get(index, [])) if want else None))
            usage.prompt_tokens = state.prompt_tokens
            usage.completion_tokens += state.completion_tokens
        samples = [state for _, state in sequences[count:]]
        return GenerationResult(self.name, choices, usage, time.perf_counter() - started,
                                self.price.cost(usage.prompt_tokens, usage.completion_tokens),
                                samples=[s.text for s in samples],
                                sample_tokens=sum(s.completion_tokens for s in samples))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        """The answer token by token (self-consistency samples are only drawn by `generate`)."""
        if request.samples:
            request = dataclasses.replace(request, samples=0)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        want = bool(request.params.get("logprobs"))
        sequences = self._sequences(
            request, lambda i, step: _call_soon(loop, events.put_nowait, (i, step)),
            lambda i, error: _call_soon(loop, events.put_nowait, (i, error or _DONE)))
        self._submit(sequences)
        usage = Usage()
        open_choices = len(sequences)
        try:
            while open_choices:
                index, item = await events.get()
                if isinstance(item, BaseException):
                    raise BackendError(FailureKind.SERVER, f"{self.name}: the local engine failed: {item}") from item
                if item is _DONE:
                    open_choices -= 1
                    state = sequences[index][1]
                    usage.prompt_tokens = state.prompt_tokens
                    usage.completion_tokens += state.completion_tokens
                    yield StreamChunk(index=index, finish_reason=state.finish_reason)
                elif item.text or (want and item.token_id >= 0):
                    yield StreamChunk(index=index, text=item.text, logprobs=self._logprobs([item]) if want else None)
        finally:
            for sequence, _ in sequences:  # the consumer left (or finished): stop generating, free the slots
                if not sequence.done:
                    self.engine.cancel(sequence)
        yield StreamChunk(usage=usage, cost_usd=self.price.cost(usage.prompt_tokens, usage.completion_tokens))

    def stats(self) -> dict[str, float]:
        """The engine's and prefix cache's state and counters, for metrics."""
        engine = self.engine
        values: dict[str, float] = {"queue_depth": engine.waiting, "batch_size": engine.running,
                                    "batch_occupancy": engine.running / engine.config.max_batch, **engine.stats}
        cache = engine.cache
        if cache is not None:
            values.update({"prefix_cache_bytes": cache.bytes_held, "prefix_cache_blocks": cache.blocks,
                           "prefix_cache_evictions": cache.evictions, "prefix_cache_lookups": cache.lookups,
                           "prefix_cache_hit_lookups": cache.hit_lookups})
        return values

    async def aclose(self) -> None:
        await asyncio.to_thread(self.generator.close)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    """Hand an engine event to the caller's loop; a caller whose loop has closed (it left, e.g. a pool worker's
    finished task) no longer wants it."""
    if loop.is_closed():
        return
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # closed between the check and the call
        pass


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
