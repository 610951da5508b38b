"""Choosing the next token: greedy or sampled (temperature, top-k, top-p, seed), with log-probs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    #: How many alternatives to report with each token's log-prob (0 = none).
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: token id -> added to its logit (OpenAI's logit_bias)
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def adjust(self, logits: np.ndarray, counts: dict[int, int]) -> np.ndarray:
        """OpenAI's logit_bias and presence/frequency penalties (a copy; unchanged when none apply)."""
        p = self.params
        if not (p.logit_bias or (counts and (p.presence_penalty or p.frequency_penalty))):
            return logits
        adjusted = logits.astype(np.float32, copy=True)
        for token, bias in p.logit_bias:
            adjusted[token] += bias
        for token, count in counts.items():
            adjusted[token] -= p.presence_penalty + p.frequency_penalty * count
        return adjusted

    def choose(self, logits: np.ndarray) -> int:
        """The next token id from one position's logits [vocab]."""
        p = self.params
        if p.greedy:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / p.temperature
        if 0 < p.top_k < scaled.size:
            kth = np.partition(scaled, -p.top_k)[-p.top_k]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, p.top_p) + 1)]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self._rng.choice(probs.size, p=probs))

    def logprobs(self, logits: np.ndarray, token: int) -> tuple[float, list[tuple[int, float]]]:
        """The chosen token's log-prob under the model (temperature 1) and the top alternatives."""
        logp = log_softmax(logits)
        top: list[tuple[int, float]] = []
        n = self.params.top_logprobs
        if n > 0:
            ids = np.argpartition(-logp, n)[:n]
            ids = ids[np.argsort(-logp[ids])]
            top = [(int(i), float(logp[i])) for i in ids]
        return float(logp[token]), top
