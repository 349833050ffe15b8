"""structlog set-up: JSON lines in the kernel and workers, a readable console for a person."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(*, json_lines: bool, level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog once for this process."""
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: Any = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,  # the CLI configures stderr first, `boot` then a file
    )


class QuietStream:
    """A log stream whose writes never raise: on a full disk (or a closed file) a line is
    dropped and counted, the process goes on. The kernel's log goes through one."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.dropped = 0

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except (OSError, ValueError):
            self.dropped += 1
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        try:
            self.stream.close()
        except (OSError, ValueError):
            pass

    def fileno(self) -> int:
        return self.stream.fileno()


__all__ = ["QuietStream", "configure_logging"]
