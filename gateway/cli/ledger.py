"""`frugal ledger rebuild-rollups`: count the whole ledger into the analytics rollups again
(docs/analytics.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.common import echo_json, fail

app = typer.Typer(no_args_is_help=True, help="The spend ledger (docs/ledger.md, docs/analytics.md).")


@app.command("rebuild-rollups")
def rebuild_rollups(
    config: Annotated[Path | None, typer.Option(help="The gateway's config (default: $FRUGAL_CONFIG, else the "
                                                     "packaged default): its ledger, prices, routes")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
) -> None:
    """Empty the rollups and count every ledger row into them again, in one transaction: for a ledger written
    before the rollups existed, or after prices changed. Stop the gateways first (rows they write meanwhile
    would be counted twice)."""
    import time

    from sqlalchemy.exc import SQLAlchemyError

    from gateway.ledger import make_engine
    from gateway.rollups import rebuild, rollups_for
    from gateway.settings import ConfigError, load_config

    try:
        settings = load_config(config)
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    engine = make_engine(settings.ledger.url)
    started = time.perf_counter()
    try:
        counted = rebuild(engine, rollups_for(settings))
    except SQLAlchemyError as exc:
        raise fail(f"the ledger {engine.url.render_as_string()} cannot be read: {exc}") from exc
    finally:
        engine.dispose()
    result = {"ledger": engine.url.render_as_string(), "rows": counted,
              "seconds": round(time.perf_counter() - started, 2)}
    if as_json:
        echo_json(result)
        return
    typer.echo(f"{counted} ledger rows counted into the rollups of {result['ledger']} in {result['seconds']} s")
