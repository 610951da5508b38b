"""Prompt compression: drop the least informative words of a prompt's long context before an expensive model.

The policy (docs/compression.md):

- **What may be compressed**: in a chat, the system prompt after its first paragraph (the instruction is
  kept; what follows it is typically documents or few-shot examples) and the user and assistant turns
  before the last `keep_recent` messages. In a completion prompt, everything before its last paragraph.
  The last user message (the question), the recent turns, tool messages and any message whose content
  is not plain text are never touched.
- **What is dropped**: each compressible text is scored token by token by a small local model
  (`workers.local.surprisal`): the surprisal -log p(token | what precedes it) says how much a token tells
  that the text before it does not. Tokens are grouped into words (a word keeps its leading space and
  punctuation), a word scores the mean surprisal of its tokens, and words are dropped lowest first until
  the compressible tokens are down to `target_ratio` of what they were. Line breaks are always kept, so
  lists and paragraphs keep their shape.
- **Question-aware** (`question_aware`, off by default), after LongLLMLingua's coarse stage: the sentences
  least relevant to the question go first, and only within equally relevant sentences does surprisal
  decide. Relevance is lexical: the question's words that a sentence contains, each weighted by how rare it
  is among the text's sentences (BM25's inverse document frequency), so a sentence that names what the
  question asks about outranks one that only shares its common words.
- **Reordered** (`reorder`, off by default), after LongLLMLingua's document reordering: the paragraphs of
  each compressible text are put in order of the same relevance, the most relevant last, where it is next
  to the question (small readers answer best from what they read last). Only for texts whose paragraphs
  are independent (retrieved documents, notes, examples): it moves them, so it would change a narrative.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import numpy as np

from router.trace import CompressionRecord
from workers.backend import GenerationRequest
from workers.pricing import TokenPrice

#: A word starts at a token whose text begins with a space or a line break, or that is punctuation.
_WORD_START = re.compile(r"^[\s]|^[^\w\s]")
_PARAGRAPH = re.compile(r"\n\s*\n")
_PARAGRAPH_SPLIT = re.compile(r"(\n\s*\n)")
_WORD = re.compile(r"\w+")
UnitScore = Literal["sum", "mean", "max"]
Unit = Literal["word", "token", "sentence"]
_AGGREGATES: dict[str, Callable[[np.ndarray], float]] = {"sum": np.sum, "mean": np.mean, "max": np.max}


class Scored(Protocol):
    """A text's tokens: character spans and surprisal (`workers.local.surprisal.TokenSurprisal`)."""

    starts: np.ndarray
    ends: np.ndarray
    surprisal: np.ndarray


class TokenScorer(Protocol):
    """Scores a text token by token (`workers.local.surprisal.SurprisalModel` is one)."""

    def score(self, text: str) -> Scored: ...


@dataclass(frozen=True, slots=True)
class CompressionPolicy:
    """When and how far to compress before one model."""

    #: Fraction of the compressible tokens kept (0.5: half of them are dropped).
    target_ratio: float = 0.5
    #: Prompts with fewer compressible tokens than this are sent as they are.
    min_prompt_tokens: int = 500
    #: The last messages of a chat kept verbatim (the question is always kept).
    keep_recent: int = 2
    #: What is dropped: whole words, single tokens, or whole sentences.
    unit: Unit = "word"
    #: How a unit's tokens' surprisal makes its score; default: the sum for words and tokens (a word's
    #: self-information), the mean for sentences (information per token kept). Measured: docs/compression.md.
    unit_score: UnitScore | None = None
    #: Only before models whose input price, in USD per million tokens, is at least this.
    min_input_usd_per_mtok: float = 0.0
    #: Drop the sentences least relevant to the question first (surprisal orders units within them).
    question_aware: bool = False
    #: Put each compressible text's paragraphs in order of relevance to the question, the most relevant
    #: last, next to the question (for independent documents or notes, whose order carries no meaning).
    reorder: bool = False


@dataclass(slots=True)
class CompressedText:
    text: str
    tokens_before: int
    tokens_after: int


@dataclass(slots=True)
class CompressionOutcome:
    """What compressing one request did (tokens as the scoring model's tokenizer counts them)."""

    request: GenerationRequest
    tokens_before: int = 0
    tokens_after: int = 0
    seconds: float = 0.0
    #: Why nothing was compressed ("" when something was).
    skipped: str = ""
    texts: list[CompressedText] = field(default_factory=list)

    @property
    def tokens_removed(self) -> int:
        return self.tokens_before - self.tokens_after

    @property
    def ratio(self) -> float:
        """Tokens kept over tokens before, of the compressible parts (1.0 when nothing was compressed)."""
        return self.tokens_after / self.tokens_before if self.tokens_before else 1.0


@dataclass(frozen=True, slots=True)
class Part:
    """A text that may be compressed, between a kept prefix and a kept suffix: of message `index`, or of the
    completion prompt (index -1)."""

    index: int
    prefix: str
    text: str
    suffix: str = ""


def compressible_parts(request: GenerationRequest, keep_recent: int) -> list[Part]:
    """The parts of a request that the policy allows to compress (see the module's docstring)."""
    if request.kind == "completion":
        context, question = _split_last_paragraph(request.prompt)
        return [Part(-1, "", context, question)] if context.strip() else []
    messages = request.messages
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages))
    recent_from = min(last_user, max(0, len(messages) - keep_recent))
    parts = []
    for index, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            continue
        role = message.get("role")
        if role in ("system", "developer"):
            head, rest = _split_first_paragraph(content)
            if rest.strip():
                parts.append(Part(index, head, rest))
        elif role in ("user", "assistant") and index < recent_from:
            parts.append(Part(index, "", content))
    return parts


def question_of(request: GenerationRequest) -> str:
    """What the request asks: the last user message of a chat (its text), the last paragraph of a prompt."""
    if request.kind == "completion":
        return _split_last_paragraph(request.prompt)[1]
    users = [m.get("content") for m in request.messages if m.get("role") == "user"]
    content = users[-1] if users else ""
    if isinstance(content, list):  # text parts of a multimodal message
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return content if isinstance(content, str) else ""


def _split_first_paragraph(text: str) -> tuple[str, str]:
    """(the first paragraph with the blank line after it, the rest)."""
    match = _PARAGRAPH.search(text)
    return (text[:match.end()], text[match.end():]) if match else (text, "")


def _split_last_paragraph(text: str) -> tuple[str, str]:
    """(everything before the last paragraph, with the blank line, and the last paragraph)."""
    matches = list(_PARAGRAPH.finditer(text))
    return (text[:matches[-1].end()], text[matches[-1].end():]) if matches else ("", text)


def _starts_unit(text: str, scored: Scored, i: int, unit: Unit) -> bool:
    piece = text[scored.starts[i]:scored.ends[i]]
    previous = text[scored.starts[i - 1]:scored.ends[i - 1]]
    gap = text[scored.ends[i - 1]:scored.starts[i]]  # any space the tokenizer left out of the spans
    if unit == "token" or "\n" in piece or "\n" in previous:  # a line break is a unit of its own
        return True
    if unit == "sentence":
        return previous.rstrip().endswith((".", "!", "?", ":", ";"))
    # A word starts with its leading space (a lone space token joins the word after it, so that dropping a
    # word never glues its neighbours together) or at punctuation.
    return bool(gap) or (bool(_WORD_START.match(piece)) and not previous.isspace())


def _units(scored: Scored, text: str, unit: Unit) -> list[tuple[int, int]]:
    """The token ranges [(first, end)] of the text's units."""
    count = len(scored.surprisal)
    starts = [0] + [i for i in range(1, count) if _starts_unit(text, scored, i, unit)]
    return list(zip(starts, [*starts[1:], count], strict=True))


def sentence_relevance(scored: Scored, text: str, question: str) -> np.ndarray:
    """For each token, how relevant its sentence is to `question`: `lexical_relevance` among the text's
    sentences."""
    relevance = np.zeros(len(scored.surprisal))
    if not len(relevance):
        return relevance
    sentences = _units(scored, text, "sentence")
    weights = lexical_relevance([text[scored.starts[a]:scored.ends[b - 1]] for a, b in sentences], question)
    for (a, b), weight in zip(sentences, weights, strict=True):
        relevance[a:b] = weight
    return relevance


