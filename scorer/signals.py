"""What a local model's answer says about itself: the judge's features (docs/cascade.md, "The local judge").

Computed the same way when the judge is trained (from cached outcomes, `scorer.fit.outcomes`) and when it
judges live answers (`scorer.judge.LocalJudge`, from the `GenerationResult`):

- token log-probs: mean, min, first and last token, the first token's margin over the runner-up, and the
  entropy of the top-k alternatives (mean, max, first token);
- self-consistency: the share of the sampled answers that agree with the answer (same letter for multiple
  choice, same yes/no, same normalised text for short answers, MiniLM cosine for long ones) and the share of
  distinct answers among answer and samples;
- the answer's form: length in tokens and characters, cut off by `max_tokens`, a refusal, repetition, an
  echo of the question, a readable letter or yes/no where the query asks for one;
- the query: its kind (`scorer.answers.task_kind`) and length.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scorer.answers import TASK_KINDS, answer_key, normalize, options_of, task_kind

#: Bumped whenever a feature's meaning changes: a judge trained on other features refuses to load.
SIGNALS_VERSION = 1
#: Answers longer than this many words are compared by MiniLM cosine instead of normalised text.
LONG_WORDS = 8
_REFUSAL = re.compile(r"\b(i'?m sorry|i cannot|i can'?t|i do not know|i don'?t know|as an ai|i am unable|"
                      r"i'm unable|not able to)\b", re.IGNORECASE)

FEATURE_NAMES: tuple[str, ...] = (
    "mean_logprob", "min_logprob", "first_logprob", "last_logprob", "first_margin",
    "mean_entropy", "max_entropy", "first_entropy",
    "log_tokens", "log_chars", "truncated", "refusal", "repetition", "echo", "readable",
    "agreement", "distinct_share",
    "log_query_chars", *(f"kind_{kind}" for kind in TASK_KINDS),
)
#: Features that need the samples (0 without them).
SAMPLE_FEATURES = ("agreement", "distinct_share")

Embed = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class JudgeSettings:
    """What a judged local tier is asked for beside its answer (`router.judge.judge_request`)."""

    #: Extra answers sampled for self-consistency (0 = none).
    samples: int = 4
    #: Alternatives reported with each token's log-prob (for the top-k entropy).
    top_logprobs: int = 5
    #: The answer length the judge's training outcomes were generated with (`max_tokens`).
    max_tokens: int = 64
    #: The samples' temperature.
    sample_temperature: float = 0.7

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "top_logprobs": self.top_logprobs, "max_tokens": self.max_tokens,
                "sample_temperature": self.sample_temperature}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JudgeSettings:
        return cls(int(data["samples"]), int(data["top_logprobs"]), int(data["max_tokens"]),
                   float(data.get("sample_temperature", 0.7)))


JUDGE_SETTINGS = JudgeSettings()


@dataclass(frozen=True)
class AnswerSignals:
    """An answer with what the local model reported while writing it."""

    text: str
    finish_reason: str | None
    #: Per token: its log-prob and the log-probs of the top alternatives (best first).
    logprobs: Sequence[float] = ()
    top: Sequence[Sequence[float]] = ()
    samples: Sequence[str] = field(default_factory=tuple)


def _entropy(top: Sequence[float]) -> float:
    if not top:
        return 0.0
    p = np.exp(np.asarray(top, dtype=np.float64))
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p / total
    return float(-(p * np.log(np.clip(p, 1e-12, 1.0))).sum())


def _repetition(text: str) -> float:
    words = text.lower().split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _echo(query: str, text: str) -> float:
    """Share of the answer's words that are in the query (a small model often repeats the question)."""
    said = normalize(text).split()
    if not said:
        return 0.0
    asked = set(normalize(query).split())
    return sum(w in asked for w in said) / len(said)


def agreement(query: str, text: str, samples: Sequence[str], embed: Embed | None = None) -> tuple[float, float]:
    """(share of samples agreeing with the answer, share of distinct answers among answer and samples)."""
    if not samples:
        return 0.0, 0.0
    kind = task_kind(query)
    options = options_of(query) if kind == "multiple_choice" else {}
    letters = tuple(options) or ("A", "B", "C", "D")
    long = kind not in ("multiple_choice", "yes_no") and max(len(t.split()) for t in (text, *samples)) > LONG_WORDS
    if long and embed is not None:
        vectors = embed([text, *samples])
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)
        cosines = vectors[1:] @ vectors[0]
        pairwise = vectors @ vectors.T
        distinct = 1 + sum(1 for i in range(1, len(vectors)) if (pairwise[i, :i] < 0.9).all())
        return float(np.clip(cosines, 0.0, 1.0).mean()), distinct / len(vectors)
    keys = [answer_key(kind, t, letters, options) for t in (text, *samples)]
    mine = keys[0]
    agree = sum(1 for k in keys[1:] if k is not None and k == mine) / len(samples)
    return agree, len(set(keys)) / len(keys)


def features(query: str, signals: AnswerSignals, embed: Embed | None = None, use_samples: bool = True) -> np.ndarray:
    """The judge's feature vector (`FEATURE_NAMES`), float32."""
    lps = np.asarray(signals.logprobs, dtype=np.float64)
    lps = lps[np.isfinite(lps)] if lps.size else lps
    entropies = [_entropy(t) for t in signals.top]
    first_top = list(signals.top[0]) if signals.top else []
    kind = task_kind(query)
    text = signals.text
    readable = 1.0
    if kind in ("multiple_choice", "yes_no"):
        options = options_of(query)
        readable = float(answer_key(kind, text, tuple(options) or ("A", "B", "C", "D"), options) is not None)
    agree, distinct = agreement(query, text, signals.samples, embed) if use_samples else (0.0, 0.0)
    values = [
        float(lps.mean()) if lps.size else -10.0,
        float(lps.min()) if lps.size else -10.0,
        float(lps[0]) if lps.size else -10.0,
        float(lps[-1]) if lps.size else -10.0,
        float(first_top[0] - first_top[1]) if len(first_top) > 1 else 0.0,
        float(np.mean(entropies)) if entropies else 0.0,
        float(np.max(entropies)) if entropies else 0.0,
        entropies[0] if entropies else 0.0,
        math.log1p(len(signals.logprobs)),
        math.log1p(len(text)),
        float(signals.finish_reason == "length"),
        float(bool(_REFUSAL.search(text))),
        _repetition(text),
        _echo(query, text),
        readable,
        agree,
        distinct,
        math.log1p(len(query)),
        *(float(kind == k) for k in TASK_KINDS),
    ]
    return np.asarray(values, dtype=np.float32)
