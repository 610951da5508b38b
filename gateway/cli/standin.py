"""`frugal stand-in`: the stand-in provider, a test double for LLM providers (docs/standin.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.common import configure_logging


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

    configure_logging(log_level)
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
