"""How far a shadow audit's verdict can be trusted: the comparison rule (`scorer.agreement.compare`) against
gold, on the data packs' recorded answers (docs/learning.md, "Comparing two answers").

For each dataset's test split, the cheap answer is the weakest recorded model's (by train accuracy) and the
reference is the strongest model's, as an audit would pair a cheap tier with the route's top tier. Gold is
the pack's recorded correctness of the cheap answer. The verdict "agree" should mean the cheap answer is
right:
- sensitivity is P(agree | cheap right);
- specificity is P(disagree | cheap wrong);
- bias is how far the audit's false-accept estimate lands from the truth: the share of disagreements minus
  the share of wrong cheap answers. A biased verdict moves every estimate built on it, however many audits
  are run.

Long answers (MBPP's code) are compared by MiniLM cosine.

    .venv/bin/python bench/audit_agreement.py [--json] [--record]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import emit, markdown_table  # noqa: E402
from bench.auto_route import data_dir  # noqa: E402
from scorer.agreement import LONG_COSINE, compare  # noqa: E402
from scorer.fit.dataset import load_grid  # noqa: E402

DATASETS = ("zellinger_mmlu", "routerbench_arc_challenge", "routerbench_winogrande", "overruling",
            "zellinger_triviaqa", "routerbench_mbpp")


def measure(name: str, embed: Any) -> dict[str, Any]:
    grid = load_grid(data_dir() / f"{name}.jsonl.gz")
    train, test = grid.splits == "train", np.flatnonzero(grid.splits == "test")
    accuracy = np.nanmean(grid.correct[train], axis=0)
    cheap, top = int(np.argmin(accuracy)), int(np.argmax(accuracy))
    right, agree, methods = [], [], Counter()
    unusable = 0
    for q in test:
        answer, reference = grid.answers[q][cheap], grid.answers[q][top]
        if answer is None or reference is None or np.isnan(grid.correct[q, cheap]):
            continue
        verdict = compare(grid.queries[q], answer, reference, embed)
        methods[verdict.method] += 1
        if not verdict.usable:
            unusable += 1
            continue
        right.append(grid.correct[q, cheap] >= 0.5)
        agree.append(verdict.agree)
    r, a = np.array(right), np.array(agree)
    return {
        "dataset": name, "cheap": grid.models[cheap], "top": grid.models[top],
        "top_accuracy": float(np.nanmean(grid.correct[test, top])), "n": len(r), "unusable": unusable,
        "verdict_accuracy": float((r == a).mean()) if len(r) else None,
        "sensitivity": float(a[r].mean()) if r.any() else None,
        "specificity": float((~a[~r]).mean()) if (~r).any() else None,
        "true_wrong": float((~r).mean()) if len(r) else None,
        "estimated_wrong": float((~a).mean()) if len(r) else None,
        "methods": dict(methods),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    from gateway.cache.embedder import Embedder  # noqa: PLC0415

    embedder = Embedder()
    embedder.load()
    results = [measure(name.strip(), embedder.embed_many) for name in args.datasets.split(",") if name.strip()]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    table = markdown_table(
        ["dataset", "cheap → reference (recorded)", "reference accuracy", "pairs", "verdict accuracy",
         "sensitivity", "specificity", "true wrong", "estimated wrong", "bias (points)", "rules used"],
        [[r["dataset"], f"{r['cheap']} → {r['top']}", pct(r["top_accuracy"]), r["n"], pct(r["verdict_accuracy"]),
          pct(r["sensitivity"]), pct(r["specificity"]), pct(r["true_wrong"]), pct(r["estimated_wrong"]),
          "-" if r["true_wrong"] is None else f"{(r['estimated_wrong'] - r['true_wrong']) * 100:+.1f}",
          ", ".join(f"{k} {v}" for k, v in sorted(r["methods"].items()))] for r in results])
    notes = (f"Test splits; the cheap answer is the weakest recorded model's, the reference the strongest's (by "
             f"train accuracy); gold is the pack's recorded correctness of the cheap answer. Long answers are "
             f"compared by MiniLM cosine >= {LONG_COSINE}; references that say nothing readable make no verdict "
             "(not counted). The verdict inherits the reference's mistakes: where the reference is wrong, the "
             "audit mislabels the cheap answer, and the bias column is what that does to a false-accept estimate.")
    emit(args, "Audit verdicts against gold", "bench/audit_agreement.py", results, table, notes)


if __name__ == "__main__":
    main()
