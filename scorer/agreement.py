"""Do two answers to one query say the same thing? What a shadow audit asks of a cheap tier's answer and
the top tier's (`gateway.audits`; docs/learning.md, "Comparing two answers").

The rule follows the kind of query (`scorer.answers.task_kind`), and reads answers as the judge's signals and
the pack grading do (`scorer.answers`):

- multiple choice: the same option letter (a leading letter, "answer is B", or the text of one option);
- yes/no: the same yes or no;
- arithmetic: the same last number in each answer (thousands separators ignored);
- anything else, when both answers are short (at most `LONG_WORDS` words) or no embedder is given: the same
  normalised text (lower case, no punctuation, no articles), or one contains the other as whole words
  ("Jane Austen" and "It was written by Jane Austen");
- longer answers: MiniLM cosine of the two answers at least `LONG_COSINE`.

A reference that says nothing readable (no letter for a multiple-choice query, no yes/no, no number, empty)
makes no verdict: `Verdict.usable` is False and no label should be written from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from scorer.answers import chosen_letter, normalize, options_of, task_kind, yes_no
from scorer.signals import LONG_WORDS, Embed

#: Long answers agree when their MiniLM cosine is at least this: on MBPP's train split (code, the packs' only
#: long answers) the cut where an audit's false-accept estimate is least biased (0.80: -40 points, 0.86: about
#: -10, 0.90: +20). Even there the verdict is right only about 2 times in 3: similarity is a weak judge of code
#: (docs/BENCHMARKS.md, "Audit verdicts against gold").
LONG_COSINE = 0.86
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True, slots=True)
class Verdict:
    #: The answer says what the reference says.
    agree: bool
    #: How strongly: 1 or 0 for the exact rules, the cosine for long answers.
    score: float
    #: "choice", "yes_no", "number", "exact", "minilm", or "unreadable" (the reference says nothing readable).
    method: str

    @property
    def usable(self) -> bool:
        """Whether the verdict may become a label."""
        return self.method != "unreadable"


UNREADABLE = Verdict(False, 0.0, "unreadable")


def _exact(agree: bool, method: str) -> Verdict:
    return Verdict(agree, 1.0 if agree else 0.0, method)


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def same_number(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def contains(longer: str, shorter: str) -> bool:
    """Whether normalised `shorter` occurs in normalised `longer` as whole words."""
    return bool(shorter) and f" {shorter} " in f" {longer} "


def _plain(text: str) -> str:
    """Normalised text; an answer that is nothing but an article ("A", a bare option letter) keeps it."""
    return normalize(text) or " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


def compare(query: str, answer: str, reference: str, embed: Embed | None = None) -> Verdict:
    """Whether `answer` says what `reference` says, for `query` (see the module's docstring)."""
    kind = task_kind(query)
    if kind == "multiple_choice":
        options = options_of(query)
        letters = sorted(options) or ["A", "B", "C", "D"]
        said = chosen_letter(reference, letters, options)
        if said is None:
            return UNREADABLE
        return _exact(chosen_letter(answer, letters, options) == said, "choice")
    if kind == "yes_no":
        said = yes_no(reference)
        if said is None:
            return UNREADABLE
        return _exact(yes_no(answer) == said, "yes_no")
    if kind == "arithmetic":
        number = last_number(reference)
        if number is None:
            return UNREADABLE
        mine = last_number(answer)
        return _exact(mine is not None and same_number(mine, number), "number")
    ours, theirs = _plain(answer), _plain(reference)
    if not theirs:
        return UNREADABLE
    short = len(ours.split()) <= LONG_WORDS or len(theirs.split()) <= LONG_WORDS
    if short or embed is None:
        return _exact(ours == theirs or contains(ours, theirs) or contains(theirs, ours), "exact")
    vectors = np.asarray(embed([answer, reference]), dtype=np.float32)
    cosine = float(np.dot(vectors[0], vectors[1]))
    return Verdict(cosine >= LONG_COSINE, max(0.0, min(1.0, cosine)), "minilm")
