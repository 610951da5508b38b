"""Threshold calibration on the paraphrase pack, and the embedder it relies on (real MiniLM ONNX model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.cache.calibration.calibrate import (
    AUDIT_PATH,
    MAIN,
    PANEL,
    SOURCES,
    Pair,
    calibrate,
    choose_threshold,
    held_out,
    judged_labels,
    load_audit,
    load_pairs,
    measure,
    panel_says_same,
    paraphrase_dir,
)
from gateway.cache.calibration.verifier_fit import export, fit
from gateway.cache.embedder import Embedder, SavedEmbeddings
from gateway.cache.guard import compatible
from gateway.cache.verifier import (
    DEFAULT_VERIFIER_THRESHOLD,
    FEATURES,
    MIN_SIMILARITY,
    features,
    lookup_floor,
    probability,
    shipped_model,
    verify,
)
from tests.harness import missing_data


def require_paraphrase_pack() -> Path:
    """The paraphrase pack's folder; skips (fails under CI) when it is not there."""
    folder = paraphrase_dir()
    if not all((folder / f"{source}.jsonl.gz").is_file() for source in SOURCES):
        missing_data(f"paraphrase pack missing at {folder}: set FRUGAL_DATA_DIR to the folder holding "
                     f"paraphrase/ (by default ../shared/data next to the repository)")
    return folder


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


def test_the_embedder_puts_paraphrases_closer_than_unrelated_questions(embedder: Embedder) -> None:
    import asyncio

    question = asyncio.run(embedder.embed("How do I reset my router password?"))
    paraphrase, unrelated = embedder.embed_many(["What is the way to reset the password of my router?",
                                                 "What is the capital of Australia?"])
    assert question.shape == (384,) and question.dtype == np.float32
    assert float(np.linalg.norm(question)) == pytest.approx(1.0, abs=1e-5)
    assert float(question @ paraphrase) > float(question @ unrelated) + 0.3


