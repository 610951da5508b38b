"""The `frugal` command."""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
from pathlib import Path
from typing import Annotated

import typer

from workers.local.catalog import DEFAULT_QUANT

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Frugal: a cost-aware LLM gateway.")


def _logging(level: str) -> None:
    """Log lines are formatted and written by a listener thread: the event loop only enqueues them
    (a synchronous write and flush per request line cost ~0.7 ms of hot path, measured)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    log_queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(log_queue, handler, respect_handler_level=True)
    listener.start()
    atexit.register(listener.stop)
    # The queue side only renders the message; the listener's handler adds time, level and logger once.
    logging.basicConfig(level=level.upper(), handlers=[logging.handlers.QueueHandler(log_queue)], force=True,
                        format="%(message)s")


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option(help="YAML config (default: $FRUGAL_CONFIG, else built-in)")] = None,
    host: Annotated[str | None, typer.Option(help="Interface to listen on (default: server.host)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: server.port)")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run the gateway."""
    import uvicorn
    from threadpoolctl import threadpool_limits

    from gateway.app import create_app
    from gateway.settings import ConfigError, load_config

    _logging(log_level)
    # numpy's BLAS (the semantic cache's similarity scans) on one thread: a second thread only competes
    # with the event loop and the local engine, and doubles lookup latency when the other core is busy.
    threadpool_limits(limits=1, user_api="blas")
    try:
        settings = load_config(config)
        gateway = create_app(settings)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    uvicorn.run(
        gateway,
        host=host or settings.server.host,
        port=port if port is not None else settings.server.port,
        log_level=log_level,
        access_log=False,
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=10,
    )


@app.command("stand-in")
def stand_in(
    data: Annotated[list[Path], typer.Option(help="Recorded answers (.jsonl.gz of the cascade data pack); repeat "
                                                  "for several files")],
    host: Annotated[str, typer.Option(help="Loopback only: this is a test double")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 9100,
    latency_ms: Annotated[float, typer.Option(help="Delay before every answer")] = 0.0,
    chunk_latency_ms: Annotated[float, typer.Option(help="Delay before every streamed chunk")] = 0.0,
    error_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of requests that fail")] = 0.0,
    error_status: Annotated[int, typer.Option(help="HTTP status of injected failures")] = 500,
    hang_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of requests never answered")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for the injected randomness")] = 0,
    api_key: Annotated[str | None, typer.Option(help="Require this bearer key (401 otherwise)")] = None,
    log_level: Annotated[str, typer.Option()] = "warning",
) -> None:
    """Run the stand-in provider: an OpenAI-compatible server answering with real LLMs' recorded answers."""
    import uvicorn

    from standin.data import RecordedAnswers
    from standin.faults import Faults
    from standin.server import create_standin_app

    _logging(log_level)
    if not (host.startswith("127.") or host in ("localhost", "::1")):
        typer.echo("error: the stand-in provider listens on loopback only", err=True)
        raise typer.Exit(2)
    missing = [str(p) for p in data if not p.is_file()]
    if missing:
        typer.echo(f"error: no such data file: {', '.join(missing)}", err=True)
        raise typer.Exit(2)
    answers = RecordedAnswers.load(data)
    # Token counts need litellm's bundled tokenizer; importing litellm takes 4-17 s on a busy 2-core
    # machine. Pay it before listening, not in the first request (which then timed out clients).
    from workers.tokens import count_tokens

    count_tokens("warm up")
    typer.echo(f"stand-in: {len(answers)} queries, {len(answers.models)} models, on http://{host}:{port}/v1",
               err=True)
    faults = Faults(latency_ms=latency_ms, chunk_latency_ms=chunk_latency_ms, error_rate=error_rate,
                    error_status=error_status, hang_rate=hang_rate, seed=seed)
    uvicorn.run(create_standin_app(answers, faults, api_key), host=host, port=port, log_level=log_level,
                access_log=False, loop="uvloop", http="httptools")


models_app = typer.Typer(no_args_is_help=True, help="Build and list local models (ONNX, no torch).")
app.add_typer(models_app, name="models")


@models_app.command("build")
def models_build(
    model: Annotated[str, typer.Argument(help="A known model (smollm2-135m-instruct, minilm-l6-v2) or a GGUF path")],
    quant: Annotated[str, typer.Option(help="int8 (default), int4, fp16 or fp32")] = DEFAULT_QUANT,
    compute: Annotated[str | None, typer.Option(help="Activation precision: fp32 or int8 (default: per quant)")]
    = None,
    out: Annotated[Path | None, typer.Option(help="Models folder (default: $FRUGAL_MODELS_DIR or "
                                                  "~/.cache/frugal/models)")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if built")] = False,
) -> None:
    """Build a model folder (ONNX graph, tokenizer, config) from a GGUF or a packaged encoder."""
    from tqdm import tqdm

    from workers.local.catalog import build
    from workers.local.gguf_model import UnsupportedModel

    bar = tqdm(desc=f"building {model}", unit="step", leave=True)

    def step(message: str) -> None:
        bar.set_postfix_str(message)
        bar.update(1)

    try:
        folder = build(model, quant, root=out, progress=step, force=force, compute=compute)
    except (UnsupportedModel, ValueError, FileNotFoundError) as exc:
        bar.close()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    bar.close()
    typer.echo(str(folder))


@models_app.command("list")
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array")] = False,
    out: Annotated[Path | None, typer.Option(help="Models folder")] = None,
) -> None:
    """Show the built models, their size, quantization and location."""
    import json

    from workers.local.catalog import list_built, models_dir

    built = list_built(out)
    if as_json:
        typer.echo(json.dumps([b.to_json() for b in built], indent=2))
        return
    if not built:
        typer.echo(f"no models built in {out or models_dir()} (try: frugal models build smollm2-135m-instruct)")
    for b in built:
        typer.echo(f"{b.name:28} {b.kind:10} {b.quant:22} {b.size_bytes / 1e6:8.1f} MB  {b.path}")


@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="The user message")],
    model: Annotated[str, typer.Option(help="local/NAME")] = "local/smollm2-135m-instruct",
    max_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0)] = 0.0,
    seed: Annotated[int | None, typer.Option()] = None,
    quant: Annotated[str, typer.Option(help="int8 (default), int4, fp16 or fp32")] = DEFAULT_QUANT,
    raw: Annotated[bool, typer.Option(help="Send the prompt as is, without the chat template")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with text, usage and timings")]
    = False,
) -> None:
    """Generate with a local model, streaming to the terminal."""
    import json
    import time

    from workers.local.catalog import resolve
    from workers.local.generate import Generation, LocalGenerator
    from workers.local.sampling import SamplingParams

    if not model.startswith("local/"):
        typer.echo("error: --model must name a local model (local/NAME)", err=True)
        raise typer.Exit(2)
    generator = LocalGenerator(resolve(model.removeprefix("local/"), quant))
    text = prompt if raw else generator.chat_prompt([{"role": "user", "content": prompt}])
    ids = generator.encode(text)
    state = Generation()
    started = time.perf_counter()
    first: float | None = None
    for step in generator.stream(ids, SamplingParams(temperature=temperature, seed=seed), max_tokens, [], state):
        first = first or time.perf_counter()
        if not as_json:
            typer.echo(step.text, nl=False)
    elapsed = time.perf_counter() - started
    if as_json:
        decode_s = elapsed - ((first or started) - started)
        typer.echo(json.dumps({
            "model": model, "text": state.text, "finish_reason": state.finish_reason,
            "usage": {"prompt_tokens": state.prompt_tokens, "completion_tokens": state.completion_tokens},
            "time_to_first_token_s": round((first or started) - started, 4),
            "decode_tokens_per_s": round((state.completion_tokens - 1) / decode_s, 1)
            if state.completion_tokens > 1 and decode_s > 0 else None,
        }))
    else:
        typer.echo()


scorer_app = typer.Typer(no_args_is_help=True, help="Train and evaluate the answer scorer (docs/scorer.md).")
app.add_typer(scorer_app, name="scorer")
cascade_app = typer.Typer(no_args_is_help=True, help="Fit and evaluate cascades (docs/cascade.md).")
app.add_typer(cascade_app, name="cascade")

LEARNER_HELP = "logistic or boosting"
LAYOUT_HELP = "per-model (one learner per model) or pooled (one learner, the model as a feature)"


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _grid(path: Path, models: str | None = None):  # noqa: ANN202 - scorer.dataset.Grid, imported lazily
    from scorer.dataset import DataError, load_grid

    if not path.is_file():
        raise _fail(f"no such data file: {path}")
    try:
        grid = load_grid(path)
        return grid.with_models([m.strip() for m in models.split(",")]) if models else grid
    except DataError as exc:
        raise _fail(str(exc)) from exc


def _prices(path: Path | None) -> dict[str, tuple[float, float]] | None:
    import yaml

    if path is None:
        return None
    raw = yaml.safe_load(path.read_text())
    try:
        return {str(m): (float(p[0]), float(p[1])) for m, p in raw.items()}
    except (AttributeError, TypeError, ValueError, IndexError) as exc:
        raise _fail(f"{path}: expected 'model: [input, output]' in USD per million tokens") from exc


def _echo_json(body: object) -> None:
    import json

    typer.echo(json.dumps(body, indent=2))


