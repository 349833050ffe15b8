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
from llmos.units import format_size

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50}

_BYTES = ("rss", "memory", "bytes", "gpu_memory", "size", "kv_bytes", "max_rss")


def _value(key: str, v: Any) -> str:
    """A field's value for a person: 4 significant digits, sizes for byte counts."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int) and (key in _BYTES or key.endswith("_bytes")) and v >= 1024:
        return format_size(v)
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    if isinstance(v, str | int):
        return str(v)
    return json.dumps(v, default=str)


def _fields(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={_value(k, v)}" for k, v in fields.items())


def level_of(event: Event) -> int:
    """How much an event matters, on the log levels' scale: what ``--level`` filters by."""
    b = event.body
    if event.type == "job.log":
        return _LEVELS.get(str(b.get("level")), 20)
    if event.type == "job.state":
        return {"failed": 40, "cancelled": 30}.get(str(b.get("state")), 20)
    if event.type == "job.usage":
        return 10
    return 20


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
        return f"{_ts(event.ts)} {where}metric  {b.get('name')}={_value('', b.get('value'))}{step}"
    if event.type == "job.usage":
        return f"{_ts(event.ts)} {where}usage   {_fields(b)}"
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


class LogView:
    """What ``llmos logs`` prints by default: every log record (at ``floor`` and above) and state
    change as a line; progress folded to a line every tenth of the way (the first and the last
    always), with the metrics that arrived since folded into it; the resource samples folded
    into one line at the end. On a terminal the progress line updates in place."""

    def __init__(self, printer: ProgressPrinter, floor: int) -> None:
        self.printer, self.floor = printer, floor
        self.metrics: dict[str, Any] = {}  # name -> latest value since the last progress line
        self.pending: Event | None = None  # a progress event not printed yet (the latest)
        self.next_step: float | None = None
        self.seen = 0
        self.usage: list[dict[str, Any]] = []

    def add(self, event: Event) -> None:
        if level_of(event) < self.floor and event.type != "job.usage":
            return
        if event.type == "job.metric":
            self.metrics[str(event.body.get("name"))] = event.body.get("value")
        elif event.type == "job.usage":
            self.usage.append(event.body)
        elif event.type == "job.progress":
            self._progress(event)
        else:
            if event.type == "job.state" and self.pending is not None:
                self._print_progress(self.pending)  # where it got to, before how it ended
            self.printer.line(_format_event(event, job_view=True))

    def _progress(self, event: Event) -> None:
        b = event.body
        step, total = float(b.get("step") or 0), b.get("total")
        self.seen += 1
        if total:
            due = self.next_step is None or step >= self.next_step or step >= float(total)
        else:
            due = self.seen % 10 == 1  # no total: the first, then every tenth
        if self.printer.tty or due:
            self._print_progress(event)
            if total:
                self.next_step = step + float(total) / 10
        else:
            self.pending = event
    def _print_progress(self, event: Event) -> None:
        body = dict(event.body)
        if self.metrics:
            body["fields"] = {**(body.get("fields") or {}), **self.metrics}
            self.metrics = {}
        self.pending = None
        if self.printer.tty:
            self.printer.progress(body)
        else:
            self.printer.line(_format_event(Event(event.seq, event.stream_seq, event.topic, event.type, event.ts, event.sender, body), job_view=True))

    def close(self) -> None:
        if self.pending is not None:
            self._print_progress(self.pending)
        if self.metrics:
            self.printer.line("metrics  " + _fields(self.metrics))
        if self.usage and self.floor <= 20:
            cpu = [float(u.get("cpu_percent") or 0) for u in self.usage]
            rss = [int(u.get("rss") or 0) for u in self.usage]
            gpu = [int(u["gpu_memory"]) for u in self.usage if u.get("gpu_memory")]
            line = f"usage    {len(self.usage)} samples: CPU {sum(cpu) / len(cpu):.0f}% on average (peak {max(cpu):.0f}%), memory peak {format_size(max(rss))}"
            if gpu:
                line += f", GPU memory peak {format_size(max(gpu))}"
            self.printer.line(line + " (llmos logs --all for each)")
        self.printer.close()


@click.command()
@click.argument("job_id", type=int)
@click.option("-f", "--follow", is_flag=True, help="Keep printing live events until the job ends.")
@click.option("--since", type=int, default=0, show_default=True, help="Only events with a seq above this.")
@click.option("--level", type=click.Choice(sorted(_LEVELS)), default=None,
              help="Show what matters at least this much: log records of this level and above; at warning, no progress or "
                   "metrics and only the states that went wrong (default info; with --json or --all, debug).")
@click.option("--all", "every", is_flag=True, help="Every event on its own line: each progress step, metric and resource sample.")
@with_client
@json_option
def logs(client: Client, job_id: int, follow: bool, since: int, level: str | None, every: bool, as_json: bool) -> None:
    """Print a job's log, oldest first: its log records and state changes; progress a line
    every tenth of the way with the latest metrics folded in; resource samples summed up in one
    line. Numbers are rounded; --all prints every event, --json every event as it is."""
    job = client.job(job_id)
    floor = _LEVELS.get(level or ("debug" if as_json or every else "info"), 10)
    printer = ProgressPrinter()
    view = None if as_json or every else LogView(printer, floor)
    for event in job.events(since=since, follow=follow):
        if view is not None:
            view.add(event)
        elif level_of(event) >= floor:
            _show(printer, event, as_json)
    if view is not None:
        view.close()
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
