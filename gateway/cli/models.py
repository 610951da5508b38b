"""`frugal models build / list` and `frugal generate`: the local tier's models (docs/local.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from workers.local.catalog import DEFAULT_QUANT

app = typer.Typer(no_args_is_help=True, help="Build and list local models (ONNX, no torch).")


@app.command("build")
def models_build(
    model: Annotated[str, typer.Argument(help="A catalogue model (see `frugal models fetch`) or a GGUF path")],
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


@app.command("fetch")
def models_fetch(
    model: Annotated[str, typer.Argument(help="A catalogue model (qwen2.5-coder-0.5b-instruct, "
                                              "qwen2.5-coder-1.5b-instruct, smollm2-135m-instruct, minilm-l6-v2)")],
    out: Annotated[Path | None, typer.Option(help="Models folder (default: $FRUGAL_MODELS_DIR or "
                                                  "~/.cache/frugal/models)")] = None,
) -> None:
    """Download a model's source file (parts joined in order, SHA-256 checked) and print its path."""
    from tqdm import tqdm

    from workers.local.catalog import KNOWN
    from workers.local.downloads import DOWNLOADS, FetchError, fetch

    if model not in DOWNLOADS:
        if model not in KNOWN:
            typer.echo(f"error: {model!r} is not in the catalogue; choose from {', '.join(sorted(KNOWN))}", err=True)
            raise typer.Exit(2)
        try:
            typer.echo(str(KNOWN[model][1](out)))  # packaged with the install: nothing to download
        except FileNotFoundError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        return
    spec = DOWNLOADS[model]
    bar = tqdm(desc=f"fetching {model} ({spec.parts} parts)", total=spec.size, unit="B", unit_scale=True,
               unit_divisor=1024)

    def advance(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    try:
        path = fetch(model, root=out, progress=advance)
    except FetchError as exc:
        bar.close()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    bar.close()
    typer.echo(str(path))


@app.command("list")
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