@scorer_app.command("train")
def scorer_train(
    data: Annotated[list[Path], typer.Option(help="Labelled outcomes (.jsonl.gz, data pack schema); repeat for "
                                                  "several datasets (one scorer folder each)")],
    out: Annotated[Path, typer.Option(help="Output folder (one sub-folder per dataset when several)")],
    learner: Annotated[str, typer.Option(help=LEARNER_HELP)] = "logistic",
    layout: Annotated[str, typer.Option(help=LAYOUT_HELP)] = "per-model",
    models: Annotated[str | None, typer.Option(help="Comma-separated models to train for (default: all)")] = None,
) -> None:
    """Train a scorer on the train split and export it to ONNX."""
    from scorer.export import save
    from scorer.train import LEARNERS, TrainConfig, fit
    from scorer.vectors import LAYOUTS

    if learner not in LEARNERS or layout not in LAYOUTS:
        raise _fail(f"--learner: {', '.join(LEARNERS)}; --layout: {', '.join(LAYOUTS)}")
    config = TrainConfig(learner=learner, layout=layout)  # type: ignore[arg-type]
    for path in data:
        grid = _grid(path, models)
        folder = out / grid.name if len(data) > 1 else out
        save(fit(grid.split("train"), config), folder, extra={"dataset": grid.name})
        typer.echo(str(folder))


