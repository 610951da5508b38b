"""Prompt compression's policy: what may be compressed, how units are dropped, when it applies, and how it is
configured and traced. The scoring model itself, and compression through a gateway, are tested in
tests/local/test_compression_local.py."""

from __future__ import annotations

import asyncio
import json
import re

import numpy as np
import pytest

from gateway.compression import build_compression
from gateway.settings import ConfigError, parse_config
from router.compression import (
    CompressionPolicy,
    CompressionRules,
    Compressor,
    compress_text,
    compressible_parts,
    drop_order,
    question_of,
    reorder_paragraphs,
    sentence_relevance,
    trace_record,
)
from router.trace import DecisionTrace
from workers.backend import GenerationRequest
from workers.local.surprisal import TokenSurprisal
from workers.pricing import TokenPrice


def scored(text: str, pieces: list[str], surprisal: list[float]) -> TokenSurprisal:
    """Token spans for `pieces` (which must join to `text`) with the given surprisal."""
    assert "".join(pieces) == text
    starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
    return TokenSurprisal(starts, starts + np.array([len(p) for p in pieces]), np.array(surprisal, np.float32))


def never_loaded() -> None:
    raise AssertionError("the scorer must not be loaded")


CHAT = [
    {"role": "system", "content": "Answer from the notes.\n\nNote one. Note two.\n\nNote three."},
    {"role": "user", "content": "Earlier question?"},
    {"role": "assistant", "content": "Earlier answer."},
    {"role": "tool", "content": "{\"json\": true}"},
    {"role": "user", "content": [{"type": "text", "text": "multimodal turn"}]},
    {"role": "assistant", "content": "Recent answer."},
    {"role": "user", "content": "The question?"},
]


def test_the_instruction_question_recent_turns_and_tool_messages_are_not_compressible() -> None:
    parts = compressible_parts(GenerationRequest("chat", messages=CHAT), keep_recent=2)
    assert [(p.index, p.prefix, p.text) for p in parts] == [
        (0, "Answer from the notes.\n\n", "Note one. Note two.\n\nNote three."),
        (1, "", "Earlier question?"),
        (2, "", "Earlier answer."),
    ]
    # More recent turns kept: the earlier assistant answer becomes recent too.
    assert [p.index for p in compressible_parts(GenerationRequest("chat", messages=CHAT), keep_recent=5)] == [0, 1]


def test_the_last_user_message_is_kept_even_when_it_is_not_last() -> None:
    messages = [{"role": "system", "content": "Rule.\n\nContext."}, {"role": "user", "content": "Question?"},
                {"role": "assistant", "content": "Prefill of the answer"}]
    assert [p.index for p in compressible_parts(GenerationRequest("chat", messages=messages), keep_recent=0)] == [0]


def test_a_completion_prompt_keeps_its_last_paragraph() -> None:
    request = GenerationRequest("completion", prompt="Doc one.\n\nDoc two.\n\nQ: what?")
    [part] = compressible_parts(request, keep_recent=2)
    assert (part.prefix, part.text, part.suffix) == ("", "Doc one.\n\nDoc two.\n\n", "Q: what?")
    assert compressible_parts(GenerationRequest("completion", prompt="Only a question?"), 2) == []


def test_words_group_their_tokens_and_line_breaks_are_fixed() -> None:
    text = " The cat sat.\n Dogs"
    tokens = scored(text, [" The", " c", "at", " sat", ".", "\n", " Dog", "s"], [1, 5, 1, 2, 3, 0, 4, 1])
    units, scores, fixed = drop_order(tokens, text)
    assert units == [(0, 1), (1, 3), (3, 4), (4, 5), (5, 6), (6, 8)]
    assert scores.tolist() == [1, 6, 2, 3, 0, 5]  # a word's information is the sum of its tokens'
    assert fixed.tolist() == [False, False, False, False, True, False]
    assert drop_order(tokens, text, unit_score="mean")[1].tolist() == [1, 3, 2, 3, 0, 2.5]
    assert drop_order(tokens, text, unit="token")[0] == [(i, i + 1) for i in range(8)]


def test_a_lone_space_token_joins_the_word_after_it_and_sentences_end_at_stops() -> None:
    text = " is 9376. Next one!\n Last"
    pieces = [" is", " ", "93", "76", ".", " Next", " one", "!", "\n", " Last"]
    tokens = scored(text, pieces, [1] * len(pieces))
    assert drop_order(tokens, text)[0] == [(0, 1), (1, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 10)]
    units, scores, fixed = drop_order(tokens, text, unit="sentence")
    assert units == [(0, 5), (5, 8), (8, 9), (9, 10)]
    assert scores.tolist() == [1, 1, 1, 1]  # sentences score their mean
    assert fixed.tolist() == [False, False, True, False]


def test_a_number_split_into_digit_tokens_outweighs_a_short_word() -> None:
    """Why words score the sum: each digit of a random number is about as surprising as a common word, so
    by the mean a number would go first, and with it the answer (measured: docs/compression.md)."""
    pieces = [" the", " code", " is", " 9", "3", "7", "6", "."]
    text = "".join(pieces)
    tokens = scored(text, pieces, [1.0, 3.0, 2.5, 2.3, 2.3, 2.3, 2.3, 0.5])
    assert compress_text(tokens, text, target_ratio=0.6).text == " code 9376"
    assert compress_text(tokens, text, target_ratio=0.6, unit_score="mean").text == " code is"


def test_units_are_dropped_lowest_surprisal_first_down_to_the_ratio() -> None:
    words = [f" w{i}" for i in range(10)]
    text = "".join(words)
    surprisal = [9, 3, 7, 1, 8, 2, 6, 0, 5, 4]
    done = compress_text(scored(text, words, surprisal), text, target_ratio=0.6)
    assert (done.tokens_before, done.tokens_after) == (10, 6)
    # The four lowest (0, 1, 2, 3 at positions 7, 3, 5, 1) go; the rest stay in their order.
    assert done.text == " w0 w2 w4 w6 w8 w9"
    assert compress_text(scored(text, words, surprisal), text, target_ratio=1.0).text == text


NOTES = [" Valves were replaced in March.", " The room number of Omar is 6081.", " The lockers are by the door.",
         " The room number of Grace is 9376.", " Grace likes the garden."]


def test_a_sentence_is_as_relevant_as_the_rare_question_words_it_holds() -> None:
    text = "".join(NOTES)
    pieces = [w for sentence in NOTES for w in sentence.replace(".", " .").split(" ") if w]
    pieces = [(" " if w != "." else "") + w for w in pieces]
    tokens = scored(text, pieces, [1.0] * len(pieces))
    relevance = sentence_relevance(tokens, text, "What is the room number of Grace?")
    by_sentence = [relevance[a] for a, _ in drop_order(tokens, text, unit="sentence")[0]]
    valves, omar, lockers, grace, garden = by_sentence
    assert valves == 0 and lockers > 0  # "the" only, in four of five sentences: a small weight
    assert grace > omar > garden > lockers  # "room", "number", "of" in two sentences; "grace" in two
    assert grace == pytest.approx(omar + garden - lockers)  # grace's = omar's words + "grace" (+ "the" once)
    assert (relevance[:len(NOTES[0].split())] == 0).all()
    assert not sentence_relevance(tokens, text, "").any()


def test_question_aware_compression_drops_the_least_relevant_sentences_first() -> None:
    """Surprisal alone would keep the surprising sentences about valves and lockers; with the question, the
    fact it asks for stays, and surprisal only orders sentences that are equally relevant."""
    text = "".join(NOTES)
    pieces = [w for sentence in NOTES for w in sentence.replace(".", " .").split(" ") if w]
    pieces = [(" " if w != "." else "") + w for w in pieces]
    surprisal = [9.0] * len(pieces)
    grace_start = len(" ".join(NOTES[:3]).replace(".", " .").split())
    for i in range(grace_start, grace_start + 8):  # the Grace fact is the least surprising sentence
        surprisal[i] = 0.5
    tokens = scored(text, pieces, surprisal)
    agnostic = compress_text(tokens, text, target_ratio=0.3, unit="sentence")
    aware = compress_text(tokens, text, target_ratio=0.3, unit="sentence", question="Room number of Grace?")
    assert "9376" not in agnostic.text
    assert aware.text == NOTES[3] and aware.tokens_after <= 0.3 * aware.tokens_before
    assert "9376" in compress_text(tokens, text, target_ratio=0.3, question="Room number of Grace?").text


