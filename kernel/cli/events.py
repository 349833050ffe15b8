"""Following what happens: logs and events."""

from __future__ import annotations

import json
from typing import Any

import click

from llmos.client import Client
from llmos.console import ProgressPrinter
from llmos.kernel.cli.common import (
    _ts,
    echo_json,
    json_option,
    with_client,
)
from llmos.protocol import END_STATES, Event

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50}

def _fields(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={v if isinstance(v, str | int | float) else json.dumps(v, default=str)}" for k, v in fields.items())


def _format_event(event: Event, job_view: bool) -> str:
    b = event.body
    where = "" if job_view else f"{event.topic} "
    if event.type == "job.log":
        extra = _fields(b.get("fields") or {})
        return f"{_ts(event.ts)} {where}{b.get('level', ''):<7} {b.get('event', '')}{' ' + extra if extra else ''}"
    if event.type == "job.progress":
        total = f"/{b['total']:g}" if b.get("total") is not None else ""
        msg = f" {b['message']}" if b.get("message") else ""
        extra = _fields(b.get("fields") or {})
        return f"{_ts(event.ts)} {where}progress {b['step']:g}{total}{msg}{' ' + extra if extra else ''}"
    if event.type == "job.state":
        tail = f": {b['reason']}" if b.get("reason") and b.get("state") != "running" else ""
        code = f" (exit code {b['exit_code']})" if b.get("exit_code") is not None and b.get("state") in END_STATES else ""
        attempt = f" (attempt {b.get('attempts')})" if b.get("state") == "running" else ""
        return f"{_ts(event.ts)} {where}state   {b.get('state')}{attempt}{tail}{code}"
    if event.type == "job.metric":
        step = f" step={b['step']}" if b.get("step") is not None else ""
        return f"{_ts(event.ts)} {where}metric  {b.get('name')}={b.get('value')}{step}"
    if event.type == "job.artifact":
        return f"{_ts(event.ts)} {where}artifact {b.get('kind')} {b.get('path')}"
    return f"{_ts(event.ts)} {where}{event.type} {json.dumps(b, default=str)}"


def _show(printer: ProgressPrinter, event: Event, as_json: bool) -> None:
    """One of a job's events: JSON, an in-place progress bar on a terminal, or a line."""
    if as_json:
        echo_json(event.to_dict())
    elif event.type == "job.progress" and printer.tty:
        printer.progress(event.body)
    else:
        printer.line(_format_event(event, job_view=True))


@click.command()
@click.argument("job_id", type=int)
@click.option("-f", "--follow", is_flag=True, help="Keep printing live events until the job ends.")
@click.option("--since", type=int, default=0, show_default=True, help="Only events with a seq above this.")
@click.option("--level", type=click.Choice(sorted(_LEVELS)), default=None, help="Hide log records below this level.")
@with_client
@json_option
def logs(client: Client, job_id: int, follow: bool, since: int, level: str | None, as_json: bool) -> None:
    """Print a job's log: its log records, progress and state changes, oldest first."""
    job = client.job(job_id)
    floor = _LEVELS.get(level or "debug", 10)
    printer = ProgressPrinter()
    for event in job.events(since=since, follow=follow):
        if event.type == "job.log" and _LEVELS.get(str(event.body.get("level")), 20) < floor:
            continue
        _show(printer, event, as_json)
    printer.close()


@click.command()
@click.argument("prefix", default="")
@click.option("-f", "--follow", is_flag=True, help="Keep printing live events.")
@click.option("--since", type=int, default=0, show_default=True, help="Only events with a seq above this.")
@with_client
@json_option
def events(client: Client, prefix: str, follow: bool, since: int, as_json: bool) -> None:
    """Print the bus's events whose topic starts with PREFIX (all by default): the journal, then live with -f."""
    for event in client.events(prefix, since=since, follow=follow):
        if as_json:
            echo_json(event.to_dict())
        else:
            click.echo(f"{event.seq:>8} {_format_event(event, job_view=False)}")
