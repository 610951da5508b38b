"""A built decoder with its tokenizer, chat template and engine: prompt in, tokens out.

`LocalGenerator.stream` is the synchronous way in (the CLI, tests, benchmarks); the gateway's
`LocalBackend` submits to the same engine asynchronously. Either way every sequence goes through the
engine's batch (`workers.local.engine`), so concurrent callers decode together.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from workers.local.decoding import Generation, SequenceDecoder, Step
from workers.local.engine import Engine, EngineConfig, Sequence
from workers.local.gguf_tokenizer import load_tokenizer
from workers.local.runtime import DecoderSession
from workers.local.sampling import SamplingParams

__all__ = ["Generation", "LocalGenerator", "Step"]

_DONE = object()


class LocalGenerator:
    def __init__(self, model_dir: Path, *, threads: int | None = None, provider: str = "auto",
                 engine: EngineConfig | None = None) -> None:
        self.session = DecoderSession(model_dir, threads=threads, provider=provider)
        bundle = load_tokenizer(model_dir)
        self.tokenizer = bundle.tokenizer
        self.info = bundle.info
        self.template = bundle.chat_template
        self.stop_ids = frozenset(self.info.stop_ids)
        self.engine = Engine(self.session, engine, name=self.session.info.name)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        return self.template.render(messages, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=self.info.add_bos).ids

    def sequence(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, stop: list[str],
                 state: Generation, on_step: Callable[[Step], None], on_done: Callable[[BaseException | None], None],
                 want_logprobs: bool = False, salt: str | None = None) -> Sequence:
        """A sequence for `self.engine.submit`."""
        decoder = SequenceDecoder(self.tokenizer, self.stop_ids, params, max_tokens, stop, state, want_logprobs)
        return Sequence(list(prompt_ids), decoder, on_step, on_done, salt=salt)

    def stream(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, stop: list[str],
               state: Generation, cancel: threading.Event | None = None, want_logprobs: bool = False,
               salt: str | None = None) -> Iterator[Step]:
        """Generate after `prompt_ids`, blocking; `state` ends with the finish reason and counts. Setting
        `cancel`, or closing the iterator, stops the sequence and frees its slot."""
        events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        sequence = self.sequence(prompt_ids, params, max_tokens, stop, state, events.put,
                                 lambda error: events.put(error if error is not None else _DONE), want_logprobs,
                                 salt)
        self.engine.submit(sequence)
        try:
            while (item := events.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
                if cancel is not None and cancel.is_set():
                    self.engine.cancel(sequence)
        finally:
            if not sequence.done:
                self.engine.cancel(sequence)

    def close(self) -> None:
        self.engine.close()