def lexical_relevance(passages: list[str], question: str) -> list[float]:
    """How relevant each passage is to `question`: the sum, over the question's words that the passage
    contains (lower-cased), of their BM25 inverse document frequency among the passages,
    log(1 + (n - df + 0.5) / (df + 0.5)). 0 for a passage that shares no word with it."""
    asked = set(_WORD.findall(question.lower()))
    words = [asked.intersection(_WORD.findall(passage.lower())) for passage in passages]
    frequency: dict[str, int] = {}
    for shared in words:
        for word in shared:
            frequency[word] = frequency.get(word, 0) + 1
    n = len(passages)
    weight = {w: math.log(1 + (n - df + 0.5) / (df + 0.5)) for w, df in frequency.items()}
    return [sum(weight[w] for w in shared) for shared in words]


def reorder_paragraphs(text: str, question: str) -> str:
    """`text` with its paragraphs (separated by blank lines) in increasing order of `lexical_relevance` to
    `question`, so that the most relevant one ends the text, next to the question; equally relevant
    paragraphs keep their order, and the separators and any blank paragraph stay where they were."""
    pieces = _PARAGRAPH_SPLIT.split(text)
    slots = [i for i in range(0, len(pieces), 2) if pieces[i].strip()]
    if len(slots) < 2:
        return text
    relevance = lexical_relevance([pieces[i] for i in slots], question)
    order = sorted(range(len(slots)), key=lambda k: relevance[k])
    moved = list(pieces)
    for slot, k in zip(slots, order, strict=True):
        moved[slot] = pieces[slots[k]]
    return "".join(moved)


def drop_order(scored: Scored, text: str, unit: Unit = "word",
               unit_score: UnitScore | None = None) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """The units a text can lose: their token ranges [(first, end)], their scores (the sum, mean or max of
    their tokens' surprisal) and a mask of units that are never dropped (line breaks)."""
    units = _units(scored, text, unit)
    aggregate = _AGGREGATES[unit_score or ("mean" if unit == "sentence" else "sum")]
    scores = np.array([float(aggregate(scored.surprisal[a:b])) for a, b in units])
    fixed = np.array(["\n" in text[scored.starts[a]:scored.ends[b - 1]] for a, b in units], dtype=bool)
    return units, scores, fixed


def units_to_keep(units: list[tuple[int, int]], scores: np.ndarray, fixed: np.ndarray,
                  target_ratio: float, relevance: np.ndarray | None = None) -> np.ndarray:
    """Which units stay: the lowest-scored droppable units go first (ties: the earlier first) until at most
    `target_ratio` of the tokens are left, or nothing droppable is. With `relevance` (per unit), the least
    relevant units go first, and scores order only units of equal relevance."""
    count = units[-1][1] if units else 0
    to_remove = count - int(np.ceil(target_ratio * count))
    keep = np.ones(len(units), dtype=bool)
    removed = 0
    keys = (np.arange(len(units)), scores) if relevance is None else (np.arange(len(units)), scores, relevance)
    for unit in np.lexsort(keys):
        if removed >= to_remove:
            break
        if fixed[unit] or not np.isfinite(scores[unit]):
            continue
        keep[unit] = False
        removed += units[unit][1] - units[unit][0]
    return keep


def compress_text(scored: Scored, text: str, target_ratio: float, unit: Unit = "word",
                  unit_score: UnitScore | None = None, question: str | None = None) -> CompressedText:
    """`text` without its least informative units, down to `target_ratio` of its tokens (or as close as the
    units that must stay allow); given a `question`, its sentences least relevant to it go first."""
    count = len(scored.surprisal)
    if count == 0:
        return CompressedText(text, 0, 0)
    units, scores, fixed = drop_order(scored, text, unit, unit_score)
    relevance = None
    if question is not None:
        relevance = sentence_relevance(scored, text, question)[[a for a, _ in units]]
    keep = units_to_keep(units, scores, fixed, target_ratio, relevance)
    bounds = np.concatenate([scored.starts[1:], [len(text)]])  # a token's text runs to the next one's start
    pieces = [text[(0 if a == 0 else scored.starts[a]):bounds[b - 1]]
              for (a, b), kept in zip(units, keep, strict=True) if kept]
    return CompressedText("".join(pieces), count, sum(b - a for (a, b), kept in zip(units, keep, strict=True)
                                                      if kept))


class Compressor:
    """Compresses requests with a token scorer that is loaded on first use and shared by every call."""

    def __init__(self, load_scorer: Callable[[], TokenScorer]) -> None:
        self._load_scorer = load_scorer
        self._scorer: TokenScorer | None = None
        self._loading = threading.Lock()

    @property
    def scorer(self) -> TokenScorer:
        """Loaded (and built, the first time) by the first request that needs it; concurrent first requests
        wait for that one rather than build the model twice."""
        with self._loading:
            if self._scorer is None:
                self._scorer = self._load_scorer()
            return self._scorer

    def compress(self, request: GenerationRequest, policy: CompressionPolicy) -> CompressionOutcome:
        """`request` with its compressible parts compressed per `policy` (the request itself is unchanged)."""
        started = time.perf_counter()
        outcome = CompressionOutcome(request)
        if not request.compress:
            outcome.skipped = "opted_out"
            return outcome
        parts = compressible_parts(request, policy.keep_recent)
        if not parts:
            outcome.skipped = "nothing_compressible"
            return outcome
        asked = question_of(request) if policy.reorder or policy.question_aware else ""
        if policy.reorder:
            parts = [replace(part, text=reorder_paragraphs(part.text, asked)) for part in parts]
        scored = [(part, self.scorer.score(part.text)) for part in parts]
        total = sum(len(tokens.surprisal) for _, tokens in scored)
        if total < policy.min_prompt_tokens:
            outcome.skipped = "too_short"
            outcome.seconds = time.perf_counter() - started
            return outcome
        messages = [dict(m) for m in request.messages]
        prompt = request.prompt
        question = asked if policy.question_aware else None
        for part, tokens in scored:
            done = compress_text(tokens, part.text, policy.target_ratio, policy.unit, policy.unit_score, question)
            outcome.texts.append(done)
            if part.index == -1:
                prompt = part.prefix + done.text + part.suffix
            else:
                messages[part.index]["content"] = part.prefix + done.text + part.suffix
        outcome.tokens_before = sum(t.tokens_before for t in outcome.texts)
        outcome.tokens_after = sum(t.tokens_after for t in outcome.texts)
        outcome.request = replace(request, messages=messages, prompt=prompt)
        outcome.seconds = time.perf_counter() - started
        return outcome


class CompressionRules:
    """Which policy applies before which model: a route's own policy for the models it calls, else the
    model's; none below the policy's input price. Compression runs in a worker thread (it is CPU work)."""

    def __init__(self, compressor: Compressor, *, routes: dict[str, CompressionPolicy],
                 models: dict[str, CompressionPolicy]) -> None:
        self.compressor = compressor
        self.routes = routes
        self.models = models

    def policy_for(self, route: str, model: str, price: TokenPrice) -> CompressionPolicy | None:
        policy = self.routes.get(route) or self.models.get(model)
        if policy is None or price.input_per_token * 1e6 < policy.min_input_usd_per_mtok:
            return None
        return policy

    async def apply(self, route: str, model: str, price: TokenPrice,
                    request: GenerationRequest) -> CompressionOutcome | None:
        """The request to send to `model` (compressed or not), or None when no policy applies."""
        policy = self.policy_for(route, model, price)
        if policy is None:
            return None
        if not request.compress:
            return CompressionOutcome(request, skipped="opted_out")
        return await asyncio.to_thread(self.compressor.compress, request, policy)


def trace_record(model: str, outcome: CompressionOutcome, price: TokenPrice) -> CompressionRecord:
    """What the decision trace keeps of a compression before `model`, which answered."""
    return CompressionRecord(model, outcome.skipped or "compressed", outcome.tokens_before, outcome.tokens_after,
                             round(outcome.ratio, 4), outcome.seconds,
                             outcome.tokens_removed * price.input_per_token)
