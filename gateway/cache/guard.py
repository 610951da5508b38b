"""A cheap check beyond cosine: two questions that differ in a number or a negation are not the same question.

Sentence embeddings barely move when "2016" becomes "2017" or "can" becomes "can't", and those are exactly
the near-misses that make a semantic cache serve a wrong answer. Measured on the paraphrase pack in
docs/semantic-cache.md.
"""

from __future__ import annotations

import re
from collections import Counter

NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
NEGATION = re.compile(r"\b(?:not|no|never|without|nobody|nothing|neither|nor|none)\b|n't\b|\bcannot\b", re.I)


def _signature(text: str) -> tuple[Counter[str], int]:
    numbers = Counter(n.replace(",", "") for n in NUMBER.findall(text))
    return numbers, len(NEGATION.findall(text))


def compatible(cached: str, new: str) -> bool:
    """False when the two questions mention different numbers or a different count of negations."""
    return _signature(cached) == _signature(new)
