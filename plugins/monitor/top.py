"""``llmos top``: a live view of devices, running jobs, the queue and recent failures."""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

import click
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

import llmos
from llmos.units import format_duration, format_size


def _bar(part: float | None, whole: float, width: int = 16) -> Text:
    if part is None or not whole:
        return Text("-")
    ratio = max(0.0, min(1.0, part / whole))
    filled = round(ratio * width)
    style = "red" if ratio > 0.9 else "yellow" if ratio > 0.7 else "green"
    return Text("█" * filled, style=style) + Text("░" * (width - filled), style="dim") + Text(f" {ratio * 100:3.0f}%")


def snapshot(client: llmos.Client, height: int | None = None, width: int | None = None) -> Group:
    """Everything the view shows, as rich renderables; with ``height``, the queue and the
    failures are cut to what fits on the screen (saying how many more there are)."""
    status = client.status()
    devices = client.devices()
    running = client.jobs(state="running")
    pending = client.jobs(state="pending", limit=50)
    failed = client.jobs(state="failed", limit=5)
    up = time.time() - status["started_at"]
    bar = 10 if (width or 120) < 110 else 16
    head = Text(
        f"llmos {status['version']}{'  (q quits)' if height else ''}  pid {status['pid']}  up {format_duration(up)}  jobs "
        + " ".join(f"{k} {v}" for k, v in status["jobs"].items() if v)
        + f"  workers {status['workers']['alive']}"
        + (f"  metrics {status['metrics_url']}" if status.get("metrics_url") and (width or 120) >= 100 else ""),
        style="bold", no_wrap=True, overflow="ellipsis",
    )
    dev = Table(title="devices", expand=True, pad_edge=False)
    for col in ("device", "held", "memory reserved", "memory used", "util"):
        dev.add_column(col, no_wrap=True, overflow="ellipsis", max_width=16 if col == "device" else None)
    for d in devices:
        used = d.get("used") or {}
        unit = " cores" if d["kind"] == "cpu" else ""
        held = d["share_reserved"] / d["capacity"] if d["capacity"] else 0.0
        share = Text(f"{d['share_reserved']:g}/{d['capacity']:g}{unit}", style="red" if held >= 0.9 else "yellow" if held >= 0.6 else "green")
        extra = []
        if "utilization" in used:
            extra.append(f"{used['utilization'] * 100:.0f}%")
        if "cpu_percent" in used:
            extra.append(f"{used['cpu_percent']:.0f}% cpu")
        if "temperature" in used:
            extra.append(f"{used['temperature']:.0f}°C")
        name = d["id"] if d["name"] == d["id"] else f"{d['id']} {d['name']}"
        dev.add_row(name + (" (fake)" if d["fake"] else ""), share, _bar(d["memory_reserved"], d["memory_total"], bar),
                    _bar(used.get("memory_used"), d["memory_total"], bar), " ".join(extra) or "-")
    jobs = Table(title=f"running ({len(running)})", expand=True, pad_edge=False)
    for col in ("id", "kind", "progress", "loss", "tok/s", "ETA", "cpu", "memory"):
        jobs.add_column(col, no_wrap=True)
    for j in running:
        p = j.progress or {}
        f = p.get("fields") or {}
        total = p.get("total")
        prog = _bar(p.get("step"), total, bar) if total else Text(str(p.get("step", "-")))
        if total:
            prog += Text(f" {p.get('step', 0):g}/{total:g}")
        u = j.usage or {}
        jobs.add_row(
            str(j.id), j.kind, prog,
            f"{f['loss']:.4f}" if "loss" in f else "-",
            f"{f['tokens_per_s']:,.0f}" if "tokens_per_s" in f else "-",
            format_duration(f["eta_s"]) if "eta_s" in f else "-",
            f"{u['cpu_percent']:.0f}%" if "cpu_percent" in u else "-",
            format_size(u["rss"]) if "rss" in u else "-",
        )
    # What is left of the screen goes to the queue, then the failures (a table costs 5 lines of
    # title, frame and heading, a caption one, a row one).
    room = None if height is None else max(0, height - 1 - (5 + len(devices)) - (5 + len(running)) - 6)
    show_pending = pending if room is None else pending[: max(1, room - (6 + min(3, len(failed)) if failed and room > 8 else 0))]
    queue = Table(title=f"queue ({len(pending)}{'+' if len(pending) == 50 else ''})", expand=True, pad_edge=False)
    for col in ("id", "kind", "priority", "waiting", "for"):
        queue.add_column(col, no_wrap=True, overflow="ellipsis", ratio=1 if col == "for" else None)
    for j in show_pending:
        queue.add_row(str(j.id), j.kind, str(j.priority), format_duration(time.time() - (j.submitted_at or time.time())), (j.reason or "")[:60])
    if len(show_pending) < len(pending):
        queue.caption = f"{len(pending) - len(show_pending)} more: llmos jobs --state pending"
    left = None if room is None else room - len(show_pending) - 6
    show_failed = failed if left is None else list(failed)[-left:] if left > 0 else []
    fails = Table(title="recent failures", expand=True, pad_edge=False)
    for col in ("id", "kind", "reason"):
        fails.add_column(col, no_wrap=True, overflow="ellipsis", ratio=1 if col == "reason" else None)
    for j in reversed(show_failed):
        fails.add_row(str(j.id), j.kind, (j.reason or "")[:80])
    parts: list[object] = [head, dev, jobs, queue]
    if show_failed:
        parts.append(fails)
    return Group(*parts)


def snapshot_data(client: llmos.Client) -> dict[str, object]:
    """What the view shows, as data (``llmos top --json``)."""
    return {
        "status": client.status(),
        "devices": client.devices(),
        "running": [j.to_dict() for j in client.jobs(state="running")],
        "pending": [j.to_dict() for j in client.jobs(state="pending", limit=20)],
        "failed": [j.to_dict() for j in client.jobs(state="failed", limit=5)],
    }


@contextlib.contextmanager
def _keys() -> Iterator[Callable[[float], bool]]:
    """While the view runs, the terminal hands over keys at once (cbreak): ``pressed(t)``
    waits up to ``t`` seconds and says whether q (or Q, or Esc) was pressed."""
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd) if fd is not None else None
    if fd is not None:
        tty.setcbreak(fd)

    def pressed(timeout: float) -> bool:
        if fd is None:
            time.sleep(timeout)
            return False
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if ready and os.read(fd, 32).strip().lower()[:1] in (b"q", b"\x1b"):
                return True
        return False

    try:
        yield pressed
    finally:
        if fd is not None and saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@click.command("top")
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="The kernel's state directory.")
@click.option("--json", "as_json", is_flag=True, help="Print one snapshot as JSON (status, devices, running, pending and failed jobs) and exit.")
def top_command(once: bool, interval: float, state_dir: Path | None, as_json: bool) -> None:
    """A live view of devices (reserved and used), running jobs with their progress, the queue and recent failures."""
    import json

    from rich.live import Live

    try:
        with llmos.connect(state_dir) as client:
            if as_json:
                click.echo(json.dumps(snapshot_data(client), default=str))
                return
            console = Console()
            if once or not console.is_terminal:
                console.print(snapshot(client))
                return
            size = console.size
            with _keys() as pressed, Live(snapshot(client, size.height, size.width), console=console, refresh_per_second=4, screen=True) as live:
                while not pressed(interval):
                    size = console.size
                    live.update(snapshot(client, size.height, size.width))
    except llmos.LlmosError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass


