"""A judged tier: what a cascade asks of a model whose answers a judge reads beyond their text.

A local model's judge (`scorer.judge.LocalJudge`) reads the answer's token log-probs with their top
alternatives and a few extra sampled answers (self-consistency). `judge_request` turns the client's request
into the one the tier is sent: the same messages and parameters, plus those signals; `signals_of` gives the
judge what came back. The cascade strips the extras from the answer before the client sees it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import numpy as np

from scorer.signals import AnswerSignals, JudgeSettings
from workers.backend import GenerationRequest, GenerationResult


def judge_request(request: GenerationRequest, settings: JudgeSettings) -> GenerationRequest:
    """`request` asking also for token log-probs (with `settings.top_logprobs` alternatives) and
    `settings.samples` self-consistency samples."""
    params = dict(request.params)
    if request.kind == "chat":
        params["logprobs"] = True
        params["top_logprobs"] = max(settings.top_logprobs, int(params.get("top_logprobs") or 0))
    else:
        params["logprobs"] = max(settings.top_logprobs, int(params.get("logprobs") or 0))
    return replace(request, params=params, samples=settings.samples, sample_temperature=settings.sample_temperature)


def signals_of(result: GenerationResult) -> AnswerSignals:
    """The first choice of an answer with its log-probs and the samples, as a judge reads them."""
    choice = result.choices[0] if result.choices else None
    if choice is None:
        return AnswerSignals("", None)
    logprobs = choice.logprobs or []
    return AnswerSignals(choice.text, choice.finish_reason, [lp.logprob for lp in logprobs],
                         [[t.logprob for t in lp.top] for lp in logprobs], tuple(result.samples))


class TierJudge(Protocol):
    """P(correct) of one tier's answer from the answer itself and its signals."""

    settings: JudgeSettings
    #: Which judge (an artifact's content hash): recorded with each score.
    version: str

    def assess(self, query: str, signals: AnswerSignals) -> tuple[float, np.ndarray]:
        """The score and the feature vector it was computed from."""
        ...
