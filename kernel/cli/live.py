"""A live view of a pipeline for the terminal (rich): each stage with its state, the running
stages' progress bars and their last loss. It polls the kernel four times a second; on a
terminal that is not interactive it prints a line per stage change instead."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from llmos.client import Client
from llmos.errors import LlmosError
from llmos.pipeline import PIPELINE_ENDED, Pipeline

_STYLE = {"succeeded": "green", "serving": "green", "failed": "red", "rejected": "red", "running": "cyan", "waiting": "dim", "cancelled": "yellow", "skipped": "yellow"}
#: How each stage state is drawn (the live view and `llmos pipeline status`).
MARKS = {"waiting": "·", "running": "▶", "serving": "◉", "succeeded": "✓", "failed": "✗", "rejected": "✗", "cancelled": "-", "skipped": "-"}


class PipelineView:
    def __init__(self, client: Client, handle: Pipeline, *, title: str | None = None) -> None:
        self.client, self.handle, self.title = client, handle, title
        self.started = time.monotonic()
        self.live: Any = None
        self.seen: dict[str, str] = {}

    def __enter__(self) -> PipelineView:
        if sys.stdout.isatty():
            from rich.live import Live

            self.live = Live(refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def run(self, poll: float = 0.25) -> dict[str, Any]:
        while True:
            info = self.handle.info()
            progress = self._progress(info)
            if self.live is not None:
                self.live.update(self._render(info, progress))
            else:
                self._print_changes(info)
            if info["state"] in PIPELINE_ENDED:
                return info
            time.sleep(poll)

    def _progress(self, info: dict[str, Any]) -> dict[str, dict[str, Any]]:
        out = {}
        for stage in info["stages"]:
            if stage["state"] == "running" and stage["job_id"]:
                try:
                    out[stage["name"]] = self.client.job(stage["job_id"]).info().progress or {}
                except LlmosError:
                    pass
        return out

    def _print_changes(self, info: dict[str, Any]) -> None:
        for stage in info["stages"]:
            if self.seen.get(stage["name"]) != stage["state"]:
                self.seen[stage["name"]] = stage["state"]
                why = f" ({stage['reason']})" if stage.get("reason") and stage["state"] in ("failed", "rejected", "skipped") else ""
                job = f" job {stage['job_id']}" if stage["job_id"] else ""
                click.echo(f"[{time.monotonic() - self.started:6.1f}s] {stage['name']}: {stage['state']}{job}{why}")

    def _render(self, info: dict[str, Any], progress: dict[str, dict[str, Any]]) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        title = self.title or f"pipeline {info['id']} {info['name']}"
        table = Table(title=f"{title}: {info['state']}  ({time.monotonic() - self.started:.0f}s)", title_justify="left", expand=False)
        for col in ("", "stage", "kind", "state", "job", "progress", ""):
            table.add_column(col)
        for stage in info["stages"]:
            style = _STYLE.get(stage["state"], "")
            p = progress.get(stage["name"], {})
            bar: Any = ""
            detail = ""
            if p and p.get("total"):
                bar = ProgressBar(total=float(p["total"]), completed=float(p.get("step") or 0), width=24)
                fields = p.get("fields") or {}
                loss = fields.get("loss")
                detail = f"{p.get('step')}/{p.get('total')}" + (f" loss {loss:.3f}" if isinstance(loss, int | float) else "") + (f"  {p['message']}" if p.get("message") else "")
            elif stage["state"] in ("failed", "rejected", "skipped") and stage.get("reason"):
                detail = str(stage["reason"])[:70]
            elif stage.get("artifact"):
                detail = f"artifact {stage['artifact'][:12]}"
            table.add_row(Text(MARKS.get(stage["state"], "?"), style=style), stage["name"], stage["kind"], Text(stage["state"], style=style),
                          str(stage["job_id"] or ""), bar, detail)
        return table