def test_reordering_puts_the_most_relevant_paragraph_last_and_keeps_the_separators() -> None:
    text = "Grace is in room 9376.\n\nOmar is in room 6081.\n \nThe lockers are by the door.\n\n"
    assert reorder_paragraphs(text, "Which room is Grace in?") == (
        "The lockers are by the door.\n\nOmar is in room 6081.\n \nGrace is in room 9376.\n\n")
    # Equally relevant paragraphs keep their order; one paragraph, or no question, changes nothing.
    assert reorder_paragraphs(text, "Which room?") == (
        "The lockers are by the door.\n\nGrace is in room 9376.\n \nOmar is in room 6081.\n\n")
    assert reorder_paragraphs(text, "") == text
    assert reorder_paragraphs("Grace is in room 9376.", "Grace?") == "Grace is in room 9376."


class WordScorer:
    """Every word a token of surprisal 1 (whatever the text: the compressor scores the reordered one)."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def score(self, text: str) -> TokenSurprisal:
        self.texts.append(text)
        pieces = [m.group() for m in re.finditer(r"\s*\S+", text)]
        pieces[-1] += text[len("".join(pieces)):]
        return scored(text, pieces, [1.0] * len(pieces))


def test_a_reordering_policy_moves_the_relevant_notes_next_to_the_question_before_scoring() -> None:
    notes = "Answer from the notes.\n\nGrace is in room 9376.\n\nOmar is in room 6081.\n\nThe lockers are blue."
    chat = [{"role": "system", "content": notes}, {"role": "user", "content": "Which room is Grace in?"}]
    scorer = WordScorer()
    policy = CompressionPolicy(target_ratio=1.0, min_prompt_tokens=0, reorder=True)
    outcome = Compressor(lambda: scorer).compress(GenerationRequest("chat", messages=chat), policy)
    expected = "The lockers are blue.\n\nOmar is in room 6081.\n\nGrace is in room 9376."
    assert scorer.texts == [expected]
    assert outcome.request.messages[0]["content"] == "Answer from the notes.\n\n" + expected
    assert chat[0]["content"] == notes  # the client's request is not changed
    unordered = Compressor(lambda: WordScorer()).compress(GenerationRequest("chat", messages=chat),
                                                          CompressionPolicy(target_ratio=1.0, min_prompt_tokens=0))
    assert unordered.request.messages[0]["content"] == notes


def test_the_question_is_the_last_user_message_or_the_last_paragraph() -> None:
    assert question_of(GenerationRequest("chat", messages=CHAT)) == "The question?"
    multimodal = [{"role": "user", "content": [{"type": "text", "text": "Which room?"}, {"type": "image_url"}]}]
    assert question_of(GenerationRequest("chat", messages=multimodal)) == "Which room?"
    assert question_of(GenerationRequest("completion", prompt="Doc.\n\nQ: which room?")) == "Q: which room?"
    assert question_of(GenerationRequest("chat", messages=[{"role": "system", "content": "x"}])) == ""


def test_line_breaks_and_unscored_tokens_stay_whatever_the_ratio() -> None:
    pieces = ["First", " line", "\n", " second", " line"]
    text = "".join(pieces)
    done = compress_text(scored(text, pieces, [np.inf, 0, 0, 0, 0]), text, target_ratio=0.1)
    assert done.text == "First\n"
    assert done.tokens_after == 2


def test_opting_out_leaves_the_request_untouched_without_loading_the_scorer() -> None:
    request = GenerationRequest("chat", messages=CHAT, compress=False)
    outcome = Compressor(never_loaded).compress(request, CompressionPolicy(min_prompt_tokens=0))
    assert outcome.request is request
    assert outcome.skipped == "opted_out"
    rules = CompressionRules(Compressor(never_loaded), routes={}, models={"m": CompressionPolicy()})
    applied = asyncio.run(rules.apply("m", "m", TokenPrice(1e-5, 0), request))
    assert applied is not None and applied.skipped == "opted_out" and applied.request is request


def test_the_price_threshold_and_route_policies_pick_the_models() -> None:
    route_policy = CompressionPolicy(target_ratio=0.3, min_input_usd_per_mtok=2.0)
    model_policy = CompressionPolicy(target_ratio=0.7)
    rules = CompressionRules(Compressor(never_loaded), routes={"auto": route_policy}, models={"big": model_policy})
    cheap, dear = TokenPrice(0.15e-6, 0), TokenPrice(2.5e-6, 0)
    assert rules.policy_for("auto", "small", cheap) is None  # below the route's price threshold
    assert rules.policy_for("auto", "big", dear) is route_policy  # the route's policy wins
    assert rules.policy_for("big", "big", cheap) is model_policy  # called directly: the model's, no threshold
    assert rules.policy_for("other", "small", dear) is None
    assert asyncio.run(rules.apply("auto", "small", cheap, GenerationRequest("chat", messages=CHAT))) is None


def test_the_trace_carries_tokens_ratio_latency_and_usd_saved() -> None:
    text = " a b c d"
    outcome = Compressor(lambda: Fixed(scored(text, [" a", " b", " c", " d"], [4, 1, 3, 2]))).compress(
        GenerationRequest("chat", messages=[{"role": "user", "content": text},
                                            {"role": "assistant", "content": "x"},
                                            {"role": "user", "content": "q"}]),
        CompressionPolicy(target_ratio=0.5, min_prompt_tokens=0))
    assert outcome.request.messages[0]["content"] == " a c"
    record = trace_record("big", outcome, TokenPrice(10e-6, 0))
    trace = DecisionTrace("auto", compressions=[record])
    body = json.loads(json.dumps(trace.to_dict()))
    assert body["compression"] == [{"model": "big", "outcome": "compressed", "tokens_before": 4, "tokens_after": 2,
                                    "ratio": 0.5, "latency_s": pytest.approx(outcome.seconds),
                                    "saved_usd": pytest.approx(2 * 10e-6)}]


def test_prompts_below_the_minimum_are_sent_as_they_are() -> None:
    text = " a b c d"
    request = GenerationRequest("chat", messages=[{"role": "user", "content": text},
                                                  {"role": "assistant", "content": "x"},
                                                  {"role": "user", "content": "q"}])
    outcome = Compressor(lambda: Fixed(scored(text, [" a", " b", " c", " d"], [4, 1, 3, 2]))).compress(
        request, CompressionPolicy(min_prompt_tokens=5))
    assert outcome.skipped == "too_short" and outcome.request is request


class Fixed:
    """Scores every text with the same precomputed result (for texts the test controls)."""

    def __init__(self, result: TokenSurprisal) -> None:
        self.result = result

    def score(self, text: str) -> TokenSurprisal:
        return self.result


def test_config_keys_on_routes_and_models() -> None:
    config = parse_config("""
models:
  - {name: big, backend: openai/big, input_cost_per_token: 0.0000025,
     compression: {target_ratio: 0.4, min_prompt_tokens: 100}}
  - {name: small, backend: openai/small}
routes:
  - {name: auto, models: [small, big], compression: {min_input_usd_per_mtok: 1.0, keep_recent: 4, unit: token,
                                                     question_aware: true, reorder: true}}
compressor: {layers: 4, head_vocab: 2048}
""")
    rules = build_compression(config)
    assert rules is not None
    assert rules.models["big"] == CompressionPolicy(target_ratio=0.4, min_prompt_tokens=100)
    assert rules.routes["auto"] == CompressionPolicy(keep_recent=4, unit="token", min_input_usd_per_mtok=1.0,
                                                     question_aware=True, reorder=True)
    assert config.compressor.layers == 4
    off = parse_config("models:\n  - {name: big, backend: openai/big, compression: {enabled: false}}\n")
    assert build_compression(off) is None
    with pytest.raises(ConfigError, match="target_ratio"):
        parse_config("models:\n  - {name: big, backend: openai/big, compression: {target_ratio: 0}}\n")
