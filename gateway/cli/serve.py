"""`frugal serve`: run the gateway."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli.common import configure_logging


def settle_heap() -> None:
    """Collect, then move every object alive after start-up (the app, its config, tokenizers, models, SQLAlchemy's
    metadata: some 150,000 objects) out of the collector's reach (`gc.freeze`). They live as long as the process,
    yet every full collection traversed them all: 50-90 ms with the event loop stopped, dozens of times a minute
    under load (requests promote objects to the oldest generation quickly), which cut req/s at 256 connections
    by a third. Frozen, a full collection looks at what requests left behind: a few ms."""
    gc.collect()
    gc.freeze()


def _server_class() -> type[Any]:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, settling the heap once the app has started and before it listens."""

        async def startup(self, sockets: Any = None) -> None:
            started = self.lifespan.startup

            async def then_settle() -> None:
                await started()
                if not self.lifespan.should_exit:
                    settle_heap()

            self.lifespan.startup = then_settle
            await super().startup(sockets)

    return Server


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
    from gateway.http_protocol import guarded_protocol
    from gateway.settings import ConfigError, load_config

    configure_logging(log_level)
    # numpy's BLAS (the semantic cache's similarity scans) on one thread: a second thread only competes
    # with the event loop and the local engine, and doubles lookup latency when the other core is busy.
    threadpool_limits(limits=1, user_api="blas")
    try:
        settings = load_config(config)
        gateway = create_app(settings)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    server_config = uvicorn.Config(
        gateway,
        host=host or settings.server.host,
        port=port if port is not None else settings.server.port,
        log_level=log_level,
        access_log=False,
        loop="uvloop",
        http=guarded_protocol(header_timeout_s=settings.limits.header_timeout_s,
                              body_timeout_s=settings.limits.body_timeout_s,
                              max_connections=settings.limits.max_connections),
        timeout_graceful_shutdown=10,
    )
    server = _server_class()(server_config)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:
        raise typer.Exit(3)  # uvicorn's own status when the app did not start
