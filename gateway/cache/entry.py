"""A cached answer: what the client was sent, and what it cost the first time (the saving of each hit)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from workers.backend import Choice, GenerationResult, TokenLogprob, TopLogprob, Usage


def _logprobs_out(logprobs: list[TokenLogprob] | None) -> list[list[Any]] | None:
    if logprobs is None:
        return None
    return [[lp.token, lp.logprob, [[t.token, t.logprob] for t in lp.top]] for lp in logprobs]


def _logprobs_in(raw: list[list[Any]] | None) -> list[TokenLogprob] | None:
    if raw is None:
        return None
    return [TokenLogprob(token, logprob, [TopLogprob(t, lp) for t, lp in top]) for token, logprob, top in raw]


@dataclass(slots=True)
class CachedResponse:
    #: The model that produced the answer.
    model: str
    choices: list[Choice]
    usage: Usage
    #: What producing it cost (every attempt, every tier): what each hit saves.
    cost_usd: float
    stored_at: float = field(default_factory=time.time)
    #: The question it answers (the semantic cache's verifier compares a new question with it).
    question: str | None = None

    @classmethod
    def from_result(cls, result: GenerationResult, cost_usd: float, now: float | None = None) -> CachedResponse:
        return cls(result.model, list(result.choices), result.usage, cost_usd,
                   time.time() if now is None else now)

    def to_bytes(self) -> bytes:
        return orjson.dumps({
            "model": self.model,
            "choices": [[c.index, c.text, c.finish_reason, _logprobs_out(c.logprobs), c.tool_calls]
                        for c in self.choices],
            "usage": [self.usage.prompt_tokens, self.usage.completion_tokens, self.usage.estimated],
            "cost_usd": self.cost_usd,
            "stored_at": self.stored_at,
            "question": self.question,
        })

    @classmethod
    def from_bytes(cls, raw: bytes) -> CachedResponse:
        """Raises ValueError (or KeyError/TypeError) for bytes that are not a cached response."""
        body = orjson.loads(raw)
        prompt_tokens, completion_tokens, estimated = body["usage"]
        return cls(
            model=body["model"],
            choices=[Choice(c[0], c[1], c[2], _logprobs_in(c[3]), c[4] if len(c) > 4 else None)
                     for c in body["choices"]],
            usage=Usage(prompt_tokens, completion_tokens, estimated),
            cost_usd=float(body["cost_usd"]),
            stored_at=float(body["stored_at"]),
            question=body.get("question"),
        )

    def age_s(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.stored_at)
