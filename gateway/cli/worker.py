"""`frugal worker`: a Celery worker serving local models to gateways whose config pools them (docs/distributed.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.common import configure_logging


def worker(
    model: Annotated[list[str], typer.Option(help="A local model to serve: local/NAME, or the name of a local model "
                                             "in the config (its quant and serving settings apply); repeatable")],
    config: Annotated[Path | None, typer.Option(help="YAML config (default: $FRUGAL_CONFIG, else built-in): the "
                                                "Redis URLs (or $REDIS_URL) and the models' settings")] = None,
    queue: Annotated[str | None, typer.Option(help="The Celery queue (one model only; default: the model's "
                                              "pool.queue, else frugal.local.NAME, as the gateway uses)")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once (threads sharing each "
                                             "model's one engine; its batching decides how many decode together)")]
    = 16,
    device: Annotated[str, typer.Option(help="cpu, cuda:K (GPU K only: one worker process per GPU), or auto")]
    = "auto",
    metrics_port: Annotated[int, typer.Option(help="Port of the worker's /metrics for Prometheus (0: none)")] = 9101,
    metrics_host: Annotated[str, typer.Option(help="Interface of the metrics endpoint")] = "0.0.0.0",
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Serve local models from a Celery queue: gateways enqueue one task per request, the answer streams back
    through Redis."""
    from gateway.backends import build_local_backend
    from gateway.settings import ConfigError, ModelConfig, load_config
    from workers.pool.worker import PooledModel, WorkerOptions, run_worker

    configure_logging(log_level)
    if queue is not None and len(model) != 1:
        raise typer.BadParameter("--queue names the queue of one model; give one --model")
    provider = "auto"
    if device == "cpu":
        provider = "cpu"
    elif device.startswith("cuda"):
        _, _, index = device.partition(":")
        if index:  # before ONNX Runtime initialises CUDA: this process sees that GPU only
            os.environ["CUDA_VISIBLE_DEVICES"] = index
        provider = "cuda"
    elif device != "auto":
        raise typer.BadParameter("--device is cpu, cuda, cuda:K or auto")
    try:
        settings = load_config(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if not settings.redis.broker or not settings.redis.state:
        typer.echo("error: a worker needs Redis: set $REDIS_URL (or redis.url, or redis.broker_url and "
                   "redis.state_url in the config)", err=True)
        raise typer.Exit(2)
    pooled = []
    for wanted in model:
        try:
            chosen = settings.model(wanted)
        except KeyError:
            if not wanted.startswith("local/"):
                typer.echo(f"error: {wanted!r} is neither local/NAME nor a model of the config", err=True)
                raise typer.Exit(2) from None
            chosen = ModelConfig(name=wanted.removeprefix("local/"), backend=wanted)
        if not chosen.is_local:
            typer.echo(f"error: {wanted!r} is a remote model ({chosen.backend}); workers serve local models", err=True)
            raise typer.Exit(2)
        pooled.append(PooledModel(queue or chosen.queue, chosen.name,
                                  lambda chosen=chosen: build_local_backend(chosen, provider, settings.cache.scope)))
    try:
        run_worker(pooled, WorkerOptions(settings.redis.broker, settings.redis.state, concurrency=concurrency,
                                         metrics_host=metrics_host, metrics_port=metrics_port or None,
                                         loglevel=log_level.upper()))
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
