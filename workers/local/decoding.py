"""One sequence's side of generation: from each step's logits to the next token and the text it adds.

The engine (`workers.local.engine`) runs the model for many sequences at once and hands every sequence its
own row of logits; `SequenceDecoder` turns that row into a token, applying sampling, penalties, stop ids,
stop strings (text that may start one is held back), `max_tokens`, log-probs and incremental UTF-8-safe
detokenization, and says when the sequence is finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workers.local.detokenize import IncrementalDecoder
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
    #: Prompt tokens whose keys and values came from the prefix cache instead of being computed.
    cached_tokens: int = 0


class SequenceDecoder:
    """Chooses a sequence's tokens; `feed(logits)` returns the steps to emit and the token to run next
    (None once the sequence is finished, with `state.finish_reason` set)."""

    def __init__(self, tokenizer: Any, stop_ids: frozenset[int], params: SamplingParams, max_tokens: int,
                 stop: list[str], state: Generation, want_logprobs: bool = False) -> None:
        self._tokenizer = tokenizer
        self._stop_ids = stop_ids
        self._sampler = Sampler(params)
        self._detokenizer = IncrementalDecoder(tokenizer)
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._held = ""  # text not yet released (could be the start of a stop sequence)
        self._pending: list[Step] = []  # steps whose text is held back
        self._counts: dict[int, int] = {}
        self.max_tokens = max_tokens
        self.state = state
        self.want_logprobs = want_logprobs

    def token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def feed(self, logits: np.ndarray) -> tuple[list[Step], int | None]:
        state = self.state
        logits = self._sampler.adjust(logits, self._counts)
        token = self._sampler.choose(logits)
        if token in self._stop_ids:
            return self._finish("stop", flush=True), None
        state.completion_tokens += 1
        self._counts[token] = self._counts.get(token, 0) + 1
        logprob, top = self._sampler.logprobs(logits, token) if self.want_logprobs else (0.0, [])
        self._held += self._detokenizer.push(token)
        self._pending.append(Step(token, "", logprob, [(self.token_text(i), lp) for i, lp in top],
                                  self.token_text(token) if self.want_logprobs else ""))
        cut = min((self._held.find(s) for s in self._stop if s in self._held), default=-1)
        if cut >= 0:
            self._held = self._held[:cut]
            return self._finish("stop", flush=False), None
        out: list[Step] = []
        release = len(self._held) - self._hold if self._stop else len(self._held)
        if release > 0:
            self._pending[-1].text = self._held[:release]
            state.text += self._held[:release]
            self._held = self._held[release:]
            out, self._pending = self._pending, []
        if state.completion_tokens >= self.max_tokens:
            return out + self._finish("length", flush=True), None
        return out, token

    def cancel(self) -> None:
        self.state.finish_reason = "cancelled"

    def _finish(self, reason: str, flush: bool) -> list[Step]:
        """The held-back text (and the steps that carried it) once the sequence ends."""
        self.state.finish_reason = reason
        if flush:
            self._held += self._detokenizer.flush()
        pending, held = self._pending, self._held
        self._pending, self._held = [], ""
        if not (pending or held):
            return []
        if pending:
            pending[-1].text += held
        else:
            pending = [Step(-1, held, 0.0)]
        self.state.text += held
        return pending
