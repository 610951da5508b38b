"""`frugal cascade fit / eval`: fitting cascades to labelled outcomes and evaluating them (docs/cascade.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.common import echo_json, fail, read_grid
from gateway.cli.learning import cascade_refit, cascade_rollback, cascade_versions
from gateway.cli.scorer import LAYOUT_HELP, LEARNER_HELP, check_learner

app = typer.Typer(no_args_is_help=True, help="Fit, evaluate, refit and roll back cascades (docs/cascade.md, "
                  "docs/learning.md).")
app.command("refit")(cascade_refit)
app.command("rollback")(cascade_rollback)
app.command("versions")(cascade_versions)


@app.command("fit")
def cascade_fit(
    data: Annotated[Path, typer.Option(help="Labelled outcomes (.jsonl.gz); only its train split is used")],
    out: Annotated[Path, typer.Option(help="The cascade file to write (cascade.yaml); the scorer goes beside it")],
    budget: Annotated[float | None, typer.Option(help="USD per query: the most accurate cascade within it")]
    = None,
    target_accuracy: Annotated[float | None, typer.Option(help="The cheapest cascade reaching this accuracy")]
    = None,
    max_depth: Annotated[int, typer.Option(min=1, max=3, help="Most tiers in a cascade")] = 3,
    models: Annotated[str | None, typer.Option(help="Comma-separated models to choose from (default: all)")]
    = None,
    any_order: Annotated[bool, typer.Option(help="Also try costlier models before cheaper ones")] = False,
    learner: Annotated[str, typer.Option(help=LEARNER_HELP)] = "logistic",
    layout: Annotated[str, typer.Option(help=LAYOUT_HELP)] = "per-model",
    folds: Annotated[int, typer.Option(min=2, max=20, help="Cross-fitting folds")] = 5,
    prices: Annotated[Path | None, typer.Option(help="YAML 'model: [in, out]' USD per million tokens: cost "
                                                     "answers from their tokens instead of the data's cost_usd")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the chosen cascade as JSON")] = False,
) -> None:
    """Fit a cascade on the train split (cross-fitted scorer, exhaustive search) and write cascade.yaml."""
    from router.cascade_file import point_to_yaml
    from router.fit.fitting import FitOptions, fit_cascade, read_prices
    from scorer.fit.train import TrainConfig

    if budget is not None and target_accuracy is not None:
        raise fail("give --budget or --target-accuracy, not both")
    check_learner(learner, layout)
    grid = read_grid(data)
    try:
        price_table = read_prices(prices) if prices else None
    except ValueError as exc:
        raise fail(str(exc)) from exc
    options = FitOptions(
        models=[m.strip() for m in models.split(",")] if models else None, max_depth=max_depth,
        order="any" if any_order else "cost", budget_usd=budget, target_accuracy=target_accuracy, folds=folds,
        prices=price_table, scorer=TrainConfig(learner=learner, layout=layout),  # type: ignore[arg-type]
    )
    try:
        cascade = fit_cascade(grid, out, options, progress=lambda step: typer.echo(step, err=True))
    except ValueError as exc:
        raise fail(str(exc)) from exc
    chosen = point_to_yaml(cascade.chosen)
    if as_json:
        echo_json({"cascade": str(out), "scorer": str(cascade.scorer), "chosen": chosen,
                    "frontier_points": len(cascade.frontier)})
        return
    tiers = " -> ".join(f"{t['model']}" + (f" (>= {t['threshold']:.3f})" if "threshold" in t else "")
                        for t in chosen["tiers"])
    typer.echo(f"{out}: {tiers}; train accuracy {chosen['accuracy']:.4f}, "
               f"cost {chosen['cost_usd']:.3g} USD/query; {len(cascade.frontier)} frontier points")


@app.command("eval")
def cascade_eval(
    data: Annotated[Path, typer.Option(help="Labelled outcomes (.jsonl.gz)")],
    cascade: Annotated[Path, typer.Option(help="A cascade file (frugal cascade fit)")],
    split: Annotated[str, typer.Option(help="test (default) or train")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write the accuracy-cost plot (PNG) here")] = None,
) -> None:
    """Accuracy, cost and tier shares of the cascade, every single model and the frontier, on a split."""
    from router.cascade_file import CascadeFile, CascadeFileError
    from router.fit.report import evaluate
    from scorer.runtime import OnnxScorer, ScorerError

    try:
        fitted = CascadeFile.read(cascade)
        loaded = OnnxScorer(fitted.scorer)
    except (CascadeFileError, ScorerError) as exc:
        raise fail(str(exc)) from exc
    grid = read_grid(data)
    try:
        report = evaluate(grid, fitted, loaded, split, data, plot)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    if as_json:
        echo_json(report)
        return
    chosen, best = report["chosen"], report["best_single"]
    typer.echo(f"{report['dataset']} ({split}, {report['queries']} queries)")
    typer.echo(f"  cascade  {' -> '.join(t['model'] for t in chosen['tiers'])}: accuracy {chosen['accuracy']:.4f}, "
               f"cost {chosen['cost_usd']:.4g} USD/query, answered by tier: "
               + ", ".join(f"{s:.1%}" for s in chosen["shares"]))
    typer.echo(f"  best single model {best['tiers'][0]['model']}: accuracy {best['accuracy']:.4f}, "
               f"cost {best['cost_usd']:.4g} USD/query; cascade cost ratio {report['cost_ratio_vs_best']}")
    for single in report["single_models"]:
        typer.echo(f"    {single['tiers'][0]['model']:36} accuracy {single['accuracy']:.4f}  "
                   f"cost {single['cost_usd']:.4g}")
