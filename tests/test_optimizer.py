"""The optimizer: the search is exact, the frontier is a frontier, cross-fitting does not leak, and the
evaluation of a cascade query by query (the gateway's way) agrees with the vectorised one."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from router.cascade_file import CascadeFile, CascadeFileError
from router.fit.evaluation import evaluate_points, query_costs, replay
from router.fit.optimizer import choose, crossfit, pareto, search, second_tier_pairs, sequences
from router.fit.reference import ZELLINGER_MODELS, reference_dir, upper_envelope, zellinger_points
from router.tiers import CascadePoint, Tier
from scorer.fit.dataset import grid_from_rows, load_grid
from scorer.fit.export import save
from scorer.fit.grid_features import first_tier_features
from scorer.fit.grid_scores import GridScores
from scorer.fit.quality import auroc
from scorer.fit.train import TrainConfig, fit
from scorer.runtime import OnnxScorer
from tests.cascade_data import synthetic_file, synthetic_rows
from tests.harness import BIN, data_file


def _random_problem(seed: int, q: int = 120, m: int = 4):
    rng = np.random.default_rng(seed)
    correct = (rng.random((q, m)) < np.linspace(0.4, 0.9, m)).astype(float)
    cost = rng.random((q, m)) * np.linspace(1, 20, m)
    first = np.clip(correct * 0.3 + rng.random((q, m)) * 0.7, 0, 1)
    second = {(a, b): np.clip(correct[:, b] * 0.3 + rng.random(q) * 0.7, 0, 1)
              for a in range(m) for b in range(m) if a != b}
    return [f"m{j}" for j in range(m)], GridScores(first, second), correct, cost


def _simulate(point: CascadePoint, models, scores: GridScores, correct, cost) -> tuple[float, float]:
    cols = [models.index(t.model) for t in point.tiers]
    total_correct = total_cost = 0.0
    for q in range(correct.shape[0]):
        for k, j in enumerate(cols):
            total_cost += cost[q, j]
            if k == len(cols) - 1:
                break
            score = scores.first[q, j] if k == 0 else scores.second[(cols[0], j)][q]
            if score >= point.tiers[k].threshold:
                break
        total_correct += correct[q, j]
    n = correct.shape[0]
    return total_correct / n, total_cost / n


def test_search_figures_are_those_of_running_the_cascade() -> None:
    models, scores, correct, cost = _random_problem(1)
    seqs = sequences(models, cost.mean(axis=0), 3, "any")
    assert len(seqs) == 4 + 4 * 3 + 4 * 3 * 2
    points = search(models, scores, correct, cost, seqs, grid_size=6)
    assert {len(p.tiers) for p in points} == {1, 2, 3}
    for point in points[:: max(1, len(points) // 60)]:
        acc, spend = _simulate(point, models, scores, correct, cost)
        assert acc == pytest.approx(point.accuracy) and spend == pytest.approx(point.cost_usd)
        assert sum(point.shares) == pytest.approx(1.0)


def test_cost_order_keeps_cheaper_models_first() -> None:
    models, _, _, cost = _random_problem(2)
    mean = cost.mean(axis=0)
    for seq in sequences(models, mean, 3, "cost"):
        assert list(mean[list(seq)]) == sorted(mean[list(seq)])
    assert second_tier_pairs([(0, 1), (0, 1, 2), (1, 2, 3)]) == [(0, 1), (1, 2)]


def test_frontier_dominates_every_point_and_choose_respects_the_objective() -> None:
    models, scores, correct, cost = _random_problem(3)
    points = search(models, scores, correct, cost, sequences(models, cost.mean(axis=0), 3, "cost"), 8)
    frontier = pareto(points)
    costs = [p.cost_usd for p in frontier]
    accs = [p.accuracy for p in frontier]
    assert costs == sorted(costs) and all(b > a for a, b in zip(accs, accs[1:], strict=False))
    for point in points:
        assert any(f.cost_usd <= point.cost_usd + 1e-12 and f.accuracy >= point.accuracy - 1e-12 for f in frontier)
    budget = float(np.median(costs))
    chosen = choose(frontier, budget_usd=budget)
    assert chosen.cost_usd <= budget
    assert chosen.accuracy == max(p.accuracy for p in frontier if p.cost_usd <= budget)
    target = float(np.median(accs))
    reaching = choose(frontier, target_accuracy=target)
    assert reaching.accuracy >= target
    assert reaching.cost_usd == min(p.cost_usd for p in frontier if p.accuracy >= target)
    assert choose(frontier, target_accuracy=2.0) == frontier[-1]
    assert choose(frontier, budget_usd=-1.0) == frontier[0]


def test_crossfitting_does_not_score_answers_the_scorer_saw() -> None:
    """Labels are coin flips and every query is unique: a scorer can only memorise them. Its trees score
    the answers they were fitted on well; scored out of fold it must look like chance. (The calibrated
    scorer itself does not look good in sample: its calibration folds hold out whole queries.)"""
    rows = synthetic_rows(400, seed=5)
    rng = np.random.default_rng(5)
    for row in rows:
        row["split"] = "train"
        row["query"] = f"{row['query']} token{row['query_id']}x"
        row["correct"] = float(rng.random() < 0.5)
        row["confidence"] = None
    train = grid_from_rows(rows)
    config = TrainConfig(learner="boosting")
    in_sample = fit(train, config)
    features = first_tier_features(config.spec, train, 0)
    calibrated = in_sample.learners[train.models[0]].calibrated_classifiers_[0]
    fitted_rows = calibrated.estimator.predict_proba(features)[:, 1]  # the trees of one calibration fold
    oof = crossfit(train, config, [], folds=4).first[:, 0]
    assert auroc(fitted_rows, train.correct[:, 0]) > 0.75  # memorised (they saw two thirds of the queries)
    assert abs(auroc(oof, train.correct[:, 0]) - 0.5) < 0.1


def test_replay_matches_the_vectorised_evaluation(tmp_path: Path) -> None:
    grid = load_grid(synthetic_file(tmp_path / "s.jsonl.gz", 200, seed=7))
    train, test = grid.split("train"), grid.split("test")
    scorer = OnnxScorer(save(fit(train), tmp_path / "scorer"))
    cost = query_costs(test, None)
    points = [CascadePoint((Tier("cheap", 0.6), Tier("big")), 0, 0, ()),
              CascadePoint((Tier("cheap", 0.55), Tier("mid", 0.6), Tier("big")), 0, 0, ()),
              CascadePoint((Tier("mid"),), 0, 0, ())]
    fast = evaluate_points(points, test, cost, scorer)
    for point, vectorised in zip(points, fast, strict=True):
        slow = replay(point.tiers, test, cost, scorer).point
        assert slow.accuracy == vectorised.accuracy
        assert slow.cost_usd == pytest.approx(vectorised.cost_usd)
        assert slow.shares == pytest.approx(vectorised.shares)
    assert 0 < fast[1].shares[0] < 1


def test_costs_from_prices() -> None:
    grid = grid_from_rows(synthetic_rows(6))
    cost = query_costs(grid, {"cheap": (1.0, 2.0), "mid": (1.0, 2.0), "big": (10.0, 20.0)})
    assert cost[0, 0] == pytest.approx((grid.input_tokens[0, 0] * 1 + grid.output_tokens[0, 0] * 2) / 1e6)
    with pytest.raises(ValueError, match="no prices for"):
        query_costs(grid, {"cheap": (1.0, 1.0)})


def test_cascade_file_round_trip_and_errors(tmp_path: Path) -> None:
    point = CascadePoint((Tier("a", 0.5), Tier("b")), 0.9, 1e-4, (0.6, 0.4))
    path = CascadeFile(point, tmp_path / "s", [point], [point], "ds", {"a": (1.0, 2.0)}).write(tmp_path / "c.yaml")
    back = CascadeFile.read(path)
    assert back.chosen.tiers == point.tiers and back.scorer == tmp_path / "s" and back.prices == {"a": (1.0, 2.0)}
    path.write_text("format: frugal-cascade\nchosen: {tiers: [{model: a}, {model: b}]}\n")
    with pytest.raises(CascadeFileError, match="tier 0 \\(a\\) needs a numeric threshold"):
        CascadeFile.read(path)
    path.write_text("hello: world\n")
    with pytest.raises(CascadeFileError, match="not a frugal cascade file"):
        CascadeFile.read(path)


def _frugal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "frugal"), *args], capture_output=True, text=True, timeout=300)


def test_fit_and_eval_commands(tmp_path: Path) -> None:
    data = synthetic_file(tmp_path / "synthetic.jsonl.gz", 240)
    out = tmp_path / "cascade.yaml"
    done = _frugal("cascade", "fit", "--data", str(data), "--out", str(out), "--budget", "0.0001", "--folds", "3",
                   "--json")
    assert done.returncode == 0, done.stderr
    fitted = json.loads(done.stdout)
    assert fitted["chosen"]["cost_usd"] <= 0.0001 and fitted["frontier_points"] >= 2
    assert (tmp_path / "cascade.scorer" / "scorer.json").is_file()
    plot = tmp_path / "plot.png"
    done = _frugal("cascade", "eval", "--data", str(data), "--cascade", str(out), "--json", "--plot", str(plot))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["split"] == "test" and report["queries"] == 120
    assert {s["tiers"][0]["model"] for s in report["single_models"]} == {"cheap", "mid", "big"}
    assert report["best_single"]["tiers"][0]["model"] == "big"
    assert sum(report["chosen"]["shares"]) == pytest.approx(1.0)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = _frugal("scorer", "train", "--data", str(data), "--out", str(tmp_path / "trained"), "--models", "cheap,big")
    assert done.returncode == 0, done.stderr
    done = _frugal("scorer", "eval", "--data", str(data), "--scorer", str(tmp_path / "trained"), "--json")
    assert done.returncode == 0, done.stderr
    models = json.loads(done.stdout)["models"]
    assert set(models) == {"cheap", "big"} and models["big"]["n"] == 120
    assert models["cheap"]["auroc"] > 0.6 and 0 <= models["cheap"]["brier"] <= 0.25
    assert models["cheap"]["confidence_auroc"] > 0.6  # the synthetic log-probs track correctness


def test_commands_refuse_bad_input(tmp_path: Path) -> None:
    data = synthetic_file(tmp_path / "synthetic.jsonl.gz", 20)
    done = _frugal("cascade", "fit", "--data", str(data), "--out", str(tmp_path / "c.yaml"), "--budget", "1",
                   "--target-accuracy", "0.9")
    assert done.returncode == 2 and "not both" in done.stderr
    done = _frugal("cascade", "fit", "--data", str(tmp_path / "missing.jsonl.gz"), "--out", str(tmp_path / "c.yaml"))
    assert done.returncode == 2 and "no such data file" in done.stderr
    done = _frugal("cascade", "eval", "--data", str(data), "--cascade", str(tmp_path / "none.yaml"))
    assert done.returncode == 2 and "cannot read cascade file" in done.stderr
    done = _frugal("cascade", "fit", "--data", str(data), "--out", str(tmp_path / "c.yaml"), "--models", "cheap,nope")
    assert done.returncode == 2 and "unknown models nope" in done.stderr


def test_published_zellinger_curves_are_read() -> None:
    path = data_file("zellinger_mmlu.jsonl.gz")
    points = zellinger_points(reference_dir(path), "zellinger_mmlu")
    assert len(points) > 100 and all(0 < p.cost_usd < 0.01 and 0 < p.accuracy < 1 for p in points)
    assert {m for p in points for m in p.label.split("->")} <= set(ZELLINGER_MODELS)
    envelope = upper_envelope(points)
    assert [p.cost_usd for p in envelope] == sorted(p.cost_usd for p in envelope)
    assert all(b.accuracy > a.accuracy for a, b in zip(envelope, envelope[1:], strict=False))
