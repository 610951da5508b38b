"""How good each local model is, and what its judge lets it take off the remote tiers (docs/local.md, "Quality").

For each local model (SmolLM2-135M, Qwen2.5-Coder-0.5B, and 1.5B when fetched), on the same fixed, hashed
subsets of the packs with gold answers (`scorer.fit.outcomes.chosen_queries`: `--per-split` queries per split of
MMLU, TriviaQA, OVERRULING, ARC and WinoGrande):

1. The model's greedy answers, asked exactly as the cascade asks its local tier (`scorer.fit.outcomes.messages_of`,
   the judge's request settings: 4 self-consistency samples, 64 tokens), graded as the judge is trained
   (`scorer.fit.grading`). Answers are cached outside the repository (`frugal judge build` shares the cache).
2. Its judge, built exactly as `frugal judge build` builds one (learner chosen on out-of-fold AUROC, threshold
   from out-of-fold scores on `train`) at a false-accept budget of `--target` (2%) of all queries.
3. On `test`: accuracy, the judge's AUROC, the share of the mixed workload it accepts and the share accepted
   and wrong; then a two-tier cascade, local then the dataset's top recorded model (the pack's answers and
   costs: gpt-4o for MMLU and TriviaQA, gpt-4-1106-preview for ARC and WinoGrande, gpt-4 for OVERRULING),
   against always asking that top model: accuracy and cost per query. Local time is priced at
   `--host-usd-per-hour` on each answer's wall seconds (an upper bound: answers overlapped on the host).

    .venv/bin/python bench/local_quality.py [--models A[:N],B[:N]] [--per-split 60] [--target 0.02] [--json]
        [--record]

`NAME:N` runs that model on N queries per split instead of `--per-split` (a larger model may get fewer: the
hashed subsets are nested, so the accuracy table compares every model on the smallest one).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import emit, markdown_table  # noqa: E402
from bench.auto_route import TIERS, data_dir  # noqa: E402
from scorer.fit.dataset import Grid, load_grid  # noqa: E402
from scorer.fit.grading import GRADED  # noqa: E402
from scorer.fit.judge_build import Outcomes, build, graded_outcomes  # noqa: E402
from scorer.fit.outcomes import chosen_queries, outcomes_folder  # noqa: E402
from scorer.judge import LocalJudge  # noqa: E402
from scorer.signals import JudgeSettings  # noqa: E402
from workers.local.downloads import DOWNLOADS, fetched_path  # noqa: E402

MODELS = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]
DATASETS = ["zellinger_mmlu", "zellinger_triviaqa", "overruling", "routerbench_arc_challenge",
            "routerbench_winogrande"]
SETTINGS = JudgeSettings(samples=4, max_tokens=64)


def outcomes_of(model: str, grids: list[Grid], per_split: int, concurrency: int, collect_missing: bool) -> Path:
    """The model's cached outcomes folder, with the chosen queries answered (running the model if needed)."""
    from workers.local.catalog import resolve

    folder = resolve(model)
    cache = outcomes_folder(folder, SETTINGS)
    if collect_missing:
        from router.fit.judge_outcomes import collect
        from workers.local.backend import LocalBackend
        from workers.local.engine import EngineConfig

        backend = LocalBackend(f"local/{model}", folder, engine=EngineConfig(max_batch=16, max_queue=256))
        try:
            asyncio.run(collect(backend, grids, cache, per_split=per_split, concurrency=concurrency,
                                settings=SETTINGS))
        finally:
            asyncio.run(backend.aclose())
    return cache


def seconds_of(cache: Path, grids: list[Grid], outcomes: Outcomes) -> np.ndarray:
    from scorer.fit.outcomes import read_outcomes

    rows = {g.name: read_outcomes(cache / f"{g.name}.jsonl") for g in grids}
    by_name = {g.name: g for g in grids}
    assert outcomes.rows is not None
    return np.array([rows[d][by_name[d].query_ids[q]]["seconds"] for d, q in zip(outcomes.datasets, outcomes.rows,
                                                                                  strict=True)])


