"""A learned check on a semantic-cache hit: given the cached question, the new one and their cosine, the
probability that the two ask for the same answer.

Cosine alone cannot see word order ("from Chennai to Tirupur"), one changed token ("Lesson 5" / "Lesson 3"),
a changed function word ("will be" / "is", "most" / "all"), an added name ("Moto G4" / "Moto G4 Plus") or a
different question word. The features below are cheap string statistics of the pair (~0.1 ms); a small
gradient-boosted tree model weighs them. It is fitted on the fit part of QQP, with the verdicts of a blind
annotator panel where they exist (docs/semantic-cache-audit.md), and on the fit parts of PAWS's word-swap
pairs, so that it learns that the same words in another order can mean another question
(`frugal cache calibrate --verifier-out`; the fitting is `gateway.cache.calibration.verifier_fit`,
docs/semantic-cache.md). The fitted trees ship as `verifier.json` beside this file and are evaluated here
in plain Python: no scikit-learn at lookup time.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

from gateway.cache.guard import NEGATION, NUMBER

#: Candidates below this cosine are never hits; the verifier only judges those at or above it.
MIN_SIMILARITY = 0.85
#: The probability at or above which a candidate is served, chosen on cross-validated predictions of the fit
#: part of QQP (the same value as `threshold` in verifier.json; a test keeps them equal).
DEFAULT_VERIFIER_THRESHOLD = 0.9262467179689734
MODEL_PATH = Path(__file__).with_name("verifier.json")

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_STOP = frozenset(
    "a an the is are was were be been being am do does did doing have has had i me my we our you your he she "
    "it its they them their this that these those of in on at to for from by with about as into than then "
    "and or but if so can could would should will shall may might must what which who whom whose when where "
    "why how there here s t just very really some any all most more much many get got best way ways good "
    "one ever also out up".split())
_WH = ("what", "which", "who", "whom", "whose", "when", "where", "why", "how")

#: Function words whose change usually changes the question: tense and modality, quantity and comparison,
#: person, direction.
_SIGNIFICANT = frozenset(
    "will would should must shall might may was were been had did most all some any many much more less few "
    "every each none only than as he she him her his hers they them their we our you your i my me from to into "
    "out before after without with against for".split())
#: A capitalised word that does not open a sentence: part of a name ("Moto G4 Plus", "for a Canadian").
_NAMED = re.compile(r"(?<!^)(?<![.?!] )\b[A-Z][a-zA-Z0-9]+")

FEATURES = (
    "cosine", "word_jaccard", "char3_jaccard", "bigram_jaccard", "order_agreement", "content_order_agreement",
    "length_ratio",
    "content_only_a", "content_only_b", "number_mismatch", "negation_mismatch", "wh_mismatch", "identical",
    "function_word_changes", "named_words_one_side", "question_count_difference",
)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _jaccard(a: set[str] | set[tuple[str, str]], b: set[str] | set[tuple[str, str]]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def _char3(text: str) -> set[str]:
    s = " ".join(text.lower().split())
    return {s[i:i + 3] for i in range(max(1, len(s) - 2))}


def _order_agreement(a: list[str], b: list[str]) -> float:
    """Share of pairs of shared words that stand in the same relative order in both texts (1.0 when fewer than
    two words are shared): "Chennai to Tirupur" / "Tirupur to Chennai" score low."""
    first_b: dict[str, int] = {}
    for i, w in enumerate(b):
        first_b.setdefault(w, i)
    seen: set[str] = set()
    positions = []
    for w in a:
        if w in first_b and w not in seen:
            seen.add(w)
            positions.append(first_b[w])
    n = len(positions)
    if n < 2:
        return 1.0
    concordant = sum(1 for i in range(n) for j in range(i + 1, n) if positions[i] < positions[j])
    return concordant / (n * (n - 1) / 2)


def _wh(words: list[str]) -> frozenset[str]:
    return frozenset(w for w in words if w in _WH)


def features(cached_question: str, new_question: str, similarity: float) -> list[float]:
    """The pair's features, in the order of `FEATURES`."""
    wa, wb = _words(cached_question), _words(new_question)
    sa, sb = set(wa), set(wb)
    ca, cb = sa - _STOP, sb - _STOP
    la, lb = len(cached_question.strip()), len(new_question.strip())
    numbers_a = sorted(n.replace(",", "") for n in NUMBER.findall(cached_question))
    numbers_b = sorted(n.replace(",", "") for n in NUMBER.findall(new_question))
    return [
        similarity,
        _jaccard(sa, sb),
        _jaccard(_char3(cached_question), _char3(new_question)),
        _jaccard(set(zip(wa, wa[1:], strict=False)), set(zip(wb, wb[1:], strict=False))),
        _order_agreement(wa, wb),
        _order_agreement([w for w in wa if w not in _STOP], [w for w in wb if w not in _STOP]),
        min(la, lb) / max(la, lb, 1),
        math.log1p(len(ca - cb)),
        math.log1p(len(cb - ca)),
        float(numbers_a != numbers_b),
        float(len(NEGATION.findall(cached_question)) != len(NEGATION.findall(new_question))),
        float(_wh(wa) != _wh(wb)),
        float(wa == wb),
        float(len((sa ^ sb) & _SIGNIFICANT)),
        float(len({w.lower() for w in _NAMED.findall(cached_question)} - sb
                  | {w.lower() for w in _NAMED.findall(new_question)} - sa)),
        float(abs(cached_question.count("?") - new_question.count("?"))),
    ]


def _tree_value(nodes: list[list[float]], row: list[float]) -> float:
    """One exported tree: nodes [feature, threshold, left, right, value, is_leaf]; x ≤ threshold goes left."""
    node = nodes[0]
    while not node[5]:
        node = nodes[int(node[2]) if row[int(node[0])] <= node[1] else int(node[3])]
    return node[4]


def probability(model: dict[str, Any], row: list[float]) -> float:
    """The model's probability for one feature row (as `features` returns it)."""
    raw = model["baseline"] + sum(_tree_value(tree, row) for tree in model["trees"])
    return 1.0 / (1.0 + math.exp(-raw))


@functools.cache
def shipped_model() -> dict[str, Any]:
    """The fitted model in verifier.json (read on first use, not at import)."""
    model: dict[str, Any] = json.loads(MODEL_PATH.read_text())
    if model["features"] != list(FEATURES):
        raise ValueError(f"{MODEL_PATH} was fitted on other features: {model['features']}")
    return model


def lookup_floor() -> float:
    """The cosine the index is queried from when the verifier judges: a little below the lowest cosine it
    served on any labelled set at calibration (`lookup_floor` in verifier.json), so that the lookup scores
    fewer rows exactly without changing any decision measured there."""
    return float(shipped_model()["lookup_floor"])


def verify(cached_question: str, new_question: str, similarity: float) -> float:
    """The probability that `new_question` may be served `cached_question`'s answer; 0.0 below
    `MIN_SIMILARITY`. Serve when it is ≥ `DEFAULT_VERIFIER_THRESHOLD`."""
    if similarity < MIN_SIMILARITY:
        return 0.0
    return probability(shipped_model(), features(cached_question, new_question, similarity))
