"""The local judge's parts without a model: reading answers, grading, signals, the card and its file, and a
build that gives the same bytes twice. The judge at work on live answers: tests/local/test_auto_route.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from router.judge import signals_of
from scorer.answers import chosen_letter, options_of, task_kind, yes_no
from scorer.fit.grading import Gold, grade, matches_any
from scorer.fit.judge_build import Outcomes, build, choose_threshold
from scorer.judge import CARD, MODEL, LocalJudge, packaged_judge, read_card
from scorer.signals import FEATURE_NAMES, JUDGE_SETTINGS, AnswerSignals, JudgeSettings, agreement, features
from workers.backend import Choice, GenerationResult, TokenLogprob, TopLogprob, Usage

MMLU = ("Question: Find the degree.\n\nChoices:\nA: 0\nB: 4\nC: 2\nD: 6\n\nAnswer: ")
ARC = "Which is a gas?\nA) water\nB) steam\nC) ice\nD) rock\nPrint only a single choice.\nAnswer:"


def test_letters_are_read_as_a_lenient_grader_reads_a_small_model() -> None:
    assert options_of(MMLU) == {"A": "0", "B": "4", "C": "2", "D": "6"}
    assert options_of(ARC)["B"] == "steam"
    letters = ("A", "B", "C", "D")
    for answer, letter in (("B", "B"), ("(C) 2", "C"), ("B: 4\n\nbecause", "B"), ("The answer is D.", "D"),
                           ("I think it's A", "A"), ("steam", "B"), ("nothing", None), ("E", None)):
        assert chosen_letter(answer, letters, options_of(ARC) if answer == "steam" else None) == letter, answer
    assert yes_no("Yes.") == "Yes" and yes_no(" no, it is not") == "No" and yes_no("Maybe") is None


def test_grading_follows_the_rule_of_each_dataset() -> None:
    assert grade("zellinger_mmlu", MMLU, "B: 4", Gold(letter="B", letters=("A", "B", "C", "D")))
    assert not grade("zellinger_mmlu", MMLU, "A", Gold(letter="B", letters=("A", "B", "C", "D")))
    assert grade("overruling", "Is it overruling?", "No", Gold(letter="No"))
    assert matches_any("Nicholas Nickleby.", ["nicholas nickleby"])
    assert matches_any("The answer is Nicholas Nickleby by Dickens", ["Nicholas Nickleby"])
    assert not matches_any("A long essay " * 5 + "Nicholas Nickleby", ["Nicholas Nickleby"])
    assert not matches_any("", ["Paris"])


@pytest.mark.parametrize(("query", "kind"), [
    (MMLU, "multiple_choice"), ("What is 17 * 23?", "arithmetic"), ("Who wrote 'Pride and Prejudice'?", "short_fact"),
    ("Write a Python function that reverses a string.", "code"), ("Is the sky blue?", "yes_no"),
    ("Tell me about the history of Rome.", "open_ended")])
def test_the_kind_of_task_is_read_from_the_query_alone(query: str, kind: str) -> None:
    assert task_kind(query) == kind


def test_self_consistency_agrees_on_letters_and_short_texts() -> None:
    assert agreement(MMLU, "B", ["B: 4", "(B)", "A", "C"]) == (0.5, 0.6)
    assert agreement("Who wrote Emma?", "Jane Austen", ["jane austen.", "Charlotte Bronte"])[0] == 0.5
    assert agreement("Who wrote Emma?", "Jane Austen", []) == (0.0, 0.0)
    long = "word " * 20

    def embed(texts: list[str]) -> np.ndarray:
        return np.array([[1.0, 0.0] if t == long else [0.0, 1.0] for t in texts])

    assert agreement("Tell me about Rome.", long, [long, "other " * 20], embed)[0] == 0.5


def test_features_follow_their_names_and_react_to_the_signals() -> None:
    sure = AnswerSignals("B", "stop", [-0.01], [[-0.01, -5.0]], ("B", "B"))
    unsure = AnswerSignals("B", "stop", [-1.5], [[-1.5, -1.6]], ("A", "C"))
    a, b = features(MMLU, sure), features(MMLU, unsure)
    assert a.shape == b.shape == (len(FEATURE_NAMES),) and a.dtype == np.float32
    name = FEATURE_NAMES.index
    assert a[name("mean_logprob")] > b[name("mean_logprob")] and a[name("agreement")] == 1.0
    assert b[name("agreement")] == 0.0 and a[name("first_margin")] > b[name("first_margin")]
    assert a[name("kind_multiple_choice")] == 1.0
    assert features(MMLU, sure, use_samples=False)[name("agreement")] == 0.0


def test_the_threshold_keeps_false_accepts_within_the_target() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    labels = np.array([1, 1, 0, 1, 1, 0, 0, 1, 0, 0], dtype=float)
    assert choose_threshold(scores, labels, 0.1) == 0.5   # accepting 0.9..0.5: one wrong of ten
    assert choose_threshold(scores, labels, 0.0) == 0.8
    assert choose_threshold(np.array([0.5, 0.5]), np.array([0.0, 0.0]), 0.0) == 1.0


def synthetic_outcomes(rows: int = 400, seed: int = 3) -> Outcomes:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, len(FEATURE_NAMES))).astype(np.float32)
    kinds = np.array(["multiple_choice", "yes_no"] * (rows // 2))
    x[:, FEATURE_NAMES.index("kind_multiple_choice")] = kinds == "multiple_choice"
    x[:, FEATURE_NAMES.index("kind_yes_no")] = kinds == "yes_no"
    y = (x[:, 0] + 0.5 * rng.normal(size=rows) > 0).astype(float)
    splits = np.array(["train", "train", "test"] * rows)[:rows]
    return Outcomes(np.where(kinds == "yes_no", "overruling", "zellinger_mmlu"), splits, kinds,
                    np.array([f"g{i}" for i in range(rows)]), x, x.copy(), x.copy(), y, "synthetic")


def test_a_judge_built_twice_from_the_same_outcomes_is_the_same_bytes(tmp_path: Path) -> None:
    outcomes = synthetic_outcomes()
    cards = [build(outcomes, tmp_path / name, model="local/test", settings=JUDGE_SETTINGS, target_false_accept=0.05,
                   data={"files": ["synthetic"]}) for name in ("one", "two")]
    for file in (CARD, MODEL):
        assert (tmp_path / "one" / file).read_bytes() == (tmp_path / "two" / file).read_bytes()
    card = cards[0]
    assert card["kinds"] == ["multiple_choice", "yes_no"]
    assert card["test"]["by_dataset"]["all"]["auroc_judge"] > 0.8  # the signal in feature 0 was learned
    judge = LocalJudge(tmp_path / "one")
    assert judge.threshold == card["threshold"] and judge.kinds == {"multiple_choice", "yes_no"}


def test_a_judge_whose_file_does_not_match_its_card_is_refused(tmp_path: Path) -> None:
    from scorer.judge import JudgeError

    build(synthetic_outcomes(), tmp_path, model="local/test", settings=JUDGE_SETTINGS, target_false_accept=0.05,
          data={})
    blob = bytearray((tmp_path / MODEL).read_bytes())
    blob[-1] ^= 1
    (tmp_path / MODEL).write_bytes(bytes(blob))
    with pytest.raises(JudgeError, match="does not match its card"):
        LocalJudge(tmp_path)


@pytest.mark.parametrize("model", ["local/smollm2-135m-instruct", "local/qwen2.5-coder-0.5b-instruct"])
def test_a_packaged_judge_matches_its_card_and_judges_a_result(model: str) -> None:
    folder = packaged_judge(model)
    assert folder is not None, "each catalogue decoder ships with its judge (scorer/judges/)"
    card = read_card(folder)
    assert hashlib.sha256((folder / MODEL).read_bytes()).hexdigest() == card["onnx_sha256"]
    assert card["features"] == list(FEATURE_NAMES) and card["model"] == model
    assert JudgeSettings.from_json(card["settings"]).samples == card["settings"]["samples"]
    for kind in card["kinds"]:  # the card reports every kind it vouches for, against the mean log-prob
        row = card["test"]["by_kind"][kind]
        assert row["auroc_judge"] is not None and row["auroc_mean_logprob"] is not None
    judge = LocalJudge(folder)
    top = [TopLogprob("B", -0.05), TopLogprob("A", -3.0)]
    result = GenerationResult("local", [Choice(0, "B", "stop", [TokenLogprob("B", -0.05, top)])], Usage(50, 1), 0.1,
                              0.0, samples=["B", "B", "B", "B"])
    signals = signals_of(result)
    assert signals.logprobs == [-0.05] and signals.top == [[-0.05, -3.0]] and signals.samples == ("B",) * 4
    assert 0.0 <= judge.score(MMLU, signals) <= 1.0
    assert judge.score("Write a Python function that reverses a string.", signals) == 0.0  # a kind it never saw
    assert json.loads((folder / CARD).read_text()) == card


def test_judge_show_prints_the_packaged_card() -> None:
    import subprocess

    from tests.harness import BIN

    done = subprocess.run([str(BIN / "frugal"), "judge", "show"], capture_output=True, text=True, timeout=60)
    card = read_card(packaged_judge("local/smollm2-135m-instruct"))  # type: ignore[arg-type]
    assert done.returncode == 0, done.stderr
    assert f"threshold {card['threshold']:.4f}" in done.stdout and "| zellinger_mmlu |" in done.stdout
    missing = subprocess.run([str(BIN / "frugal"), "judge", "show", "--model", "local/nothing"], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "no judge is packaged for local/nothing" in missing.stderr