def evaluate(model: str, per_split: int, common: int, grids: list[Grid], args: argparse.Namespace) -> dict[str, Any]:
    from gateway.cache.embedder import Embedder

    cache = outcomes_of(model, grids, per_split, args.concurrency, not args.no_collect)
    outcomes = graded_outcomes(grids, cache, Embedder().embed_many, per_split=per_split)
    with tempfile.TemporaryDirectory() as folder:
        card = build(outcomes, Path(folder), model=f"local/{model}", settings=SETTINGS, target_false_accept=args.target,
                     data={"per_split": per_split})
        judge = LocalJudge(folder)
        scores = np.array(judge.score_features(outcomes.x))
    test = outcomes.mask("test")
    accepted = test & (scores >= judge.threshold)
    by_name = {g.name: g for g in grids}
    assert outcomes.rows is not None
    top_correct, top_cost = [], []
    for dataset, q in zip(outcomes.datasets, outcomes.rows, strict=True):
        grid = by_name[dataset]
        m = grid.models.index(TIERS[dataset][1])
        top_correct.append(float(grid.correct[q, m]))
        top_cost.append(float(grid.cost_usd[q, m]))
    top_ok, top_usd = np.array(top_correct), np.array(top_cost)
    local_usd = seconds_of(cache, grids, outcomes) * args.host_usd_per_hour / 3600
    cascade_ok = np.where(accepted, outcomes.y, top_ok)
    cascade_usd = local_usd + np.where(accepted, 0.0, top_usd)
    # Accuracy on the common subset (the first `common` hashed test queries of each dataset).
    chosen = {(g.name, q) for g in grids for q in chosen_queries(g, common)}
    in_common = test & np.array([(d, q) in chosen for d, q in zip(outcomes.datasets, outcomes.rows, strict=True)])
    per_dataset = {d: float(outcomes.y[in_common & (outcomes.datasets == d)].mean()) for d in DATASETS
                   if (in_common & (outcomes.datasets == d)).any()}
    return {
        "model": model, "per_split": per_split, "queries": int(test.sum()), "common_queries": int(in_common.sum()),
        "accuracy": float(outcomes.y[in_common].mean()), "kinds": card["kinds"],
        "by_dataset": per_dataset, "auroc": card["test"]["by_dataset"]["all"]["auroc_judge"],
        "learner": card["learner"]["name"], "threshold": judge.threshold,
        "accepted_share": float(accepted.sum() / test.sum()),
        "false_accept_share": float((accepted & (outcomes.y < 0.5)).sum() / test.sum()),
        "cascade_accuracy": float(cascade_ok[test].mean()), "top_accuracy": float(top_ok[test].mean()),
        "cascade_usd": float(cascade_usd[test].mean()), "top_usd": float(top_usd[test].mean()),
        "local_usd": float(local_usd[test].mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="Comma-separated; downloadable ones that are "
                        "not fetched are skipped")
    parser.add_argument("--per-split", type=int, default=60)
    parser.add_argument("--target", type=float, default=0.02, help="False-accept budget (share of all queries)")
    parser.add_argument("--host-usd-per-hour", type=float, default=0.10)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--no-collect", action="store_true", help="Use cached answers only")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    grids = [load_grid(data_dir() / f"{name}.jsonl.gz") for name in DATASETS]
    assert all(g.name in GRADED for g in grids)
    runs = []
    for spec in args.models.split(","):
        model, _, count = spec.partition(":")
        if model in DOWNLOADS and fetched_path(model) is None:
            print(f"{model}: not fetched (frugal models fetch {model}); skipped", file=sys.stderr)
            continue
        runs.append((model, int(count or args.per_split)))
    common = min(count for _, count in runs)
    results = [evaluate(model, count, common, grids, args) for model, count in runs]
    short = {"zellinger_mmlu": "MMLU", "zellinger_triviaqa": "TriviaQA", "overruling": "OVERRULING",
             "routerbench_arc_challenge": "ARC", "routerbench_winogrande": "WinoGrande"}
    accuracy = markdown_table(
        ["local model", "test queries", *[short[d] for d in DATASETS], "all"],
        [[r["model"], r["common_queries"], *[f"{r['by_dataset'].get(d, float('nan')):.1%}" for d in DATASETS],
          f"{r['accuracy']:.1%}"] for r in results])
    cascade = markdown_table(
        ["local model", "queries per split", "kinds its judge vouches for", "judge AUROC",
         f"taken locally at {args.target:.0%} false-accept budget", "accepted and wrong",
         "local → top: accuracy", "always top: accuracy", "local → top: USD/query", "always top: USD/query",
         "cost vs always top"],
        [[r["model"], r["per_split"], ", ".join(r["kinds"]) or "none",
          f"{r['auroc']:.3f}" if r["auroc"] is not None else "n/a", f"{r['accepted_share']:.1%}",
          f"{r['false_accept_share']:.1%}", f"{r['cascade_accuracy']:.1%}", f"{r['top_accuracy']:.1%}",
          f"{r['cascade_usd']:.2e}", f"{r['top_usd']:.2e}", f"{r['cascade_usd'] / r['top_usd'] - 1:+.1%}"]
         for r in results])
    notes = (f"Greedy accuracy on the first {common} hashed test queries per dataset, the same for every model "
             "(the prompts the cascade sends its local tier). Each model's judge is trained on its own train half "
             f"of its queries per split and its threshold set for at most {args.target:.0%} of all train queries "
             "accepted and wrong (out-of-fold); a task kind needs 40 graded train answers before the judge vouches "
             "for it; figures on that model's test half. Cascade: the judge accepts the local answer or the "
             "dataset's top "
             f"recorded model answers (pack correctness and cost); local time at ${args.host_usd_per_hour}/h on "
             "each answer's wall seconds (judge samples included).\n\n" + cascade)
    emit(args, "Local models: quality, judge and cascade effect", "bench/local_quality.py",
         {"results": results, "common_per_split": common, "target": args.target}, accuracy, notes)


if __name__ == "__main__":
    main()
