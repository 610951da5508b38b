"""The scorer: features, training, ONNX export that predicts exactly what scikit-learn predicts, runtime."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from scorer.features import SIGNALS, FeatureSpec, Previous, featurize, normalized_answer
from scorer.fit.dataset import DataError, grid_from_rows, load_grid
from scorer.fit.export import save
from scorer.fit.grid_features import after, first_tier_features
from scorer.fit.grid_scores import score_grid
from scorer.fit.quality import auroc, quality
from scorer.fit.train import TrainConfig, fit, grouped_folds, text_mask
from scorer.runtime import OnnxScorer, ScorerError
from tests.cascade_data import synthetic_file, synthetic_rows


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory):
    return load_grid(synthetic_file(tmp_path_factory.mktemp("scorer") / "synthetic.jsonl.gz"))


def test_features_are_deterministic_and_see_signals() -> None:
    spec = FeatureSpec()
    one = featurize(spec, "What is 2+2?", "4", -0.1)
    assert np.array_equal(one, featurize(spec, "What is 2+2?", "4", -0.1))
    assert one.shape == (spec.size,)
    signals = dict(zip(SIGNALS, one[:len(SIGNALS)], strict=True))
    assert signals["has_confidence"] == 1.0 and math.isclose(signals["confidence"], -0.1, rel_tol=1e-6)
    assert signals["has_previous"] == 0.0
    refusal = featurize(spec, "q", "I'm sorry, I cannot help with that.", None)
    assert dict(zip(SIGNALS, refusal, strict=False))["refusal"] == 1.0
    assert dict(zip(SIGNALS, refusal, strict=False))["has_confidence"] == 0.0
    assert not np.array_equal(featurize(spec, "another question", "4", -0.1), one)


def test_agreement_patch_equals_featurizing_with_previous(grid) -> None:
    """The optimizer's vectorised second-tier features are exactly the gateway's per-answer features."""
    spec = FeatureSpec()
    features = first_tier_features(spec, grid, 1)
    agrees = np.array([normalized_answer(grid.answers[q][0]) == normalized_answer(grid.answers[q][1])
                       for q in range(len(grid))])
    assert agrees.any() and not agrees.all()
    patched = after(features, agrees, 0.42)
    for q in range(0, len(grid), 17):
        direct = featurize(spec, grid.queries[q], grid.answers[q][1], float(grid.confidence[q, 1]),
                           [Previous(grid.answers[q][0], 0.42)])
        assert np.array_equal(patched[q], direct)


def test_normalized_answer_folds_form_only() -> None:
    assert normalized_answer(" B. ") == normalized_answer("b") == "b"
    assert normalized_answer("Paris!") == normalized_answer("paris")
    assert normalized_answer("A") != normalized_answer("B")


@pytest.mark.parametrize(("learner", "layout"), [("logistic", "per-model"), ("logistic", "pooled"),
                                                 ("boosting", "per-model"), ("boosting", "pooled")])
def test_onnx_export_predicts_what_sklearn_predicts(grid, tmp_path: Path, learner: str, layout: str) -> None:
    train, test = grid.split("train"), grid.split("test")
    config = TrainConfig(learner=learner, layout=layout)  # type: ignore[arg-type]
    trained = fit(train, config)
    folder = save(trained, tmp_path / "scorer")
    loaded = OnnxScorer(folder)
    pairs = [(0, 2), (1, 2)]
    sk = score_grid(trained, config.spec, test, pairs)
    ort = score_grid(loaded, loaded.spec, test, pairs)
    assert np.allclose(sk.first, ort.first, atol=1e-5)
    for pair in pairs:
        assert np.allclose(sk.second[pair], ort.second[pair], atol=1e-5)
    # one answer through the gateway's path equals the batch path
    q = 3
    single = loaded.score(test.queries[q], test.answers[q][2], "big", float(test.confidence[q, 2]),
                          [("cheap", test.answers[q][0])])
    assert math.isclose(single, ort.second[(0, 2)][q], abs_tol=1e-6)
    # and the scores mean something on held-out queries
    value = auroc(ort.first[:, 1], test.correct[:, 1])
    assert value is not None and value > 0.7, value


def test_calibrated_probabilities_track_accuracy(grid, tmp_path: Path) -> None:
    loaded = OnnxScorer(save(fit(grid.split("train")), tmp_path / "s"))
    test = grid.split("test")
    scores = score_grid(loaded, loaded.spec, test)
    report = quality(scores.first, test.correct, test.models)
    for model, q in report.items():
        assert q["ece"] < 0.15, (model, q)
        assert abs(float(scores.first[:, test.models.index(model)].mean()) - q["accuracy"]) < 0.1


def test_a_model_that_is_always_right_gets_a_constant(tmp_path: Path) -> None:
    rows = synthetic_rows(40)
    for row in rows:
        if row["model"] == "big":
            row["correct"] = 1.0
    trained = fit(grid_from_rows(rows).split("train"))
    folder = save(trained, tmp_path / "s")
    loaded = OnnxScorer(folder)
    assert loaded.score("any", "A", "big") == 1.0
    assert sorted(p.name for p in folder.glob("*.onnx")) == ["00-cheap.onnx", "01-mid.onnx"]


def test_runtime_refuses_what_it_cannot_use(tmp_path: Path, grid) -> None:
    with pytest.raises(ScorerError, match="cannot read scorer manifest"):
        OnnxScorer(tmp_path)
    (tmp_path / "scorer.json").write_text('{"format": "something-else"}')
    with pytest.raises(ScorerError, match="not a frugal scorer"):
        OnnxScorer(tmp_path)
    loaded = OnnxScorer(save(fit(grid.split("train")), tmp_path / "ok"))
    with pytest.raises(ScorerError, match="not trained for model 'unknown'"):
        loaded.score("q", "a", "unknown")
    assert loaded.uses_confidence("big") and not loaded.uses_confidence("unknown")


def test_incomplete_grids_are_refused() -> None:
    rows = synthetic_rows(4)
    with pytest.raises(DataError, match="incomplete grid"):
        grid_from_rows(rows[:-1])
    with pytest.raises(DataError, match="no queries in split"):
        grid_from_rows(rows).split("validation")


def test_auroc_and_reliability() -> None:
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1.0])) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1.0])) == 0.0
    assert auroc(np.array([0.5, 0.5]), np.array([1.0, 1.0])) is None
    report = quality(np.array([[0.1], [0.9], [0.8], [0.3]]), np.array([[0.0], [1.0], [1.0], [0.0]]), ["m"])
    assert report["m"]["auroc"] == 1.0 and report["m"]["n"] == 4
    assert sum(row["n"] for row in report["m"]["reliability"]) == 4
    assert math.isclose(report["m"]["brier"], (0.01 + 0.01 + 0.04 + 0.09) / 4, abs_tol=1e-4)


def confident_rows(queries: int, seed: int) -> list[dict]:
    """Every answer is confident (log-probs within 0.02 of 0), and which ones are right shows only in how
    close to 0: right answers near -1e-4, wrong ones near -1e-2. Query text and answer lengths are noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(queries):
        for name in ("small", "large"):
            right = rng.random() < 0.6
            surprisal = float(np.exp(rng.normal(-9.0 if right else -4.8, 0.8)))
            rows.append({"dataset": "confident", "split": "train" if q % 2 == 0 else "test", "query_id": f"q{q}",
                         "query": f"question {rng.integers(10**6)} {rng.integers(10**6)}", "model": name,
                         "answer": "Paris" + " indeed" * int(rng.integers(0, 12)), "correct": float(right),
                         "cost_usd": 1e-5,
                         "confidence": -surprisal})
    return rows


