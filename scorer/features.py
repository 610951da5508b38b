"""The scorer's input: a fixed-length float vector for one (query, answer, model) triple.

Three groups, all computed in numpy from text and the model's own signals, so the gateway and training
compute the very same vector:

- signals: the model's confidence (summed token log-prob, where the provider gave one; also the log of its
  negation, the surprisal, which orders confident answers), answer length in
  characters, words and lines, refusal and hedging patterns, the answer's form (a bare choice letter,
  yes/no, code);
- the query: hashed word unigrams and bigrams (what kind of question it is, how hard);
- the answer: hashed word unigrams and bigrams, plus the whole short answer as one token (which choice a
  model picked matters for models that pick one letter most of the time);
- agreement: in a cascade, the answers of the tiers already tried. Whether this answer agrees with the
  previous tier's (and how good that tier is) is the strongest signal there is for answers that carry no
  confidence, such as a bare choice letter.

Hashing is CRC-32 of the UTF-8 token (stable across processes, unlike `hash`), signed, into a fixed
number of buckets, then L2-normalised per group.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)
_REFUSAL = re.compile(
    r"\b(i can(?:no|')t|i cannot|i'm sorry|i am sorry|i apologi[sz]e|as an ai|i do(?: not|n't) know|"
    r"unfortunately|i'm not able|i am not able|i'm unable|i am unable|not enough information|"
    r"cannot be determined|i do not|i don't)\b",
    re.IGNORECASE,
)
_HEDGE = re.compile(r"\b(maybe|perhaps|possibly|probably|likely|might|not sure|i think|i believe)\b", re.IGNORECASE)
_CHOICE = re.compile(r"^\s*\(?([A-Ja-j])\)?[\s.):]*$")
_YES_NO = re.compile(r"^\s*(yes|no)\b", re.IGNORECASE)

#: A confidence below this is treated as this (log-probs of -inf or of very long answers).
CONFIDENCE_FLOOR = -30.0
#: The smallest surprisal (minus the log-prob) told apart by `log_surprisal`.
SURPRISAL_FLOOR = 1e-8
#: Bumped when the vectors change; a scorer trained on other vectors is refused at load.
FEATURE_VERSION = 2
SIGNALS = (
    "has_confidence", "confidence", "p_confidence", "log_surprisal", "log_chars", "log_words", "log_lines", "empty",
    "refusal", "hedge", "choice_letter", "yes_no", "code", "digits", "log_query_chars",
    "has_previous", "agrees_with_previous", "previous_accuracy", "agreeing_previous_accuracy", "agree_share",
)
_TRAILING = ".!,;:)\"' \n\t"


def normalized_answer(answer: str) -> str:
    """The form in which two answers are compared for agreement: case, spacing and end punctuation folded."""
    return " ".join(answer.strip().lower().split())[:300].rstrip(_TRAILING)


@dataclass(frozen=True, slots=True)
class Previous:
    """The answer of a tier tried before this one, and that model's accuracy on the training data."""

    answer: str
    accuracy: float



@dataclass(frozen=True)
class FeatureSpec:
    """How vectors are built; saved with a trained scorer so serving builds the same ones."""

    query_buckets: int = 256
    answer_buckets: int = 64
    version: int = FEATURE_VERSION

    @property
    def size(self) -> int:
        return len(SIGNALS) + self.query_buckets + self.answer_buckets

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeatureSpec:
        return cls(**data)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _hash_into(out: np.ndarray, tokens: list[str]) -> None:
    """Signed feature hashing of `tokens` into `out`, then L2 normalisation."""
    buckets = out.shape[0]
    for token in tokens:
        h = zlib.crc32(token.encode())
        out[h % buckets] += 1.0 if (h >> 31) & 1 else -1.0
    norm = float(np.sqrt(np.dot(out, out)))
    if norm > 0:
        out /= norm


def _ngrams(tokens: list[str]) -> list[str]:
    return tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:], strict=False)]


