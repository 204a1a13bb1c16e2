"""The ``broadcaster`` command: ``broadcaster serve``.

Settings come from ``BROADCASTER_*`` variables, with ``--host`` and ``--port`` on top. A bad
value stops the process with status 2 before any port is bound.
"""

from __future__ import annotations

import signal
from typing import Annotated, Any

import typer
import uvicorn
from pydantic import ValidationError

from broadcaster.app import create_app
from broadcaster.log import configure_logging, get_logger
from broadcaster.server import bind, uvicorn_config
from broadcaster.settings import Settings, describe_errors

cli = typer.Typer(
    help="WebSocket fan-out server where one slow client never stalls the others.",
    no_args_is_help=True,
    add_completion=False,
)


@cli.callback()
def _root() -> None:
    """WebSocket fan-out server where one slow client never stalls the others."""


@cli.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to bind [env: BROADCASTER_HOST].")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind [env: BROADCASTER_PORT].")] = None,
) -> None:
    """Run the server until SIGINT or SIGTERM, then close every socket with 1001."""
    given: dict[str, Any] = {"host": host, "port": port}
    overrides = {name: value for name, value in given.items() if value is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        for line in describe_errors(error):
            typer.echo(f"broadcaster: invalid setting {line}", err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    log = get_logger("broadcaster.cli")
    try:
        sock = bind(settings)
    except OSError as error:
        typer.echo(
            f"broadcaster: cannot bind {settings.host}:{settings.port}: {error.strerror}", err=True
        )
        raise typer.Exit(2) from None

    hub_failed = False

    def stop_on_hub_failure() -> None:
        nonlocal hub_failed
        hub_failed = True
        server.should_exit = True

    server = uvicorn.Server(uvicorn_config(create_app(settings, stop_on_hub_failure), settings))
    # uvicorn re-raises the signal that stopped it once it has shut down; absorbing it here
    # lets a graceful stop exit with status 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    log.info("server_starting", host=settings.host, port=sock.getsockname()[1])
    server.run(sockets=[sock])
    if hub_failed or not server.started:
        raise typer.Exit(1)
    log.info("server_stopped")


def main() -> None:
    """Entry point of the ``broadcaster`` console script."""
    cli(prog_name="broadcaster")


if __name__ == "__main__":
    main()
