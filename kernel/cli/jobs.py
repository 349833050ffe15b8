"""Jobs: submit, jobs, job, cancel."""

from __future__ import annotations

import datetime as _dt
import json
import sys
import time
from collections.abc import Iterable

import click

from llmos.client import Client, JobInfo
from llmos.console import ProgressPrinter
from llmos.job import JobList
from llmos.kernel.cli.common import (
    _table,
    echo_json,
    json_option,
    with_client,
)
from llmos.kernel.cli.events import _show
from llmos.protocol import END_STATES, JOB_STATES
from llmos.units import format_duration, parse_size


def _parse_params(pairs: Iterable[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="-p/--param")
        params[key.strip()] = value
    return params


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@click.argument("kind")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="A job parameter; repeat for more. Values are converted to the schema's types.")
@click.option("--cpus", type=float, default=None, help="CPU cores to reserve.")
@click.option("--memory", callback=_size, default=None, help="RAM to reserve, e.g. 2GiB.")
@click.option("--gpus", type=float, default=None, help="GPUs to reserve; below 1 shares one GPU.")
@click.option("--gpu-memory", callback=_size, default=None, help="GPU memory per GPU, e.g. 4GiB.")
@click.option("--priority", type=click.IntRange(-1_000_000, 1_000_000), default=0, show_default=True, help="Higher runs first.")
@click.option("--max-retries", type=click.IntRange(0, 1000), default=0, show_default=True, help="Tries after a failure.")
@click.option("--timeout", type=float, default=None, help="Seconds a try may run.")
@click.option("--preemptible/--not-preemptible", default=None,
              help="May a job of higher priority that cannot fit otherwise stop this one (it is queued again and resumes)? Default: the kind's.")
@click.option("--wait", is_flag=True, help="Wait for the job to end; exit non-zero unless it succeeded.")
@click.option("--follow", is_flag=True, help="Print the job's events until it ends; exit non-zero unless it succeeded.")
@with_client
@json_option
def submit(client: Client, kind: str, params: tuple[str, ...], cpus: float | None, memory: int | None, gpus: float | None, gpu_memory: int | None,
           priority: int, max_retries: int, timeout: float | None, preemptible: bool | None, wait: bool, follow: bool, as_json: bool) -> None:
    """Submit a job of KIND (see `llmos plugins` for the kinds and their parameters)."""
    resources = {k: v for k, v in {"cpus": cpus, "memory": memory, "gpus": gpus, "gpu_memory": gpu_memory}.items() if v is not None}
    job = client.submit(kind, _parse_params(params), resources, priority=priority, max_retries=max_retries, timeout=timeout, coerce=True, preemptible=preemptible)
    if not (wait or follow):
        if as_json:
            echo_json(job._info.to_dict() if job._info else {"id": job.id})
        else:
            click.echo(f"job {job.id} submitted ({kind})")
        return
    if follow:
        printer = ProgressPrinter()
        for event in job.events(follow=True):
            _show(printer, event, as_json)
        printer.close()
    info = job.wait()
    if not follow:
        if as_json:
            echo_json(info.to_dict())
        else:
            _print_end(info)
    elif not as_json:
        _print_end(info)
    if info.state != "succeeded":
        sys.exit(1)


def _print_end(info: JobInfo) -> None:
    if info.state == "succeeded":
        click.echo(f"job {info.id} succeeded: {json.dumps(info.result, default=str)}")
    else:
        # A failure ends with one line on stderr (and the exit code), as every command's does.
        click.echo(f"llmos: job {info.id} {info.state}: {info.reason} (exit code {info.exit_code}, attempts {info.attempts})", err=True)


@click.command()
@click.option("--state", type=click.Choice(JOB_STATES), default=None, help="Only jobs in this state.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True, help="At most this many: the newest (of those below --before).")
@click.option("--before", type=click.IntRange(min=1), default=None, metavar="ID", help="Only jobs older than job ID: the page before it.")
@click.option("--all", "show_all", is_flag=True, help="Services' jobs too (llmos services lists the running ones).")
@with_client
@json_option
def jobs(client: Client, state: str | None, limit: int, before: int | None, show_all: bool, as_json: bool) -> None:
    """List jobs, oldest first: the newest --limit of them; older pages with --before. Services'
    jobs (serve, monitor...) only with --all."""
    page = client.jobs(state=state, limit=limit, before=before, services=show_all)
    if as_json:
        echo_json([i.to_dict() for i in page])
        _say_older(page, state, limit, show_all)
        return
    now = time.time()
    rows = []
    for i in page:
        took = (i.ended_at or now) - i.started_at if i.started_at else None
        rows.append([str(i.id), i.kind, i.state, str(i.attempts), format_duration(took) if took is not None else "-", (i.reason or "")[:60]])
    _table(rows, ["ID", "KIND", "STATE", "TRIES", "TIME", "REASON"])
    _say_older(page, state, limit, show_all)


def _say_older(page: JobList, state: str | None, limit: int, show_all: bool) -> None:
    """Where the next page back is, on stderr (stdout stays whole for a pipe)."""
    if page.before is None:
        return
    args = (f" --state {state}" if state else "") + (" --all" if show_all else "") + (f" --limit {limit}" if limit != 100 else "")
    click.echo(f"showing {len(page):,} of {page.total:,} jobs (ids {page[0].id}-{page[-1].id}); {page.older:,} older: llmos jobs --before {page.before}{args}", err=True)


@click.command()
@click.argument("job_id", type=int)
@with_client
@json_option
def job(client: Client, job_id: int, as_json: bool) -> None:
    """Show one job's record."""
    info = client.job(job_id).info()
    if as_json:
        echo_json(info.to_dict())
        return
    record = info.to_dict()
    for key, value in record.items():
        if value is None or value == {} or value == []:
            continue  # what a job does not have is not shown (--json has every field)
        if key.endswith("_at"):
            value = _dt.datetime.fromtimestamp(value).isoformat(sep=" ", timespec="milliseconds")
            if key == "ended_at" and record.get("started_at"):
                value += f"  (ran {format_duration(record['ended_at'] - record['started_at'])})"
        elif key in ("params", "result", "resources") and isinstance(value, dict):
            click.echo(f"{key:<13}")
            for name, item in value.items():
                text = item if isinstance(item, str) else json.dumps(item, default=str)
                click.echo(f"  {name:<20} {text if len(text) <= 200 else text[:197] + '...'}")
            continue
        elif isinstance(value, dict | list):
            value = json.dumps(value, default=str)
        click.echo(f"{key:<13} {value}")


@click.command()
@click.argument("job_id", type=int)
@with_client
@json_option
def cancel(client: Client, job_id: int, as_json: bool) -> None:
    """Cancel a job: a pending one ends at once; a running one is asked to stop, then signalled."""
    info = client.job(job_id).cancel()
    if as_json:
        echo_json(info.to_dict())
    elif info.state in END_STATES and info.state != "cancelled":
        click.echo(f"job {job_id} already ended: {info.state}")
    elif info.state == "cancelled":
        click.echo(f"job {job_id} cancelled")
    else:
        click.echo(f"job {job_id} is stopping")
