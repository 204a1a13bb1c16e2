"""structlog setup, done once by the CLI; library users configure logging themselves.

uvicorn's own records go through the same renderer, so every line has one format.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import structlog

from broadcaster.settings import LogFormat, LogLevel

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger, Processor


def configure_logging(level: LogLevel, log_format: LogFormat | None) -> None:
    """Send structlog events and stdlib records to stderr, as console lines or JSON.

    Args:
        level: the least severe level written.
        log_format: ``None`` picks console on a terminal and JSON otherwise.
    """
    if log_format is None:
        log_format = LogFormat.CONSOLE if sys.stderr.isatty() else LogFormat.JSON
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # The console renderer prints tracebacks itself; JSON needs them turned into a field.
    renderers: list[Processor] = (
        [structlog.dev.ConsoleRenderer()]
        if log_format is LogFormat.CONSOLE
        else [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    )
    threshold = logging.getLevelNamesMapping()[level.value.upper()]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        # Calls below ``level`` return at once, without building an event: a debug line per
        # connection must cost a reconnect storm nothing when debug is off.
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *renderers,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(threshold)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


def get_logger(name: str) -> FilteringBoundLogger:
    """Return a structlog logger for ``name``."""
    logger: FilteringBoundLogger = structlog.get_logger(name)
    return logger