@scorer_app.command("eval")
def scorer_eval(
    data: Annotated[Path, typer.Option(help="Labelled outcomes (.jsonl.gz)")],
    scorer: Annotated[Path, typer.Option(help="A scorer folder (frugal scorer train)")],
    split: Annotated[str, typer.Option(help="train or test")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object")] = False,
) -> None:
    """AUROC, Brier score and calibration of the scorer, per model, on a split (first-tier scoring), and the
    AUROC of the model's own confidence over the answers that have one (what the scorer should match)."""
    import numpy as np

    from scorer.grid_scores import score_grid
    from scorer.quality import auroc, quality
    from scorer.runtime import OnnxScorer, ScorerError

    try:
        loaded = OnnxScorer(scorer)
    except ScorerError as exc:
        raise _fail(str(exc)) from exc
    grid = _grid(data)
    part = grid.split(split).with_models([m for m in grid.models if loaded.knows(m)])
    scores = score_grid(loaded, loaded.spec, part)
    report = {"dataset": grid.name, "split": split, "queries": len(part),
              "models": quality(scores.first, part.correct, part.models)}
    for j, model in enumerate(part.models):
        has = ~np.isnan(part.confidence[:, j])  # over the answers that have a confidence
        own = auroc(part.confidence[has, j], part.correct[has, j]) if has.sum() > 1 else None
        report["models"][model]["confidence_auroc"] = None if own is None else round(own, 4)
        report["models"][model]["with_confidence"] = int(has.sum())
    if as_json:
        _echo_json(report)
        return
    for model, q in report["models"].items():
        own = f"  (its confidence alone: {q['confidence_auroc']})" if q["confidence_auroc"] is not None else ""
        typer.echo(f"{model:36} AUROC {q['auroc'] if q['auroc'] is not None else '-':>6}  Brier {q['brier']:.4f}  "
                   f"ECE {q['ece']:.4f}  accuracy {q['accuracy']:.4f}{own}")


@cascade_app.command("fit")
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
    from router.fitting import FitOptions, fit_cascade
    from scorer.train import LEARNERS, TrainConfig
    from scorer.vectors import LAYOUTS

    if budget is not None and target_accuracy is not None:
        raise _fail("give --budget or --target-accuracy, not both")
    if learner not in LEARNERS or layout not in LAYOUTS:
        raise _fail(f"--learner: {', '.join(LEARNERS)}; --layout: {', '.join(LAYOUTS)}")
    grid = _grid(data)
    options = FitOptions(
        models=[m.strip() for m in models.split(",")] if models else None, max_depth=max_depth,
        order="any" if any_order else "cost", budget_usd=budget, target_accuracy=target_accuracy, folds=folds,
        prices=_prices(prices), scorer=TrainConfig(learner=learner, layout=layout),  # type: ignore[arg-type]
    )
    try:
        cascade = fit_cascade(grid, out, options, progress=lambda step: typer.echo(step, err=True))
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    chosen = point_to_yaml(cascade.chosen)
    if as_json:
        _echo_json({"cascade": str(out), "scorer": str(cascade.scorer), "chosen": chosen,
                    "frontier_points": len(cascade.frontier)})
        return
    tiers = " -> ".join(f"{t['model']}" + (f" (>= {t['threshold']:.3f})" if "threshold" in t else "")
                        for t in chosen["tiers"])
    typer.echo(f"{out}: {tiers}; train accuracy {chosen['accuracy']:.4f}, "
               f"cost {chosen['cost_usd']:.3g} USD/query; {len(cascade.frontier)} frontier points")


@cascade_app.command("eval")
def cascade_eval(
    data: Annotated[Path, typer.Option(help="Labelled outcomes (.jsonl.gz)")],
    cascade: Annotated[Path, typer.Option(help="A cascade file (frugal cascade fit)")],
    split: Annotated[str, typer.Option(help="test (default) or train")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write the accuracy-cost plot (PNG) here")] = None,
) -> None:
    """Accuracy, cost and tier shares of the cascade, every single model and the frontier, on a split."""
    from router.cascade_file import CascadeFile, CascadeFileError
    from router.report import evaluate
    from scorer.runtime import OnnxScorer, ScorerError

    try:
        fitted = CascadeFile.read(cascade)
        loaded = OnnxScorer(fitted.scorer)
    except (CascadeFileError, ScorerError) as exc:
        raise _fail(str(exc)) from exc
    grid = _grid(data)
    try:
        report = evaluate(grid, fitted, loaded, split, data, plot)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        _echo_json(report)
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


cache_app = typer.Typer(no_args_is_help=True, help="The response caches (docs/semantic-cache.md).")
app.add_typer(cache_app, name="cache")


@cache_app.command("calibrate")
def cache_calibrate(
    data_dir: Annotated[Path | None, typer.Option(help="Folder holding paraphrase/ (default: $FRUGAL_DATA_DIR, "
                                                       "else ../shared/data next to the repository)")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the full report (JSON) here")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the precision-recall plot (PNG) here")] = None,
    embeddings: Annotated[Path | None, typer.Option(help="Reuse (and extend) embeddings saved in this .npz")]
    = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Read only the first N pairs of each source")] = None,
    audit: Annotated[bool, typer.Option(help="Use the panel's verdicts on QQP pairs (gateway/cache/qqp_audit.jsonl) "
                                             "where it has them; --no-audit: QQP's labels alone")] = True,
    verifier_out: Annotated[Path | None, typer.Option(help="Write the fitted match verifier (JSON) here; "
                                                            "gateway/cache/verifier.json is the shipped one")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Choose the semantic cache's similarity threshold (and the match verifier's) on held-out human-labelled
    paraphrase pairs."""
    import json

    from gateway.cache.calibration import MAIN, calibrate, load_audit, paraphrase_dir
    from gateway.cache.calibration import plot as draw
    from gateway.cache.embedder import Embedder, SavedEmbeddings

    folder = paraphrase_dir(data_dir)
    if not folder.is_dir():
        raise _fail(f"no paraphrase pack at {folder}: set --data-dir or FRUGAL_DATA_DIR to the folder holding it")
    embedder = Embedder()
    embed = SavedEmbeddings(embeddings, embedder.embed_many) if embeddings else embedder.embed_many
    report = calibrate(folder, embed, audit=load_audit() if audit else None, limit=limit)
    model = report.pop("verifier_model")
    if verifier_out:
        verifier_out.write_text(json.dumps(model | {"command": "frugal cache calibrate --verifier-out "
                                                               "gateway/cache/verifier.json"}) + "\n")
    if out:
        out.write_text(json.dumps(report, indent=2) + "\n")
    if plot:
        draw(report, plot)
    if as_json:
        _echo_json(report | {"rules": {rule: {k: v for k, v in r.items() if k != "curve"}
                                       for rule, r in report["rules"].items()}})
        return
    typer.echo(f"labels: {report['labels']}")
    for rule, r in report["rules"].items():
        held = r["held_out"]
        kind = f" (verifier probability, on cosine ≥ {r['min_similarity']})" if "min_similarity" in r else ""
        typer.echo(f"{rule}: threshold {r['threshold']:.4f}{kind} (target on the fit part "
                   f"{'met' if r['target_met_on_fit'] else 'NOT met'}, lowest false-hit share there "
                   f"{r['lowest_false_hit_share_on_fit']:.2%}; on held-out {MAIN} "
                   f"{'met' if r['target_met_on_held_out'] else 'NOT met'})")
        rows = list(held.items())
        if "held_out_by_qqp_labels" in r:
            rows.insert(1, (f"{MAIN} (QQP's labels)", r["held_out_by_qqp_labels"]))
        for source, m in rows:
            natural = (f", {m['false_hit_share_at_base_rate']:.2%} at {m['base_rate']:.1%} duplicates"
                       if "base_rate" in m else "")
            typer.echo(f"  held-out {source:10} pairs {m['pairs']:5}  hits {m['hits']:5}  false-hit share "
                       f"{m['false_hit_share']:6.2%}{natural}  FPR {m['false_positive_rate']:.2%}  "
                       f"recall {m['recall']:.2%}" + ("  (main set)" if source == MAIN else ""))


def main() -> None:
    app()