def test_saved_embeddings_embed_only_new_texts(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def fake(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        return np.array([[float(len(t)), 1.0] for t in texts], dtype=np.float32)

    saved = SavedEmbeddings(tmp_path / "e.npz", fake)
    first = saved(["a", "bb"])
    again = SavedEmbeddings(tmp_path / "e.npz", fake)(["bb", "ccc", "a"])
    assert calls == [["a", "bb"], ["ccc"]]
    assert first[1].tolist() == again[0].tolist() == [2.0, 1.0]


def test_held_out_groups_never_share_a_text() -> None:
    folder = require_paraphrase_pack()
    pairs = load_pairs(folder, MAIN, limit=3000)
    mask = held_out(pairs)
    assert 0.15 < mask.mean() < 0.45
    texts = [{" ".join(t.lower().split()) for p, m in zip(pairs, mask, strict=True) if m == side
              for t in (p.text_a, p.text_b)} for side in (True, False)]
    assert not texts[0] & texts[1]


def test_choose_threshold_meets_its_own_constraint() -> None:
    rng = np.random.default_rng(0)
    duplicate = rng.random(5000) < 0.5
    scores = np.where(duplicate, rng.normal(0.9, 0.05, 5000), rng.normal(0.6, 0.08, 5000))
    threshold = choose_threshold(scores, duplicate, target=0.01, min_hits=50)
    at = measure(scores, duplicate, threshold)
    assert at["false_hit_share"] <= 0.01 and at["hits"] >= 50
    lower = measure(scores, duplicate, float(np.max(scores[scores < threshold])))
    assert lower["false_hit_share"] > 0.01  # the lowest such threshold: one step down breaks it
    with pytest.raises(ValueError):
        choose_threshold(scores, duplicate, target=0.0, min_hits=4000)


@pytest.mark.parametrize("audited", [False, True], ids=["qqp-labels", "panel-labels"])
def test_calibration_on_a_slice_of_the_pack_picks_a_threshold_meeting_its_aim(embedder: Embedder,
                                                                              audited: bool) -> None:
    folder = require_paraphrase_pack()
    audit = load_audit() if audited else None
    report = calibrate(folder, embedder.embed_many, audit=audit, limit=300, min_hits=10)
    assert set(report["rules"]) == {"cosine", "cosine+guard", "cosine+verifier"}
    for rule in report["rules"]:
        r = report["rules"][rule]
        assert r["fit"]["hits"] >= 10
        assert r["fit"]["false_hit_share"] <= r["aimed_at"] + 1e-9
        assert r["target_met_on_fit"] == (r["aimed_at"] == report["target_false_hit_share"])
        assert set(r["held_out"]) == set(SOURCES)
        assert 0.5 < r["threshold"] <= 1.0
        assert ("held_out_by_qqp_labels" in r) == audited
    # The verifier's threshold is chosen on out-of-fold probabilities of the fit part (checked above like the
    # others'); its model comes with the report, with the floor the index is queried from.
    verifier = report["rules"]["cosine+verifier"]
    assert verifier["min_similarity"] == MIN_SIMILARITY
    model = report["verifier_model"]
    assert model["features"] == list(FEATURES) and model["trees"]
    assert model["threshold"] == verifier["threshold_exact"]
    assert MIN_SIMILARITY <= model["lookup_floor"] <= verifier["lowest_cosine_served"]
    if audited:
        assert report["labels"] == "panel where judged, else QQP"
        assert report["audit"]["pairs_judged"] > 0  # the first 300 QQP pairs include judged ones
    else:
        assert report["labels"] == "QQP" and report["audit"] is None


def test_the_panel_label_is_a_strict_majority_and_unsure_counts_against() -> None:
    assert panel_says_same(["same", "same", "different"])
    assert not panel_says_same(["same", "different", "unsure"])
    assert not panel_says_same(["same", "unsure", "unsure"])
    assert not panel_says_same(["same", "same", "different", "different"])  # a tie is not a majority
    pairs = [Pair("qqp:t:1", "a", "b", True), Pair("qqp:t:2", "c", "d", False), Pair("qqp:t:3", "e", "f", True),
             Pair("qqp:t:4", "g", "h", False)]
    audit = {"qqp:t:1": ["different"] * PANEL, "qqp:t:2": ["same"] * PANEL, "qqp:t:4": ["same"]}  # 4: one verdict
    assert judged_labels(pairs, audit).tolist() == [False, True, True, False]


def test_the_shipped_audit_judges_real_pairs_of_the_pack() -> None:
    audit = load_audit(AUDIT_PATH)
    assert len(audit) > 2000
    assert all(set(v) <= {"same", "different", "unsure"} for v in audit.values())
    panels = [v for v in audit.values() if len(v) >= PANEL]
    assert len(panels) > 2000 and sum(len(v) < PANEL for v in audit.values()) == 150  # the control pairs
    folder = require_paraphrase_pack()
    known = {p.pair_id for p in load_pairs(folder, MAIN)}
    assert set(audit) <= known


def test_the_guard_blocks_different_numbers_and_negations() -> None:
    assert compatible("How do I learn Python?", "What is the best way to learn Python?")
    assert not compatible("Best laptop under 500 dollars?", "Best laptop under 800 dollars?")
    assert not compatible("Can I take ibuprofen with coffee?", "Can't I take ibuprofen with coffee?")


def test_features_see_word_order_numbers_and_question_words() -> None:
    swapped = dict(zip(FEATURES, features("Flights from Chennai to Tirupur", "Flights from Tirupur to Chennai", 0.98),
                       strict=True))
    assert swapped["cosine"] == 0.98 and swapped["word_jaccard"] == 1.0
    assert swapped["content_order_agreement"] < 1.0 and swapped["bigram_jaccard"] < 1.0
    assert swapped["identical"] == 0.0 and len(swapped) == len(FEATURES)
    same = dict(zip(FEATURES, features("How do I learn Python?", "how do I learn python ?", 0.99), strict=True))
    assert same["identical"] == 1.0 and same["order_agreement"] == 1.0 and same["word_jaccard"] == 1.0
    numbers = dict(zip(FEATURES, features("Answers to lesson 5", "Answers to lesson 3", 0.97), strict=True))
    assert numbers["number_mismatch"] == 1.0 and numbers["negation_mismatch"] == 0.0
    wh = dict(zip(FEATURES, features("Why is the sky blue?", "When is the sky blue?", 0.9), strict=True))
    assert wh["wh_mismatch"] == 1.0 and wh["content_only_a"] == wh["content_only_b"] == 0.0
    assert wh["function_word_changes"] == wh["named_words_one_side"] == wh["question_count_difference"] == 0.0
    tense = dict(zip(FEATURES, features("Which is the longest bridge in India?",
                                        "Which will be the longest bridge in India?", 0.98), strict=True))
    assert tense["function_word_changes"] == 1.0 and tense["named_words_one_side"] == 0.0  # "will"
    named = dict(zip(FEATURES, features("Does Moto G4 support Jio?", "Does Moto G4 Plus support Jio?", 0.99),
                     strict=True))
    assert named["named_words_one_side"] == 1.0 and named["function_word_changes"] == 0.0
    extra = dict(zip(FEATURES, features("Can deaf people become farmers?",
                                        "Can deaf people become farmers? If so, how?", 0.97), strict=True))
    assert extra["question_count_difference"] == 1.0


def test_the_exported_trees_give_the_learner_s_probabilities() -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(1)
    rows = rng.random((600, len(FEATURES)))
    labels = rows[:, 0] + 0.3 * rows[:, 4] + rng.normal(0, 0.1, 600) > 0.8
    learner = HistGradientBoostingClassifier(max_iter=20, max_leaf_nodes=7, random_state=0).fit(rows, labels)
    model = export(learner)
    ours = [probability(model, row.tolist()) for row in rows[:50]]
    assert ours == pytest.approx(learner.predict_proba(rows[:50])[:, 1].tolist(), abs=1e-9)


def test_extra_training_rows_shape_the_model_but_not_the_out_of_fold_scores() -> None:
    rng = np.random.default_rng(2)
    rows = rng.random((400, len(FEATURES)))
    labels = rows[:, 0] > 0.5
    groups = np.arange(400) // 4
    alone, out_of_fold = fit(rows, labels, groups)
    # Extra pairs that say the opposite about feature 1 (always in training, never scored out of fold).
    extra = rng.random((400, len(FEATURES)))
    with_extra, out_of_fold_extra = fit(rows, labels, groups, extra, extra[:, 1] > 0.5)
    assert out_of_fold.shape == out_of_fold_extra.shape == (400,)
    probe = [0.9] + [0.1] * (len(FEATURES) - 1)
    assert probability(with_extra, probe) < probability(alone, probe)


def test_the_shipped_verifier_refuses_a_word_swap_and_serves_a_restatement() -> None:
    assert shipped_model()["threshold"] == DEFAULT_VERIFIER_THRESHOLD
    assert shipped_model()["features"] == list(FEATURES)
    assert MIN_SIMILARITY <= lookup_floor() < 1.0
    question = "How do I get from Chennai to Tirupur by train?"
    assert verify(question, "How do I get from Chennai to Tirupur by train ?", 0.999) >= DEFAULT_VERIFIER_THRESHOLD
    assert verify(question, "How do I get from Tirupur to Chennai by train?", 0.98) < DEFAULT_VERIFIER_THRESHOLD
    assert verify(question, question, MIN_SIMILARITY - 0.01) == 0.0
