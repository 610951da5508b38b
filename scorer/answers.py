"""Reading short answers: normalisation, multiple-choice letters, yes/no, and what kind of task a query is.

Shared by the local judge's signals (serving: `scorer.signals`) and the grading of training outcomes
(`scorer.fit.grading`), so that an answer is read the same way in both.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Literal

TaskKind = Literal["multiple_choice", "yes_no", "arithmetic", "code", "short_fact", "open_ended"]
TASK_KINDS: tuple[TaskKind, ...] = ("multiple_choice", "yes_no", "arithmetic", "code", "short_fact", "open_ended")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_LEADING = re.compile(r"^\W*\(?([A-Z])(?:[).:\],\s]|$)")
_STATED = re.compile(r"answer\s*(?:is|:)?\s*:?\s*\(?([A-Z])\b", re.IGNORECASE)
_OPTION = re.compile(r"^\s*\(?([A-H])[):.]\s+(.+?)\s*$", re.MULTILINE)
_YES_NO = re.compile(r"\W*(yes|no)\b", re.IGNORECASE)
_CODE = re.compile(r"\b(python|javascript|typescript|sql|regex|write a (?:python )?(?:function|program|script|class)|"
                   r"def \w+\(|implement (?:a|the) (?:function|class|method))", re.IGNORECASE)
_ARITHMETIC = re.compile(r"\d\s*[-+*/x×÷^]\s*\d|\b(sum|product|how many|how much|calculate|compute)\b",
                         re.IGNORECASE)
_YES_NO_QUESTION = re.compile(r"^(is|are|was|were|do|does|did|can|could|will|would|should|has|have|had)\b",
                              re.IGNORECASE)
_WH = re.compile(r"^(who|what|which|where|when|in which|how many|what year|name)\b", re.IGNORECASE)


def normalize(text: str) -> str:
    """SQuAD-style answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def options_of(query: str) -> dict[str, str]:
    """The options of the query's last multiple-choice question (`A) text`, `A: text`, `(A) text`): the last
    run of option lines that starts at A."""
    found: dict[str, str] = {}
    current: dict[str, str] = {}
    for letter, text in _OPTION.findall(query):
        if letter == "A":
            if len(current) >= 2:
                found = current
            current = {}
        current[letter] = text
    if len(current) >= 2:
        found = current
    return found


def chosen_letter(answer: str, letters: Sequence[str], options: dict[str, str] | None = None) -> str | None:
    """The option letter an answer chose: a leading letter ("B", "(B)", "B: 1"), "answer is B", a bare
    letter anywhere, or else the text of exactly one option; None when none can be read."""
    allowed = set(letters)
    text = answer.strip()
    match = _LEADING.match(text)
    if match and match.group(1) in allowed:
        return match.group(1)
    match = _STATED.search(text)
    if match and match.group(1).upper() in allowed:
        return match.group(1).upper()
    bare = [m for m in re.findall(r"\b([A-Z])\b", text) if m in allowed]
    if bare:
        return bare[0]
    if options:
        said = f" {normalize(text)} "
        hits = [k for k, v in options.items() if k in allowed and normalize(v) and f" {normalize(v)} " in said]
        if len(hits) == 1:
            return hits[0]
    return None


def yes_no(answer: str) -> str | None:
    match = _YES_NO.match(answer.strip())
    return match.group(1).capitalize() if match else None


def last_question(query: str) -> str:
    """The query's last paragraph with a question mark, else its last paragraph of more than three words."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", query) if p.strip()]
    for paragraph in reversed(paragraphs):
        if "?" in paragraph:
            return paragraph
    wordy = [p for p in paragraphs if len(p.split()) > 3]
    return wordy[-1] if wordy else query.strip()


def task_kind(query: str) -> TaskKind:
    """What kind of task a query asks for, from its text alone (it must work on open traffic)."""
    if len(options_of(query)) >= 2:
        return "multiple_choice"
    tail = last_question(query)
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    ask = next((line for line in lines if line.endswith("?")), lines[0] if lines else "")
    ask = re.sub(r"^(question|q)\s*:\s*", "", ask, flags=re.IGNORECASE)
    if _CODE.search(query):
        return "code"
    if "Answer:" in query and re.search(r"Answer:\s*(Yes|No)\b", query) or _YES_NO_QUESTION.match(ask):
        return "yes_no"
    if _ARITHMETIC.search(tail) and re.search(r"\d", tail):
        return "arithmetic"
    if _WH.match(ask) or (ask.endswith("?") and len(ask.split()) <= 25):
        return "short_fact"
    return "open_ended"


def answer_key(query_kind: TaskKind, answer: str, letters: Sequence[str], options: dict[str, str]) -> str | None:
    """What two answers must share to agree: the letter for multiple choice, yes/no, else the normalised
    text (None when a multiple-choice or yes/no answer says nothing readable)."""
    if query_kind == "multiple_choice":
        return chosen_letter(answer, letters, options)
    if query_kind == "yes_no":
        return yes_no(answer)
    return normalize(answer)
