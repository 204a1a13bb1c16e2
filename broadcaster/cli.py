"""The ``broadcaster`` command: ``broadcaster serve``.

Settings come from ``BROADCASTER_*`` variables, with ``--host`` and ``--port`` on top. A bad
value stops the process with status 2 before any port is bound.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from broadcaster.app import create_app
from broadcaster.log import configure_logging
from broadcaster.server import run
from broadcaster.settings import Settings, describe_errors

cli = typer.Typer(
    help="WebSocket fan-out server where one slow client never stalls the others.",
    no_args_is_help=True,
    add_completion=False,
)


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, with ``overrides`` on top of the environment.

    Raises:
        typer.Exit: status 2, after naming each bad variable, its value and what is allowed.
    """
    try:
        return Settings(**{name: value for name, value in overrides.items() if value is not None})
    except ValidationError as error:
        for line in describe_errors(error):
            typer.echo(f"broadcaster: invalid setting {line}", err=True)
        raise typer.Exit(2) from None


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
    settings = load_settings(host=host, port=port)
    configure_logging(settings.log_level, settings.log_format)
    try:
        status = run(settings, partial(create_app, settings))
    except OSError as error:
        typer.echo(
            f"broadcaster: cannot bind {settings.host}:{settings.port}: {error.strerror}", err=True
        )
        raise typer.Exit(2) from None
    raise typer.Exit(status)


def main() -> None:
    """Entry point of the ``broadcaster`` console script."""
    cli(prog_name="broadcaster")


if __name__ == "__main__":
    main()
