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

    from gateway.app import create_app
    from gateway.settings import ConfigError, load_config

    _logging(log_level)
    try:
        settings = load_config(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    uvicorn.run(
        create_app(settings),
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


def main() -> None:
    app()
