"""Scoring latency: one answer through the scorer as the gateway scores it (features in numpy, then the
ONNX model on ONNX Runtime, one thread), per learner and layout; and, with `--compare`, which learner and
layout rank and calibrate best, measured out-of-fold on each dataset's train split (never on test).

    .venv/bin/python bench/scorer.py [--data FILE] [--repeat N] [--compare] [--json] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import markdown_table, record  # noqa: E402
from router.fit.optimizer import crossfit  # noqa: E402
from scorer.fit.dataset import load_grid  # noqa: E402
from scorer.fit.export import save  # noqa: E402
from scorer.fit.quality import quality  # noqa: E402
from scorer.fit.train import TrainConfig, fit  # noqa: E402
from scorer.runtime import OnnxScorer  # noqa: E402

DATA = Path(os.environ.get("FRUGAL_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")) / "cascade"
COMBOS = [("logistic", "per-model"), ("logistic", "pooled"), ("boosting", "per-model"), ("boosting", "pooled")]


def latency(data: Path, repeat: int) -> list[dict[str, object]]:
    grid = load_grid(data)
    train, test = grid.split("train"), grid.split("test")
    rows = []
    for learner, layout in COMBOS:
        with tempfile.TemporaryDirectory() as folder:
            scorer = OnnxScorer(save(fit(train, TrainConfig(learner=learner, layout=layout)), folder))
            model = test.models[1]
            j = test.models.index(model)
            times = []
            for i in range(repeat):
                q = i % len(test)
                started = time.perf_counter()
                scorer.score(test.queries[q], test.answers[q][j], model, float(test.confidence[q, j]),
                             [(test.models[0], test.answers[q][0])])
                times.append(time.perf_counter() - started)
        times.sort()
        rows.append({"learner": learner, "layout": layout, "p50_ms": statistics.median(times) * 1000,
                     "p99_ms": times[int(0.99 * (len(times) - 1))] * 1000, "mean_ms": statistics.fmean(times) * 1000})
    return rows


def compare(datasets: list[Path]) -> list[dict[str, object]]:
    rows = []
    for path in datasets:
        train = load_grid(path).split("train")
        for learner, layout in COMBOS:
            config = TrainConfig(learner=learner, layout=layout)
            started = time.perf_counter()
            scores = crossfit(train, config, [], folds=5)
            report = quality(scores.first, train.correct, train.models)
            aurocs = [q["auroc"] for q in report.values() if q["auroc"] is not None]
            rows.append({"dataset": train.name, "learner": learner, "layout": layout,
                         "mean_auroc": float(np.mean(aurocs)),
                         "brier": float(np.mean([q["brier"] for q in report.values()])),
                         "ece": float(np.mean([q["ece"] for q in report.values()])),
                         "seconds": time.perf_counter() - started})
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA / "zellinger_mmlu.jsonl.gz")
    parser.add_argument("--repeat", type=int, default=3000)
    parser.add_argument("--compare", action="store_true", help="also compare learners out-of-fold on every dataset")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true", help="append to docs/BENCHMARKS.md")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"no data file {args.data}: set FRUGAL_DATA_DIR to the folder holding cascade/")
    result: dict[str, object] = {"latency": latency(args.data, args.repeat)}
    if args.compare:
        result["compare"] = compare(sorted(args.data.parent.glob("*.jsonl.gz")))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    table = markdown_table(["learner", "layout", "p50 ms", "p99 ms", "mean ms"],
                           [[r["learner"], r["layout"], f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}",
                             f"{r['mean_ms']:.3f}"] for r in result["latency"]])  # type: ignore[index]
    if args.compare:
        table += "\n\nOut-of-fold on train (5 folds), mean over models:\n\n" + markdown_table(
            ["dataset", "learner", "layout", "mean AUROC", "Brier", "ECE", "s"],
            [[r["dataset"], r["learner"], r["layout"], f"{r['mean_auroc']:.3f}", f"{r['brier']:.4f}",
              f"{r['ece']:.4f}", f"{r['seconds']:.0f}"] for r in result["compare"]])  # type: ignore[index]
    print(table)
    if args.record:
        note = ("One answer scored as the gateway scores it (features + ONNX Runtime, one thread), with one "
                f"earlier tier's answer; data: {args.data.name}, {args.repeat} answers per row.")
        command = "python bench/scorer.py " + " ".join(a for a in sys.argv[1:] if a != "--record")
        record("Scorer", command.strip(), table, note)


if __name__ == "__main__":
    main()
