"""Grading a local model's answers to the data pack's queries (docs/cascade.md, "The local judge").

The pack records other models' graded answers, not always a gold answer; what counts as right per dataset:

- MMLU, OVERRULING: the pack's gold (a letter; Yes/No).
- ARC, WinoGrande: the letter of any answer the source graded correct (all such answers agree; a query that
  no model answered correctly has no known gold and is not graded).
- TriviaQA: the answer matches, after normalisation (lower case, no punctuation, no articles), one of the
  answers the source graded correct; or it is short (at most `SHORT_WORDS` words) and contains one of them as
  whole words ("Nicholas Nickleby by Dickens"). A query with no correct answer recorded is not graded.
- MBPP: not graded (the pack has no test cases to run).

Letters are read the way a lenient grader reads a small model: a leading letter ("B", "(B)", "B: 1"),
"answer is B" / "Answer: B", a bare letter anywhere, or else the text of exactly one option.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scorer.answers import chosen_letter, normalize, options_of, yes_no
from scorer.fit.dataset import Grid

SHORT_WORDS = 10


def matches_any(answer: str, references: Sequence[str]) -> bool:
    said = normalize(answer)
    if not said:
        return False
    words = said.split()
    for reference in references:
        ref = normalize(reference)
        if not ref:
            continue
        if said == ref:
            return True
        if len(words) <= SHORT_WORDS and f" {ref} " in f" {said} ":
            return True
    return False


@dataclass(frozen=True)
class Gold:
    """What a query's right answer is: a letter (or Yes/No), or the accepted answers of a free-form query."""

    letter: str | None = None
    answers: tuple[str, ...] = ()
    letters: tuple[str, ...] = ()


#: The graded datasets and how their queries are answered: "letter" (multiple choice), "yesno", "free".
GRADED: dict[str, str] = {
    "zellinger_mmlu": "letter",
    "routerbench_arc_challenge": "letter",
    "routerbench_winogrande": "letter",
    "overruling": "yesno",
    "zellinger_triviaqa": "free",
}


def golds(grid: Grid) -> list[Gold | None]:
    """Each query's gold, or None where it cannot be known (see the module's docstring)."""
    style = GRADED.get(grid.name)
    out: list[Gold | None] = []
    for q in range(len(grid)):
        correct = [grid.answers[q][m] for m in range(len(grid.models)) if grid.correct[q, m] >= 0.5
                   and grid.answers[q][m] is not None]
        if style is None:
            out.append(None)
        elif style == "yesno":
            out.append(Gold(letter=grid_gold(grid, q)))
        elif style == "letter":
            letters = tuple(sorted(options_of(grid.queries[q]))) or ("A", "B", "C", "D")
            letter = grid_gold(grid, q)
            if letter is None:
                chosen = {chosen_letter(a, letters) for a in correct} - {None}
                letter = chosen.pop() if len(chosen) == 1 else None
            out.append(Gold(letter=letter, letters=letters) if letter else None)
        else:
            out.append(Gold(answers=tuple(a.strip() for a in correct)) if correct else None)
    return out


def grid_gold(grid: Grid, q: int) -> str | None:
    gold = grid.golds[q] if grid.golds is not None else None
    return gold.strip() if isinstance(gold, str) and gold.strip() else None


def grade(dataset: str, query: str, answer: str, gold: Gold) -> bool:
    """Whether a local answer to a pack query is right."""
    style = GRADED[dataset]
    if style == "yesno":
        return yes_no(answer) == gold.letter
    if style == "letter":
        return chosen_letter(answer, gold.letters, options_of(query)) == gold.letter
    return matches_any(answer, gold.answers)
