"""``llmos top``: a live view of devices, running jobs, the queue and recent failures."""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

import llmos
from llmos.units import format_size


def _bar(part: float | None, whole: float, width: int = 16) -> Text:
    if part is None or not whole:
        return Text("-")
    ratio = max(0.0, min(1.0, part / whole))
    filled = round(ratio * width)
    style = "red" if ratio > 0.9 else "yellow" if ratio > 0.7 else "green"
    return Text("█" * filled, style=style) + Text("░" * (width - filled), style="dim") + Text(f" {ratio * 100:3.0f}%")


def snapshot(client: llmos.Client) -> Group:
    """Everything the view shows, as rich renderables."""
    status = client.status()
    devices = client.devices()
    running = client.jobs(state="running")
    pending = client.jobs(state="pending", limit=20)
    failed = client.jobs(state="failed", limit=5)
    up = time.time() - status["started_at"]
    head = Text(
        f"llmos {status['version']}  kernel pid {status['pid']}  up {up:.0f}s  jobs "
        + " ".join(f"{k} {v}" for k, v in status["jobs"].items())
        + f"  workers {status['workers']['alive']}"
        + (f"  metrics {status['metrics_url']}" if status.get("metrics_url") else ""),
        style="bold",
    )
    dev = Table(title="devices", expand=True)
    for col in ("device", "name", "reserved", "used", "share", "util / temp"):
        dev.add_column(col)
    for d in devices:
        used = d.get("used") or {}
        share = f"{d['share_reserved']:g}/{d['capacity']:g}"
        extra = []
        if "utilization" in used:
            extra.append(f"{used['utilization'] * 100:.0f}%")
        if "cpu_percent" in used:
            extra.append(f"{used['cpu_percent']:.0f}% cpu")
        if "temperature" in used:
            extra.append(f"{used['temperature']:.0f}°C")
        dev.add_row(d["id"], d["name"] + (" (fake)" if d["fake"] else ""), _bar(d["memory_reserved"], d["memory_total"]),
                    _bar(used.get("memory_used"), d["memory_total"]), share, " ".join(extra) or "-")
    jobs = Table(title="running", expand=True)
    for col in ("id", "kind", "progress", "loss", "tokens/s", "ETA", "cpu", "memory"):
        jobs.add_column(col)
    for j in running:
        p = j.progress or {}
        f = p.get("fields") or {}
        total = p.get("total")
        prog = _bar(p.get("step"), total) if total else Text(str(p.get("step", "-")))
        if total:
            prog += Text(f" {p.get('step', 0):g}/{total:g}")
        u = j.usage or {}
        jobs.add_row(
            str(j.id), j.kind, prog,
            f"{f['loss']:.4f}" if "loss" in f else "-",
            f"{f['tokens_per_s']:,.0f}" if "tokens_per_s" in f else "-",
            f"{f['eta_s']:.0f}s" if "eta_s" in f else "-",
            f"{u['cpu_percent']:.0f}%" if "cpu_percent" in u else "-",
            format_size(u["rss"]) if "rss" in u else "-",
        )
    queue = Table(title=f"queue ({len(pending)})", expand=True)
    for col in ("id", "kind", "priority", "waiting"):
        queue.add_column(col)
    for j in pending:
        queue.add_row(str(j.id), j.kind, str(j.priority), f"{time.time() - (j.submitted_at or time.time()):.0f}s")
    fails = Table(title="recent failures", expand=True)
    for col in ("id", "kind", "reason"):
        fails.add_column(col)
    for j in reversed(failed):
        fails.add_row(str(j.id), j.kind, (j.reason or "")[:80])
    return Group(head, dev, jobs, queue, fails)


def snapshot_data(client: llmos.Client) -> dict[str, object]:
    """What the view shows, as data (``llmos top --json``)."""
    return {
        "status": client.status(),
        "devices": client.devices(),
        "running": [j.to_dict() for j in client.jobs(state="running")],
        "pending": [j.to_dict() for j in client.jobs(state="pending", limit=20)],
        "failed": [j.to_dict() for j in client.jobs(state="failed", limit=5)],
    }


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
            with Live(snapshot(client), console=console, refresh_per_second=4, screen=False) as live:
                while True:
                    time.sleep(interval)
                    live.update(snapshot(client))
    except llmos.LlmosError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass


