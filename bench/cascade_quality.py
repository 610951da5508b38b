"""The cascade goals on every dataset of the data pack: fit on train (`frugal cascade fit` defaults), report
on test, against the best single model; the five-Llama comparison with Zellinger & Thomson's published
curves; FrugalGPT's OVERRULING figures alongside. Plots go to docs/img/.

Two ceilings tell where a missed goal comes from (`ceilings`): the cheapest cascade of the same search space
(up to three tiers, by cost) that reaches the goal's accuracy on test with a perfect scorer (if even that
costs more than 25% of the best model, no scorer can meet the goal), and with the fitted scorer but its
thresholds chosen on test itself (an optimistic ceiling for this scorer, which no cascade chosen on train
can beat; a diagnostic only, never used to choose anything).

    .venv/bin/python bench/cascade_quality.py [--datasets a,b] [--learner logistic] [--json] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import markdown_table, record  # noqa: E402
from router.cascade_file import CascadeFile  # noqa: E402
from router.fit.evaluation import query_costs  # noqa: E402
from router.fit.fitting import FitOptions, fit_cascade  # noqa: E402
from router.fit.optimizer import pareto, search, second_tier_pairs, sequences  # noqa: E402
from router.fit.reference import ZELLINGER, ZELLINGER_MODELS  # noqa: E402
from router.fit.report import evaluate  # noqa: E402
from scorer.fit.dataset import Grid, load_grid  # noqa: E402
from scorer.fit.grid_scores import GridScores, score_grid  # noqa: E402
from scorer.fit.train import TrainConfig  # noqa: E402
from scorer.runtime import OnnxScorer  # noqa: E402

DATA = Path(os.environ.get("FRUGAL_DATA_DIR", REPO.parent / "shared" / "data")) / "cascade"
PRICES = REPO / "examples" / "prices" / "zellinger.yaml"
IMG = REPO / "docs" / "img"


def ceilings(grid: Grid, scorer: OnnxScorer) -> dict[str, Any]:
    """On the test split: the cheapest cost (over the best model's) at which a cascade of up to three tiers
    reaches the best model's accuracy less 0.5 point, and the best accuracy within 25% of its cost, with a
    perfect scorer and with `scorer` at thresholds chosen on test (see the module's docstring)."""
    test = grid.split("test")
    cost = query_costs(test, None)
    seqs = sequences(test.models, cost.mean(axis=0), 3, "cost")
    pairs = second_tier_pairs(seqs)
    best = int(test.correct.mean(axis=0).argmax())
    target, best_cost = test.correct[:, best].mean() - 0.005, cost[:, best].mean()
    perfect = GridScores(test.correct.astype(float), {(a, b): test.correct[:, b].astype(float) for a, b in pairs})
    out: dict[str, Any] = {}
    for name, scores in (("perfect_scorer", perfect), ("scorer_tuned_on_test", score_grid(scorer, scorer.spec, test,
                                                                                         pairs))):
        frontier = pareto(search(test.models, scores, test.correct, cost, seqs))
        reaching = [p for p in frontier if p.accuracy >= target - 1e-12]
        within = [p for p in frontier if p.cost_usd <= 0.25 * best_cost]
        out[name] = {"cost_ratio_at_goal_accuracy": min(p.cost_usd for p in reaching) / best_cost if reaching else None,
                     "accuracy_within_25pct_cost": max(p.accuracy for p in within) if within else None}
    return out


def run(path: Path, options: FitOptions, plot: Path | None, work: Path) -> dict[str, Any]:
    grid = load_grid(path)
    started = time.perf_counter()
    out = work / f"{grid.name}-{len(options.models or [])}.yaml"
    fit_cascade(grid, out, options)
    fit_s = time.perf_counter() - started
    fitted = CascadeFile.read(out)
    report = evaluate(grid, fitted, OnnxScorer(fitted.scorer), "test", path, plot)
    report["fit_seconds"] = round(fit_s, 1)
    report["train_chosen"] = {"accuracy": fitted.chosen.accuracy, "cost_usd": fitted.chosen.cost_usd}
    if not options.models:
        report["ceilings"] = ceilings(grid, OnnxScorer(fitted.scorer))
    return report


def goal_row(r: dict[str, Any]) -> list[object]:
    best, chosen = r["best_single"], r["chosen"]
    met = chosen["accuracy"] >= best["accuracy"] - 0.005 and chosen["cost_usd"] <= 0.25 * best["cost_usd"]
    at_best = r["best_accuracy_at_best_model_cost"]
    return [r["dataset"], best["tiers"][0]["model"], f"{best['accuracy']:.4f}", f"{best['cost_usd']:.3g}",
            " → ".join(t["model"].split("/")[-1] for t in chosen["tiers"]), f"{chosen['accuracy']:.4f}",
            f"{chosen['cost_usd']:.3g}", f"{r['cost_ratio_vs_best']:.3f}",
            "yes" if met else "no",
            f"{at_best['accuracy']:.4f} @ {at_best['cost_usd']:.3g}" if at_best else "-",
            *[_ceiling(r["ceilings"][k]) for k in ("perfect_scorer", "scorer_tuned_on_test")]]


def _ceiling(c: dict[str, Any]) -> str:
    ratio = c["cost_ratio_at_goal_accuracy"]
    return (f"{ratio:.3f}" if ratio is not None else "never") + f" / {c['accuracy_within_25pct_cost']:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", help="comma-separated dataset names (default: every file of the pack)")
    parser.add_argument("--learner", default="logistic")
    parser.add_argument("--layout", default="per-model")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true", help="append to docs/BENCHMARKS.md, plots to docs/img/")
    args = parser.parse_args()
    names = args.datasets.split(",") if args.datasets else sorted(p.name.split(".")[0] for p in DATA.glob("*.jsonl.gz"))
    scorer = TrainConfig(learner=args.learner, layout=args.layout)
    prices = {m: tuple(p) for m, p in yaml.safe_load(PRICES.read_text()).items()}
    results: dict[str, Any] = {"goals": [], "zellinger": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in names:
            path = DATA / f"{name}.jsonl.gz"
            plot = IMG / f"cascade-{name}.png" if args.record else work / f"{name}.png"
            results["goals"].append(run(path, FitOptions(scorer=scorer), plot, work))
            print(goal_row(results["goals"][-1]), file=sys.stderr, flush=True)
            if name in ZELLINGER:
                plot = IMG / f"cascade-{name}-llama.png" if args.record else work / f"{name}-llama.png"
                options = FitOptions(scorer=scorer, models=ZELLINGER_MODELS, prices=prices)  # type: ignore[arg-type]
                results["zellinger"].append(run(path, options, plot, work))
    if args.json:
        print(json.dumps(results, indent=2, default=str))
        return
    table = markdown_table(
        ["dataset", "best single (test)", "acc", "USD/query", "cascade (fitted on train)", "acc", "USD/query",
         "cost ratio", "goal met", "best acc at best model's cost",
         "ceiling, perfect scorer: cost ratio / acc at 25%", "ceiling, this scorer tuned on test"],
        [goal_row(r) for r in results["goals"]])
    table += ("\n\nCeilings (test split, cascades of up to 3 tiers by cost): the cheapest cost, over the best model's, "
              "at which a cascade reaches the goal's accuracy, and the best accuracy within 25% of the best model's "
              "cost; with a perfect scorer, and with the fitted scorer at thresholds chosen on test itself (a "
              "diagnostic ceiling, not a result: nothing is chosen on test). 'never': no cascade reaches it.")
    zrows = []
    for r in results["zellinger"]:
        z = r.get("zellinger_continuous_optimization") or {}
        chosen = r["chosen"]
        zrows.append([r["dataset"], " → ".join(t["model"] for t in chosen["tiers"]), f"{chosen['accuracy']:.4f}",
                      f"{chosen['cost_usd'] * 1e6:.1f}", f"{z.get('at_or_above')}/{z.get('points')}",
                      f"{(z.get('share') or 0):.1%}"])
    table += ("\n\nFive Llama models, costs from answer-call tokens at list prices (the paper's basis), "
              "against the upper envelope of the paper's continuous-optimization test curves:\n\n"
              + markdown_table(["dataset", "chosen cascade", "acc", "USD per 1M queries",
                                "published points matched or beaten", "share"], zrows))
    print(table)
    if args.record:
        command = "python bench/cascade_quality.py " + " ".join(a for a in sys.argv[1:] if a != "--record")
        record("Cascade quality", command.strip(), table,
               f"Scorer: {args.learner}, {args.layout}. Plots: docs/img/cascade-*.png.")
        (REPO / "bench" / "results").mkdir(exist_ok=True)
        (REPO / "bench" / "results" / "cascade_quality.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
