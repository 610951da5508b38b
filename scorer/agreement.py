"""Do two answers to one query say the same thing? What a shadow audit asks of a cheap tier's answer and
the top tier's (`gateway.audits`; docs/learning.md, "Comparing two answers").

The rule follows the kind of query (`scorer.answers.task_kind`), and reads answers as the judge's signals and
the pack grading do (`scorer.answers`):

- multiple choice: the same option letter (a leading letter, "answer is B", or the text of one option);
- yes/no: the same yes or no;
- arithmetic: the same last number in each answer (thousands separators ignored, relative tolerance 1e-6);
  when the reference has no number at all, the text rules below (the kind is read from the query alone, and
  a trivia question with a span of years, "reigning from 1042-1066", reads as arithmetic);
- anything else, when either answer is short (at most `LONG_WORDS` words) or no embedder is given: the same
  normalised text (lower case, no punctuation, no articles), or one contains the other as whole words where
  the containing one is short itself (at most `CONTAINS_WORDS` words, as the pack grading reads answers):
  "Jane Austen" and "It was written by Jane Austen" agree, a name dropped in a long list does not;
- both answers longer than `LONG_WORDS` words, with an embedder: MiniLM cosine at least `LONG_COSINE`.

A reference that says nothing readable (no letter for a multiple-choice query, no yes/no, no text at all)
makes no verdict: `Verdict.usable` is False and no label should be written from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from scorer.answers import chosen_letter, normalize, options_of, task_kind, yes_no
from scorer.signals import LONG_WORDS, Embed

#: Long answers agree when their MiniLM cosine is at least this: on MBPP's train split (code, the packs' only
#: long answers), every other model's answer against the strongest model's, the cut where the audit's
#: false-accept estimate is least biased (0.82: -21 points, 0.86: 0, 0.90: +26; `bench/audit_agreement.py
#: --sweep`). The verdict is right only 57% of the time there, and the bias of one model's pairs ranges from
#: -22 to +40 points: similarity is a weak judge of code (docs/BENCHMARKS.md, "Audit verdicts against gold").
LONG_COSINE = 0.86
#: Containment counts only inside an answer of at most this many words (`scorer.fit.grading.SHORT_WORDS`, which
#: serving code may not import): in a longer text a name may be one of several, or the one ruled out.
CONTAINS_WORDS = 10
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
    number = last_number(reference) if kind == "arithmetic" else None
    if number is not None:
        mine = last_number(answer)
        return _exact(mine is not None and same_number(mine, number), "number")
    ours, theirs = _plain(answer), _plain(reference)
    if not theirs:
        return UNREADABLE
    short = len(ours.split()) <= LONG_WORDS or len(theirs.split()) <= LONG_WORDS
    if short or embed is None:
        inside = (len(ours.split()) <= CONTAINS_WORDS and contains(ours, theirs)
                  or len(theirs.split()) <= CONTAINS_WORDS and contains(theirs, ours))
        return _exact(ours == theirs or inside, "exact")
    vectors = np.asarray(embed([answer, reference]), dtype=np.float32)
    cosine = float(np.dot(vectors[0], vectors[1]))
    return Verdict(cosine >= LONG_COSINE, max(0.0, min(1.0, cosine)), "minilm")
