"""Small pieces every ``llmos`` command shares: options, JSON output, tables."""

from __future__ import annotations

import datetime as _dt
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

import llmos

#: The built-in commands of ``llmos`` (a plugin command may not take these names).
BUILTIN_COMMANDS = frozenset({
    "acct", "artifacts", "boot", "cancel", "demo", "devices", "events", "job", "jobs", "keys", "logs", "pipeline", "plugins", "shutdown", "state", "status", "submit",
})


def state_dir_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="The kernel's state directory (default: $LLMOS_STATE_DIR or $XDG_STATE_HOME/llmos).",
    )(f)


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(f)


def with_client(f: Callable[..., Any]) -> Callable[..., Any]:
    """Give the command a connected Client (built from --state-dir)."""

    @state_dir_option
    @functools.wraps(f)
    def wrapper(state_dir: Path | None, **kwargs: Any) -> Any:
        with llmos.connect(state_dir or parent_state_dir()) as client:
            return f(client, **kwargs)

    return wrapper


def parent_state_dir() -> Path | None:
    """The --state-dir given to an enclosing group (`llmos pipeline --state-dir DIR status 1`)."""
    ctx = click.get_current_context(silent=True)
    ctx = ctx.parent if ctx is not None else None
    while ctx is not None:
        if ctx.params.get("state_dir"):
            return Path(ctx.params["state_dir"])
        ctx = ctx.parent
    return None


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, default=str))


def _ts(ts: float | None) -> str:
    if not ts:
        return "-"
    return _dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]


def _table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    click.echo("\n".join(lines))  # one write: a long table is not a write (and flush) per line
