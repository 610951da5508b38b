"""`frugal scorer train / eval`: the answer scorer (docs/scorer.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.common import echo_json, fail, read_grid

app = typer.Typer(no_args_is_help=True, help="Train and evaluate the answer scorer (docs/scorer.md).")

LEARNER_HELP = "logistic or boosting"
LAYOUT_HELP = "per-model (one learner per model) or pooled (one learner, the model as a feature)"


def check_learner(learner: str, layout: str) -> None:
    from scorer.fit.train import LEARNERS
    from scorer.vectors import LAYOUTS

    if learner not in LEARNERS or layout not in LAYOUTS:
        raise fail(f"--learner: {', '.join(LEARNERS)}; --layout: {', '.join(LAYOUTS)}")


@app.command("train")
def scorer_train(
    data: Annotated[list[Path], typer.Option(help="Labelled outcomes (.jsonl.gz, data pack schema); repeat for "
                                                  "several datasets (one scorer folder each)")],
    out: Annotated[Path, typer.Option(help="Output folder (one sub-folder per dataset when several)")],
    learner: Annotated[str, typer.Option(help=LEARNER_HELP)] = "logistic",
    layout: Annotated[str, typer.Option(help=LAYOUT_HELP)] = "per-model",
    models: Annotated[str | None, typer.Option(help="Comma-separated models to train for (default: all)")] = None,
) -> None:
    """Train a scorer on the train split and export it to ONNX."""
    from scorer.fit.export import save
    from scorer.fit.train import TrainConfig, fit

    check_learner(learner, layout)
    config = TrainConfig(learner=learner, layout=layout)  # type: ignore[arg-type]
    for path in data:
        grid = read_grid(path, models)
        folder = out / grid.name if len(data) > 1 else out
        save(fit(grid.split("train"), config), folder, extra={"dataset": grid.name})
        typer.echo(str(folder))


@app.command("eval")
def scorer_eval(
    data: Annotated[Path, typer.Option(help="Labelled outcomes (.jsonl.gz)")],
    scorer: Annotated[Path, typer.Option(help="A scorer folder (frugal scorer train)")],
    split: Annotated[str, typer.Option(help="train or test")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object")] = False,
) -> None:
    """AUROC, Brier score and calibration of the scorer, per model, on a split (first-tier scoring), and the
    AUROC of the model's own confidence over the answers that have one (what the scorer should match)."""
    from scorer.fit.quality import scorer_report
    from scorer.runtime import OnnxScorer, ScorerError

    try:
        loaded = OnnxScorer(scorer)
    except ScorerError as exc:
        raise fail(str(exc)) from exc
    report = scorer_report(loaded, read_grid(data), split)
    if as_json:
        echo_json(report)
        return
    for model, q in report["models"].items():
        own = f"  (its confidence alone: {q['confidence_auroc']})" if q["confidence_auroc"] is not None else ""
        typer.echo(f"{model:36} AUROC {q['auroc'] if q['auroc'] is not None else '-':>6}  Brier {q['brier']:.4f}  "
                   f"ECE {q['ece']:.4f}  accuracy {q['accuracy']:.4f}{own}")
