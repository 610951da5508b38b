"""The audit's comparison of two answers (scorer/agreement.py): one rule per kind of query."""

from __future__ import annotations

import numpy as np
import pytest

from scorer.agreement import LONG_COSINE, compare

CHOICE = "Which city is the capital of France?\nA) Lyon\nB) Paris\nC) Nice\nD) Lille\nAnswer:"
YES_NO = "Is the Pacific the largest ocean?"
SUM = "What is 512 + 512?"
FACT = "Who wrote Pride and Prejudice?"
ESSAY = "Explain in a few paragraphs why the sky looks blue during the day and red at sunset."


@pytest.mark.parametrize(("query", "answer", "reference", "agree", "method"), [
    (CHOICE, "B", "(B) Paris", True, "choice"),
    (CHOICE, "The answer is B.", "B", True, "choice"),
    (CHOICE, "Paris", "B", True, "choice"),  # the text of exactly one option
    (CHOICE, "Answer: C", "B", False, "choice"),
    (CHOICE, "I am not sure.", "B", False, "choice"),
    (YES_NO, "Yes, it is.", "yes", True, "yes_no"),
    (YES_NO, "No.", "Yes, by far.", False, "yes_no"),
    (SUM, "1,024", "The answer is 1024.", True, "number"),
    (SUM, "1023", "1024", False, "number"),
    (SUM, "I cannot compute that.", "1024", False, "number"),
    # read as arithmetic from the query, but the reference has no number: the text rules
    ("Who was King of England, reigning from 1042-1066?", "Edward the Confessor.", "Edward the Confessor",
     True, "exact"),
    (FACT, "Jane Austen", "jane austen.", True, "exact"),
    (FACT, "It was written by Jane Austen", "Jane Austen", True, "exact"),  # contains it as whole words
    (FACT, "Charlotte Bronte", "Jane Austen", False, "exact"),
    (FACT, "Austenite steel", "Austen", False, "exact"),  # not a whole-word match
    (FACT, "Austen", "Pride and Prejudice was written by Jane Austen in 1813", True, "exact"),  # 10 words
    # contained, but in a long list: the reference names several people, not this one
    (FACT, "Ophelia", "Polonius, Laertes, Claudius, Gertrude, Hamlet himself, and indirectly Ophelia and "
                      "Rosencrantz", False, "exact"),
    (FACT, "The Beatles", "beatles", True, "exact"),
])
def test_each_kind_of_query_has_its_rule(query: str, answer: str, reference: str, agree: bool, method: str) -> None:
    verdict = compare(query, answer, reference)
    assert (verdict.agree, verdict.method, verdict.usable) == (agree, method, True)
    assert verdict.score == (1.0 if agree else 0.0)


@pytest.mark.parametrize(("query", "reference"), [
    (CHOICE, "I would rather not say."), (YES_NO, "It depends."), (SUM, "  "), (FACT, "!!"),
])
def test_a_reference_that_says_nothing_readable_makes_no_verdict(query: str, reference: str) -> None:
    verdict = compare(query, "B", reference)
    assert not verdict.usable and verdict.method == "unreadable"


def test_long_answers_are_compared_by_embedding_cosine() -> None:
    def embed(texts: list[str]) -> np.ndarray:
        # a deterministic stand-in for MiniLM: texts that mention scattering point one way, others another
        rows = [np.array([1.0, 0.0]) if "scatter" in t else np.array([0.6, 0.8]) for t in texts]
        return np.vstack(rows)

    long_a = "Sunlight scatters off air molecules, and blue light scatters most, so the sky looks blue by day."
    long_b = "Rayleigh scattering: shorter wavelengths scatter more, which is why the daytime sky is blue."
    other = "The sky reflects the colour of the oceans, which are blue, and at sunset it reflects the land."
    same = compare(ESSAY, long_a, long_b, embed)
    assert same.agree and same.method == "minilm" and same.score == pytest.approx(1.0)
    different = compare(ESSAY, long_a, other, embed)
    assert not different.agree and different.score == pytest.approx(0.6) and 0.6 < LONG_COSINE
    assert compare(ESSAY, long_a, long_b).method == "exact"  # without an embedder: text rules only
    assert compare(ESSAY, "Rayleigh scattering.", long_b, embed).method == "exact"  # one side short: text rules