def signals(query: str, answer: str, confidence: float | None, previous: Sequence[Previous] = ()) -> list[float]:
    """The model-signal, answer-form and agreement features, in `SIGNALS` order."""
    has_conf = confidence is not None and not math.isnan(confidence)
    conf = max(CONFIDENCE_FLOOR, float(confidence)) if has_conf else 0.0  # type: ignore[arg-type]
    stripped = answer.strip()
    n_words = len(_WORD.findall(stripped))
    return [
        1.0 if has_conf else 0.0,
        conf,
        math.exp(conf) if has_conf else 0.0,
        # Confident answers' log-probs crowd near 0 (-1e-6 against -1e-3): their order shows on a log scale
        # of the surprisal, which a linear term in the log-prob cannot see (version 2; docs/scorer.md).
        math.log(max(-conf, SURPRISAL_FLOOR)) if has_conf else 0.0,
        math.log1p(len(stripped)),
        math.log1p(n_words),
        math.log1p(stripped.count("\n")),
        0.0 if stripped else 1.0,
        1.0 if _REFUSAL.search(stripped[:400]) else 0.0,
        1.0 if _HEDGE.search(stripped[:400]) else 0.0,
        1.0 if _CHOICE.match(stripped) else 0.0,
        1.0 if _YES_NO.match(stripped) else 0.0,
        1.0 if ("def " in stripped or "```" in stripped or "return " in stripped) else 0.0,
        1.0 if any(c.isdigit() for c in stripped[:200]) else 0.0,
        math.log1p(len(query)),
        *_agreement(answer, previous),
    ]


def _agreement(answer: str, previous: Sequence[Previous]) -> list[float]:
    if not previous:
        return [0.0, 0.0, 0.0, 0.0, 0.0]
    mine = normalized_answer(answer)
    agrees = [normalized_answer(p.answer) == mine for p in previous]
    last = previous[-1]
    return [1.0, 1.0 if agrees[-1] else 0.0, last.accuracy, last.accuracy if agrees[-1] else 0.0,
            sum(agrees) / len(agrees)]


def query_vector(spec: FeatureSpec, query: str) -> np.ndarray:
    """The hashed n-grams of a query (the same for every model's answer to it)."""
    out = np.zeros(spec.query_buckets, dtype=np.float32)
    _hash_into(out, _ngrams(words(query)))
    return out


def featurize(spec: FeatureSpec, query: str, answer: str, confidence: float | None,
              previous: Sequence[Previous] = (), hashed_query: np.ndarray | None = None) -> np.ndarray:
    """One float32 vector of length `spec.size` (`hashed_query`: `query_vector`, if already computed)."""
    out = np.zeros(spec.size, dtype=np.float32)
    head = len(SIGNALS)
    q_end = head + spec.query_buckets
    out[:head] = signals(query, answer, confidence, previous)
    out[head:q_end] = query_vector(spec, query) if hashed_query is None else hashed_query
    answer_tokens = _ngrams(words(answer))
    short = answer.strip().lower()
    if len(short) <= 40:
        answer_tokens.append(f"<answer>{short}")
    _hash_into(out[q_end:], answer_tokens)
    return out


def featurize_many(spec: FeatureSpec, queries: Sequence[str], answers: Sequence[str], confidences: np.ndarray,
                   previous: Sequence[Sequence[Previous]] | None = None) -> np.ndarray:
    """Rows of `featurize` for aligned sequences (confidence NaN = none)."""
    cache: dict[str, np.ndarray] = {}
    rows = []
    for i, (query, answer, confidence) in enumerate(zip(queries, answers, confidences, strict=True)):
        hashed = cache.get(query)
        if hashed is None:
            hashed = cache[query] = query_vector(spec, query)
        conf = None if math.isnan(confidence) else float(confidence)
        rows.append(featurize(spec, query, answer, conf, previous[i] if previous is not None else (), hashed))
    return np.stack(rows) if rows else np.zeros((0, spec.size), dtype=np.float32)
