"""The ``broadcaster`` command: ``broadcaster serve`` and ``broadcaster stress``.

Settings come from ``BROADCASTER_*`` variables, with ``--host`` and ``--port`` on top. A bad
value stops the process with status 2 before any port is bound. ``stress`` needs the
``stress`` extra, imported only when it runs.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError

from broadcaster.app import create_app
from broadcaster.log import configure_logging
from broadcaster.protocol import Mode
from broadcaster.server import run
from broadcaster.settings import ENV_PREFIX, Settings, describe_errors
from broadcaster.workers import supervise

cli = typer.Typer(
    help="WebSocket fan-out server where one slow client never stalls the others.",
    no_args_is_help=True,
    add_completion=False,
    # Help texts are plain: "[env: ...]" and the settings' defaults are text, not markup.
    rich_markup_mode=None,
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


def _default(name: str) -> str:
    return str(Settings.model_fields[name].default)


def _settings_epilog() -> str:
    """Every ``BROADCASTER_*`` variable with its default, for ``serve --help``."""
    lines = ["Settings, from the environment (default in brackets):"]
    for name, field in Settings.model_fields.items():
        default = "unset" if field.default in (None, (), []) else field.default
        lines.append(f"{ENV_PREFIX}{name.upper()} [{default}]: {field.description}")
    return "\n\n".join(lines)


@cli.command(epilog=_settings_epilog())
def serve(
    host: Annotated[
        str | None,
        typer.Option(help=f"Address to bind [env: BROADCASTER_HOST; default: {_default('host')}]."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help=f"Port to bind [env: BROADCASTER_PORT; default: {_default('port')}]."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Worker processes on the port; more than 1 needs a shared "
            f"BROADCASTER_BACKPLANE [env: BROADCASTER_WORKERS; default: {_default('workers')}].",
        ),
    ] = None,
    listen_fd: Annotated[int | None, typer.Option(hidden=True)] = None,
    supervisor: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """Run the server until SIGINT or SIGTERM, then close every socket with 1001."""
    settings = load_settings(host=host, port=port, workers=workers)
    configure_logging(settings.log_level, settings.log_format)
    make_app = partial(create_app, settings)
    try:
        if listen_fd is not None:
            # A worker of `--workers N`: its supervisor bound the socket.
            inherited = socket.socket(fileno=listen_fd)
            status = run(settings, make_app, sock=inherited, supervisor=supervisor)
        elif settings.workers > 1:
            status = supervise(settings)
        else:
            status = run(settings, make_app)
    except OSError as error:
        typer.echo(
            f"broadcaster: cannot bind {settings.host}:{settings.port}: {error.strerror}", err=True
        )
        raise typer.Exit(2) from None
    raise typer.Exit(status)


class Publisher(StrEnum):
    """How ``broadcaster stress`` publishes."""

    WS = "ws"
    HTTP = "http"


# The stress extra's modules: a missing one is a missing extra, not a bug.
STRESS_EXTRA = frozenset({"picows", "psutil", "rich", "matplotlib", "websockets"})
# Columns of the report when the output is not a terminal: wide enough that no table or line
# of it wraps in a log file; tables take only the width they need.
REPORT_WIDTH = 1000


@cli.command()
def stress(
    url: Annotated[
        list[str] | None,
        typer.Option(
            help="Drive the running server at ws://HOST:PORT; repeat it for nodes that share a "
            "backplane (clients are spread over them, reconnects move to the next, the "
            "publisher sends to each in turn)."
        ),
    ] = None,
    spawn: Annotated[
        bool, typer.Option("--spawn", help="Start a server for the run and measure it.")
    ] = False,
    env: Annotated[
        list[str] | None,
        typer.Option(metavar="KEY=VALUE", help="A BROADCASTER_* setting for --spawn (repeatable)."),
    ] = None,
    admin_token: Annotated[
        str | None,
        typer.Option(
            envvar="BROADCASTER_ADMIN_TOKEN",
            show_envvar=True,
            help="The server's admin token, for GET /topics; a server on this machine, or one "
            "spawned with --env BROADCASTER_ADMIN_TOKEN=..., needs none.",
        ),
    ] = None,
    mode: Annotated[Mode, typer.Option(help="Receivers on /ws/{topic} or on /ws.")] = Mode.MUX,
    publisher: Annotated[
        Publisher, typer.Option(help="Publish over WebSocket (in --mode) or HTTP POST.")
    ] = Publisher.WS,
    fast: Annotated[int, typer.Option(help="Clients that read everything.")] = 10,
    slow: Annotated[int, typer.Option(help="Clients that read --slow-rate msg/s.")] = 0,
    stalled: Annotated[int, typer.Option(help="Clients that subscribe, then stop reading.")] = 0,
    churn: Annotated[int, typer.Option(help="Clients that come and go abruptly.")] = 0,
    reconnecting: Annotated[
        int,
        typer.Option(
            help="Clients that drop their connection abruptly now and then and resume with since."
        ),
    ] = 0,
    reconnect_every: Annotated[
        str,
        typer.Option(
            metavar="MIN,MAX", help="Seconds a reconnecting client stays connected, at random."
        ),
    ] = "0.5,2",
    slow_rate: Annotated[float, typer.Option(help="Messages a second a slow client reads.")] = 50,
    stall_for: Annotated[
        float | None,
        typer.Option(help="Seconds stalled clients stay stalled (default: until publishing ends)."),
    ] = None,
    churn_stay: Annotated[
        float, typer.Option(help="Longest a churn session lasts, in seconds.")
    ] = 0.5,
    rate: Annotated[
        float, typer.Option(help="Messages a second over all topics; 0 is flat out.")
    ] = 100,
    size: Annotated[int, typer.Option(help="Bytes of each message's data.")] = 256,
    topics: Annotated[int, typer.Option(help="Topics; clients are spread over them.")] = 1,
    duration: Annotated[float, typer.Option(help="Seconds of publishing.")] = 10,
    drain: Annotated[
        float, typer.Option(help="Seconds after publishing for clients to catch up.")
    ] = 5,
    procs: Annotated[int, typer.Option(help="Processes for the receiving clients.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
    receive_buffer: Annotated[
        int, typer.Option(help="SO_RCVBUF of slow and stalled clients, in bytes.")
    ] = 8192,
    json_out: Annotated[
        str | None,
        typer.Option(
            "--json", metavar="FILE", help="Write the full report as JSON to FILE (- for stdout)."
        ),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(metavar="FILE.png", help="Draw the run into a PNG file.")
    ] = None,
    max_p99_ms: Annotated[
        float | None, typer.Option(help="Fail if fast clients' p99 latency is higher.")
    ] = None,
    min_fast_delivery: Annotated[
        float | None,
        typer.Option(help="Fail if any fast client got a smaller fraction (0 to 1)."),
    ] = None,
    max_rss_mib: Annotated[
        float | None, typer.Option(help="Fail if the spawned server's peak RSS is higher.")
    ] = None,
    require_stalled_closed: Annotated[
        bool,
        typer.Option("--require-stalled-closed", help="Fail unless every stalled client got 1013."),
    ] = False,
    max_server_errors: Annotated[
        int | None,
        typer.Option(help="Fail if the spawned server logs more lines at error level."),
    ] = None,
    max_lost: Annotated[
        int | None, typer.Option(help="Fail if reconnecting clients missed more messages.")
    ] = None,
    max_duplicates: Annotated[
        int | None, typer.Option(help="Fail if reconnecting clients got more messages twice.")
    ] = None,
    max_out_of_order: Annotated[
        int | None, typer.Option(help="Fail if reconnecting clients got more out of order.")
    ] = None,
    require_recovered: Annotated[
        bool,
        typer.Option(
            "--require-recovered",
            help="Fail unless every resume said recovered: true and every reconnecting client "
            "of a topic saw one identical sequence.",
        ),
    ] = False,
) -> None:
    """Load a server with fake clients and report what they saw.

    Exit status 0: every threshold met (or none given); 1: one missed; 2: bad arguments or a
    failed run (the publisher was cut off, or nothing was delivered).
    """
    if spawn == bool(url):
        _stress_usage("give either --url or --spawn")
    low, _, high = reconnect_every.partition(",")
    try:
        every = (float(low), float(high))
    except ValueError:
        _stress_usage(f"--reconnect-every takes MIN,MAX seconds, not {reconnect_every!r}")
    server_env = {}
    for item in env or []:
        key, equals, value = item.partition("=")
        if not equals:
            _stress_usage(f"--env takes KEY=VALUE, not {item!r}")
        server_env[key] = value
    try:
        from rich.console import Console

        from broadcaster import stress as tool
        from broadcaster.stress.render import ProgressView, print_report

        if plot is not None:
            from broadcaster.stress.plot import plot as draw
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] not in STRESS_EXTRA:
            raise
        _stress_usage(f"{error.name} is not installed; install broadcaster-ws[stress]")
    if publisher is Publisher.HTTP and importlib.util.find_spec("httpx") is None:
        _stress_usage("--publisher http needs httpx; install it with pip install httpx")
    scenario = tool.Scenario(
        url=url[0] if url else None,
        other_urls=tuple(url[1:]) if url else (),
        server_env=server_env,
        admin_token=admin_token,
        mode=mode,
        via=tool.Via(publisher.value),
        fast=fast,
        slow=slow,
        stalled=stalled,
        churn=churn,
        reconnect=reconnecting,
        reconnect_every=every,
        slow_rate=slow_rate,
        stall_for=stall_for,
        churn_stay=churn_stay,
        rate=rate,
        size=size,
        topics=topics,
        duration=duration,
        drain=drain,
        procs=procs,
        seed=seed,
        receive_buffer=receive_buffer,
    )
    thresholds = tool.Thresholds(
        max_p99_ms=max_p99_ms,
        min_fast_delivery=min_fast_delivery,
        max_rss_mib=max_rss_mib,
        require_stalled_closed=require_stalled_closed,
        max_server_errors=max_server_errors,
        max_lost=max_lost,
        max_duplicates=max_duplicates,
        max_out_of_order=max_out_of_order,
        require_recovered=require_recovered,
    )
    problems = scenario.problems() + thresholds.problems(scenario)
    for problem in problems:
        typer.echo(f"broadcaster stress: {problem}", err=True)
    if problems:
        raise typer.Exit(2)
    # With the JSON report on stdout, everything meant for people goes to stderr.
    console = Console(stderr=json_out == "-", highlight=False)
    if not console.is_terminal:
        # Logs and files have no width of their own; keep the report's table readable.
        console.width = REPORT_WIDTH
    try:
        with ProgressView(console, live=console.is_terminal) as view:
            report = tool.run_scenario(scenario, view)
    except tool.StressError as error:
        typer.echo(f"broadcaster stress: {error}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        # The run has stopped its workers and its server on the way out.
        typer.echo("broadcaster stress: interrupted", err=True)
        raise typer.Exit(130) from None
    violations = thresholds.violations(report)
    print_report(report, violations, console, judged=thresholds.given())
    if json_out is not None:
        text = json.dumps(report.to_json(), indent=2)
        if json_out == "-":
            sys.stdout.write(text + "\n")
        else:
            Path(json_out).write_text(text + "\n")
    if plot is not None:
        draw(report, plot)
    raise typer.Exit(2 if report.failures() else 1 if violations else 0)


def _stress_usage(message: str) -> NoReturn:
    """Stop ``broadcaster stress`` with status 2 after saying what is wrong.

    Raises:
        typer.Exit: always.
    """
    typer.echo(f"broadcaster stress: {message}", err=True)
    raise typer.Exit(2)


def main() -> None:
    """Entry point of the ``broadcaster`` console script."""
    cli(prog_name="broadcaster")


if __name__ == "__main__":
    main()