def test_the_order_of_confident_answers_is_learned_and_noise_text_is_left_out(tmp_path: Path) -> None:
    grid = grid_from_rows(confident_rows(400, seed=3))
    trained = fit(grid.split("train"), TrainConfig(learner="logistic"))
    assert trained.choices["small"]["features"] == "signals"  # the hashed text is noise here
    loaded = OnnxScorer(save(trained, tmp_path / "s"))
    test = grid.split("test")
    scores = score_grid(loaded, loaded.spec, test).first
    for j in range(2):
        value = auroc(scores[:, j], test.correct[:, j])
        assert value is not None and value > 0.9, value  # ~0.67 on a linear log-prob (noise lengths win)
    # Served, the text the learner left out changes nothing (other words, the same length: a signal).
    query = test.queries[0]
    other = "z" * len(query)
    a = loaded.score(query, "Paris", "small", float(test.confidence[0, 0]))
    assert a == loaded.score(other, "Paris", "small", float(test.confidence[0, 0]))
    assert a != loaded.score(query, "Paris", "small", float(test.confidence[0, 0]) * 30)


def test_training_folds_hold_out_whole_queries() -> None:
    groups = np.repeat(np.arange(50), 2)[np.random.default_rng(0).permutation(100)]
    splits = grouped_folds(groups, 3, seed=1)
    assert sorted(np.concatenate([held for _, held in splits]).tolist()) == list(range(100))
    for train, held in splits:
        assert not set(groups[train].tolist()) & set(groups[held].tolist())


def test_a_scorer_of_older_feature_vectors_is_refused(tmp_path: Path, grid) -> None:
    folder = save(fit(grid.split("train")), tmp_path / "s")
    manifest = json.loads((folder / "scorer.json").read_text())
    manifest["spec"]["version"] = 1
    (folder / "scorer.json").write_text(json.dumps(manifest))
    with pytest.raises(ScorerError, match="feature vectors of version 1"):
        OnnxScorer(folder)


def test_leaving_text_out_keeps_the_signals_and_a_pooled_learners_model_code() -> None:
    spec = FeatureSpec()
    pooled_columns = spec.size + 3 + 3 * len(SIGNALS)  # three models: one-hot code, crossed signals
    mask = text_mask(pooled_columns, spec.size)
    assert not mask[:len(SIGNALS)].any() and not mask[spec.size:].any()
    assert mask[len(SIGNALS):spec.size].all()
