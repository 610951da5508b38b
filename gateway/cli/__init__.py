"""The `frugal` command: one sub-command (or group) per noun, each in its own module. The CLI only parses
and prints; the work is done by the package it drives."""

from __future__ import annotations

import typer

from gateway.cli import cache, cascade, judge, ledger, models, scorer, serve, standin, worker


def build() -> typer.Typer:
    """The whole command tree."""
    app = typer.Typer(no_args_is_help=True, add_completion=False, help="Frugal: a cost-aware LLM gateway.")
    app.command()(serve.serve)
    app.command("stand-in")(standin.stand_in)
    app.command()(worker.worker)
    app.command()(models.generate)
    app.add_typer(models.app, name="models")
    app.add_typer(scorer.app, name="scorer")
    app.add_typer(cascade.app, name="cascade")
    app.add_typer(judge.app, name="judge")
    app.add_typer(cache.app, name="cache")
    app.add_typer(ledger.app, name="ledger")
    return app


def main() -> None:
    build()()
