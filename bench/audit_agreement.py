"""How far a shadow audit's verdict can be trusted: the comparison rule (`scorer.agreement.compare`) against
gold, on the data packs' recorded answers (docs/learning.md, "Comparing two answers").

For each graded dataset's test split (`scorer.fit.grading.GRADED`), the cheap answer is the weakest recorded
model's (by train accuracy) and the reference is the strongest model's, as an audit would pair a cheap tier
with the route's top tier. Gold is the pack's recorded correctness of the cheap answer. The verdict "agree"
should mean the cheap answer is right:
- sensitivity is P(agree | cheap right);
- specificity is P(disagree | cheap wrong);
- bias is how far the audit's false-accept estimate lands from the truth: the share of disagreements minus
  the share of wrong cheap answers. A biased verdict moves every estimate built on it, however many audits
  are run.

MBPP (not graded locally; its answers are code, the packs' only long answers) is measured too, for the MiniLM
rule; it is left out of the overall row. MiniLM is used only when its model is built (`frugal models build
minilm-l6-v2`); without it, or with --no-minilm, long answers fall back to the text rules. --sweep prints how
the cut `LONG_COSINE` was chosen: on MBPP's train split, every other model's answer against the strongest's,
the verdict's accuracy and bias at each cosine cut.

    .venv/bin/python bench/audit_agreement.py [--datasets a,b] [--no-minilm] [--sweep] [--json] [--record]
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
from scorer.fit.dataset import Grid, load_grid  # noqa: E402
from scorer.fit.grading import GRADED  # noqa: E402
from scorer.signals import Embed  # noqa: E402

LONG = "routerbench_mbpp"
DATASETS = (*GRADED, LONG)
CUTS = (0.78, 0.80, 0.82, 0.84, 0.86, 0.88, 0.90, 0.92, 0.94)


def cheap_and_top(grid: Grid) -> tuple[int, int]:
    """The weakest and the strongest model by train accuracy."""
    accuracy = np.nanmean(grid.correct[grid.splits == "train"], axis=0)
    return int(np.argmin(accuracy)), int(np.argmax(accuracy))


def verdicts(grid: Grid, split: str, cheap: int, top: int, embed: Embed | None) -> tuple[list, list, Counter]:
    """(cheap answer right, verdict agrees, verdict scores) for the usable pairs of a split, and the methods."""
    right, agree, methods = [], [], Counter()
    for q in np.flatnonzero(grid.splits == split):
        answer, reference = grid.answers[q][cheap], grid.answers[q][top]
        if answer is None or reference is None or np.isnan(grid.correct[q, cheap]):
            continue
        verdict = compare(grid.queries[q], answer, reference, embed)
        methods[verdict.method] += 1
        if verdict.usable:
            right.append(bool(grid.correct[q, cheap] >= 0.5))
            agree.append((verdict.agree, verdict.score, verdict.method))
    return right, agree, methods


def summary(right: list[bool], agree: list[bool]) -> dict[str, Any]:
    r, a = np.array(right, dtype=bool), np.array(agree, dtype=bool)
    return {
        "n": len(r),
        "verdict_accuracy": float((r == a).mean()) if len(r) else None,
        "sensitivity": float(a[r].mean()) if r.any() else None,
        "specificity": float((~a[~r]).mean()) if (~r).any() else None,
        "true_wrong": float((~r).mean()) if len(r) else None,
        "estimated_wrong": float((~a).mean()) if len(r) else None,
        "bias": float((~a).mean() - (~r).mean()) if len(r) else None,
    }


def measure(name: str, embed: Embed | None) -> dict[str, Any]:
    grid = load_grid(data_dir() / f"{name}.jsonl.gz")
    cheap, top = cheap_and_top(grid)
    print(f"{name}: cheap {grid.models[cheap]}, reference {grid.models[top]} (by train accuracy)", file=sys.stderr)
    right, agree, methods = verdicts(grid, "test", cheap, top, embed)
    test = grid.splits == "test"
    return {"dataset": name, "cheap": grid.models[cheap], "top": grid.models[top],
            "top_accuracy": float(np.nanmean(grid.correct[test, top])), "unusable": methods["unreadable"],
            "methods": dict(methods), "right": right, "agree": [a for a, _, _ in agree],
            **summary(right, [a for a, _, _ in agree])}


def sweep(embed: Embed) -> list[dict[str, Any]]:
    """Accuracy and bias of the MiniLM rule at each cut, on MBPP's train split: every model against the top."""
    grid = load_grid(data_dir() / f"{LONG}.jsonl.gz")
    _, top = cheap_and_top(grid)
    right: list[bool] = []
    cosines: list[float] = []
    for cheap in range(len(grid.models)):
        if cheap != top:
            r, agree, _ = verdicts(grid, "train", cheap, top, embed)
            pairs = [(ok, score) for ok, (_, score, method) in zip(r, agree, strict=True) if method == "minilm"]
            right += [ok for ok, _ in pairs]
            cosines += [score for _, score in pairs]
    r, c = np.array(right, dtype=bool), np.array(cosines)
    return [{"cut": cut, **summary(list(r), list(c >= cut))} for cut in CUTS]


def embedder(disabled: bool) -> Embed | None:
    """MiniLM's `embed_many` when the model is built, else None (said on stderr)."""
    if disabled:
        print("MiniLM off (--no-minilm): long answers compared by the text rules", file=sys.stderr)
        return None
    from gateway.cache.embedder import MODEL_NAME, Embedder  # noqa: PLC0415
    from workers.local.catalog import resolve  # noqa: PLC0415

    try:
        folder = resolve(MODEL_NAME, build_missing=False)
    except FileNotFoundError as error:
        print(f"{error}; falling back to the text rules for long answers", file=sys.stderr)
        return None
    model = Embedder(folder)
    model.load()
    return model.embed_many


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def points(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--no-minilm", action="store_true", help="text rules only, even when MiniLM is built")
    parser.add_argument("--sweep", action="store_true", help="also the MiniLM cut sweep on MBPP's train split")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    embed = embedder(args.no_minilm)
    results = [measure(name.strip(), embed) for name in args.datasets.split(",") if name.strip()]
    graded = [r for r in results if r["dataset"] in GRADED]
    if graded:
        methods: Counter = Counter()
        for r in graded:
            methods.update(r["methods"])
        right = [x for r in graded for x in r["right"]]
        agree = [x for r in graded for x in r["agree"]]
        overall = {"dataset": "overall (graded)", "cheap": "", "top": "", "top_accuracy": None,
                   "unusable": methods["unreadable"], "methods": dict(methods), **summary(right, agree)}
        results.append(overall)

    table = markdown_table(
        ["dataset", "cheap → reference (recorded)", "reference accuracy", "pairs", "verdict accuracy",
         "sensitivity", "specificity", "true wrong", "estimated wrong", "FA-estimate bias (points)", "rules used"],
        [[r["dataset"], f"{r['cheap']} → {r['top']}" if r["cheap"] else "-", pct(r["top_accuracy"]), r["n"],
          pct(r["verdict_accuracy"]), pct(r["sensitivity"]), pct(r["specificity"]), pct(r["true_wrong"]),
          pct(r["estimated_wrong"]), points(r["bias"]),
          ", ".join(f"{k} {v}" for k, v in sorted(r["methods"].items()))] for r in results])
    long_rule = (f"Long answers are compared by MiniLM cosine >= {LONG_COSINE}" if embed is not None
                 else "MiniLM was not used (not built, or --no-minilm): long answers are compared by the text rules")
    notes = (f"Test splits; the cheap answer is the weakest recorded model's, the reference the strongest's (by "
             f"train accuracy); gold is the pack's recorded correctness of the cheap answer. {long_rule}; "
             "references that say nothing readable make no verdict (not counted in pairs). The overall row pools "
             "the graded datasets' pairs (MBPP excluded). The verdict inherits the reference's mistakes: where "
             "the reference is wrong, the audit mislabels the cheap answer, and the bias column is what that does "
             "to a false-accept estimate.")
    result: dict[str, Any] = {"results": [{k: v for k, v in r.items() if k not in ("right", "agree")}
                                          for r in results]}
    if args.sweep and embed is not None:
        cuts = sweep(embed)
        result["sweep"] = cuts
        notes += ("\n\nThe MiniLM cut, chosen on MBPP's train split (every other model's answer against the "
                  f"strongest's, {cuts[0]['n']} pairs) as the least biased one:\n\n" + markdown_table(
                      ["cosine cut", "verdict accuracy", "sensitivity", "specificity", "FA-estimate bias (points)"],
                      [[f"{c['cut']:.2f}", pct(c["verdict_accuracy"]), pct(c["sensitivity"]), pct(c["specificity"]),
                        points(c["bias"])] for c in cuts]))
    emit(args, "Audit verdicts against gold", "bench/audit_agreement.py", result, table, notes)


if __name__ == "__main__":
    main()
