"""`frugal judge build / show`: a local model's judge (docs/cascade.md, "The local judge")."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli.common import echo_json, fail, read_grid
from gateway.cli.learning import judge_retrain

app = typer.Typer(no_args_is_help=True, help="Build, inspect and retrain a local model's judge (docs/cascade.md, "
                  "docs/learning.md).")
app.command("retrain")(judge_retrain)

#: How the packaged judge of the default local model was built (docs/cascade.md); the card records it too.
PER_SPLIT = 200


@app.command("build")
def judge_build(
    model: Annotated[str, typer.Option(help="The local model, e.g. local/smollm2-135m-instruct")],
    data: Annotated[list[Path], typer.Option(help="Data pack files (.jsonl.gz) with graded queries; repeat")],
    out: Annotated[Path, typer.Option(help="Output folder (judge.onnx, judge.json)")],
    per_split: Annotated[int, typer.Option(help="Queries per split per dataset (a hashed, reproducible "
                                                "sample); 0 = all")] = PER_SPLIT,
    samples: Annotated[int, typer.Option(help="Self-consistency samples per answer")] = 4,
    max_tokens: Annotated[int, typer.Option(help="Answer length the outcomes are generated with")] = 64,
    target_false_accept: Annotated[float, typer.Option(help="Share of all train queries that may be "
                                                            "accepted and wrong at the threshold")] = 0.015,
    quant: Annotated[str, typer.Option(help="The local model's build (int8, int4, fp16, fp32)")] = "int8",
    concurrency: Annotated[int, typer.Option(help="Queries in flight while generating outcomes")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print the card as JSON")] = False,
) -> None:
    """Run the local model on the data's queries (answers cached outside the repository and reused), grade
    them, train the judge on `train`, report on `test`, and write the judge with its card."""
    from router.fit.judge_outcomes import collect
    from scorer.fit.judge_build import build, graded_outcomes
    from scorer.fit.outcomes import outcomes_folder
    from scorer.signals import JudgeSettings
    from workers.local.backend import LocalBackend
    from workers.local.catalog import resolve
    from workers.local.engine import EngineConfig

    if not model.startswith("local/"):
        raise fail("--model: a local model, e.g. local/smollm2-135m-instruct")
    grids = [read_grid(path) for path in data]
    settings = JudgeSettings(samples=samples, max_tokens=max_tokens)
    folder = resolve(model.removeprefix("local/"), quant, progress=lambda step: typer.echo(f"building: {step}"))
    cache = outcomes_folder(folder, settings)
    backend = LocalBackend(model, folder, engine=EngineConfig(max_batch=16, max_queue=256))

    def progress(dataset: str, state: Any) -> None:
        if state.done % 25 == 0 or state.done == state.total:
            typer.echo(f"{dataset}: {state.done}/{state.total} answered", err=True)

    try:
        asyncio.run(collect(backend, grids, cache, per_split=per_split or None, concurrency=concurrency,
                            settings=settings, progress=progress))
    finally:
        asyncio.run(backend.aclose())
    from gateway.cache.embedder import Embedder

    outcomes = graded_outcomes(grids, cache, Embedder().embed_many, per_split=per_split or None)
    command = (f"frugal judge build --model {model} "
               + " ".join(f"--data $FRUGAL_DATA_DIR/cascade/{path.name}" for path in data)
               + f" --per-split {per_split} --samples {samples} --max-tokens {max_tokens} "
               f"--target-false-accept {target_false_accept:g} --quant {quant} --out DIR")
    card = build(outcomes, out, model=model, settings=settings, target_false_accept=target_false_accept,
                 data={"files": [p.name for p in data], "per_split": per_split or None, "quant": quant,
                       "model_source_sha256": _source_sha(folder), "outcomes_cache": cache.name,
                       "command": command})
    if as_json:
        echo_json(card)
    else:
        typer.echo(summary(card))
    typer.echo(str(out))


@app.command("show")
def judge_show(
    folder: Annotated[Path | None, typer.Argument(help="A judge folder (default: the packaged judge of --model)")]
    = None,
    model: Annotated[str, typer.Option(help="The local model whose packaged judge to show")] =
    "local/smollm2-135m-instruct",
    as_json: Annotated[bool, typer.Option("--json", help="The whole card as JSON")] = False,
) -> None:
    """The judge's card: its data, threshold and how it did on held-out queries."""
    from scorer.judge import JudgeError, packaged_judge, read_card

    where = folder or packaged_judge(model)
    if where is None:
        raise fail(f"no judge is packaged for {model}")
    try:
        card = read_card(where)
    except JudgeError as exc:
        raise fail(str(exc)) from exc
    typer.echo(summary(card) if not as_json else "", nl=not as_json)
    if as_json:
        echo_json(card)


def summary(card: dict[str, Any]) -> str:
    """The card as a table: per task on test, the judge's AUROC against the mean log-prob's, and what the
    threshold accepts."""
    lines = [f"judge for {card['model']}: threshold {card['threshold']:.4f} ({card['threshold_rule']}); "
             f"vouches for: {', '.join(card['kinds'])}",
             "| test set | queries | local accuracy | AUROC judge | AUROC mean log-prob | margin | accepted | "
             "false accepts |", "|---|---|---|---|---|---|---|---|"]
    for name, row in {**card["test"]["by_dataset"], **{f"kind: {k}": v for k, v in
                                                        card["test"]["by_kind"].items() if k != "all"}}.items():
        def cell(value: Any, pct: bool = False) -> str:
            if value is None:
                return "-"
            return f"{value:.1%}" if pct else f"{value:.3f}"

        lines.append(f"| {name} | {row['queries']} | {cell(row['local_accuracy'], True)} | {cell(row['auroc_judge'])} "
                     f"| {cell(row['auroc_mean_logprob'])} | {cell(row['auroc_margin'])} | "
                     f"{cell(row['accepted_share'], True)} | {cell(row['false_accept_share'], True)} |")
    return "\n".join(lines)


def _source_sha(folder: Path) -> str | None:
    import json

    return json.loads((folder / "frugal_model.json").read_text()).get("source_sha256")
