"""``llmos dashboard``: start the web dashboard (the ``dashboard`` service) and print its URL."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import click

import llmos
from llmos.plugins.api.cli import start_service, where_listening


def start_dashboard(client: llmos.Client, host: str, port: int, token: str, wait_s: float = 60) -> dict[str, Any]:
    """Where the dashboard listens: the running one, else a new ``dashboard`` service started and
    waited for (ClickException if it fails first, saying why)."""
    for job in client.jobs(state="running"):
        if job.kind == "dashboard":
            if (job.params.get("host"), job.params.get("port")) != (host, port) and port != 0:
                raise click.ClickException(f"a dashboard already runs (job {job.id}) on {job.params.get('host')}:{job.params.get('port')}; "
                                           f"stop it first with: llmos cancel {job.id}")
            return where_listening(client, "dashboard", job.id)
    return start_service(client, "dashboard", {"host": host, "port": port, "token": token}, "dashboard", wait_s, "the dashboard")


@click.command("dashboard")
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on; any but loopback needs a token (one is made).")
@click.option("--port", type=click.IntRange(0, 65535), default=8265, show_default=True, help="The TCP port (0: any free one).")
@click.option("--token", default=None, envvar="LLMOS_DASHBOARD_TOKEN", show_envvar=True,
              help="The token the page's URL carries (?token=...); made for you off loopback.")
@click.option("--timeout", "wait_s", type=float, default=60, show_default=True, help="Seconds to wait for it to listen.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="The kernel's state directory.")
@click.option("--json", "as_json", is_flag=True, help="Print where it listens as JSON.")
def dashboard_command(host: str, port: int, token: str | None, wait_s: float, state_dir: Path | None, as_json: bool) -> None:
    """Start the live web dashboard and print its URL.

    The page shows every node and device (capacity, reserved by which jobs, measured use), the
    running and pending jobs with their progress, the services; one job's log tail, metric
    charts (loss, learning rate, tokens/s) and resource use; pipelines stage by stage; models
    with their lineage and size / perplexity / speed after compression. It updates live from the
    journal. It runs as a service (`llmos services` lists it, `llmos status` shows its URL);
    stop it with `llmos cancel JOB`. Set [dashboard] autostart = true to have the kernel start
    it at every boot. See docs/dashboard.md."""
    from llmos.plugins.api import is_loopback

    if token is None:
        token = "" if is_loopback(host) else secrets.token_urlsafe(24)
    try:
        with llmos.connect(state_dir or os.environ.get("LLMOS_STATE_DIR") or None) as client:
            where = start_dashboard(client, host, port, token, wait_s)
    except llmos.LlmosError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(where))
    else:
        click.echo(f"dashboard at {where['page']} (job {where['job_id']}); stop it with: llmos cancel {where['job_id']}")
