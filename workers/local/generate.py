"""Text generation on a local decoder: prompt in, tokens out one by one, with everything the gateway
reports (text increments, finish reason, usage, log-probs) and cooperative cancellation."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.local.detokenize import IncrementalDecoder
from workers.local.gguf_tokenizer import load_tokenizer
from workers.local.runtime import DecoderSession
from workers.local.sampling import Sampler, SamplingParams


@dataclass(slots=True)
class Step:
    """One generated token and the text it completed."""

    token_id: int
    text: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)
    token_text: str = ""


@dataclass(slots=True)
class Generation:
    """The state of one generation, filled in as it runs."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    text: str = ""


class LocalGenerator:
    """A built decoder with its tokenizer and chat template."""

    def __init__(self, model_dir: Path, *, threads: int | None = None, provider: str = "auto") -> None:
        self.session = DecoderSession(model_dir, threads=threads, provider=provider)
        bundle = load_tokenizer(model_dir)
        self.tokenizer = bundle.tokenizer
        self.info = bundle.info
        self.template = bundle.chat_template
        self.stop_ids = frozenset(self.info.stop_ids)
        # One sequence at a time per model: the session and cache are not shared between threads.
        self.lock = threading.Lock()

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        return self.template.render(messages, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=self.info.add_bos).ids

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def stream(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, stop: list[str],
               state: Generation, cancel: threading.Event | None = None, want_logprobs: bool = False,
               ) -> Iterator[Step]:
        """Generate after `prompt_ids`; `state` ends with the finish reason and counts.

        Text that might be the start of a stop sequence is held back until it is clear that it is not.
        """
        with self.lock:
            yield from self._stream(prompt_ids, params, max_tokens, stop, state, cancel, want_logprobs)

    def _stream(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, stop: list[str],
                state: Generation, cancel: threading.Event | None, want_logprobs: bool) -> Iterator[Step]:
        state.prompt_tokens = len(prompt_ids)
        capacity = self.session.info.context_length
        if len(prompt_ids) >= capacity:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this model's context is {capacity}")
        budget = min(max_tokens, capacity - len(prompt_ids))
        cache = self.session.new_cache(len(prompt_ids) + budget)
        sampler = Sampler(params)
        decoder = IncrementalDecoder(self.tokenizer)
        logits = self.session.forward(prompt_ids, cache, logits_to_keep=1)[-1]
        stopped_by_string = False
        held = ""  # text not yet released (could be the start of a stop sequence)
        hold = max((len(s) for s in stop), default=1) - 1
        pending: list[Step] = []
        counts: dict[int, int] = {}
        while True:
            if cancel is not None and cancel.is_set():
                state.finish_reason = "cancelled"
                return
            logits = sampler.adjust(logits, counts)
            token = sampler.choose(logits)
            if token in self.stop_ids:
                state.finish_reason = "stop"
                break
            state.completion_tokens += 1
            counts[token] = counts.get(token, 0) + 1
            logprob, top = sampler.logprobs(logits, token) if want_logprobs else (0.0, [])
            held += decoder.push(token)
            step = Step(token, "", logprob, [(self.token_text(i), lp) for i, lp in top],
                        self.token_text(token) if want_logprobs else "")
            pending.append(step)
            cut = min((held.find(s) for s in stop if s and s in held), default=-1)
            if cut >= 0:
                held = held[:cut]
                state.finish_reason = "stop"
                stopped_by_string = True
                break
            release = len(held) - hold if stop else len(held)
            if release > 0:
                pending[-1].text = held[:release]
                state.text += held[:release]
                held = held[release:]
                yield from pending
                pending = []
            if state.completion_tokens >= budget:
                state.finish_reason = "length"
                break
            logits = self.session.forward([token], cache, logits_to_keep=1)[-1]
        if not stopped_by_string:
            held += decoder.flush()
        if pending or held:
            if pending:
                pending[-1].text += held
            else:
                pending = [Step(-1, held, 0.0)]
            state.text += held
            yield from pending
