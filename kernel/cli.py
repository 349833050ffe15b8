"""The ``llmos`` command line.

Every command takes ``--state-dir`` (default ``$LLMOS_STATE_DIR`` or the XDG state dir) and
``--json``. Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

import llmos
from llmos.client import Client, JobInfo
from llmos.console import ProgressPrinter
from llmos.errors import ConfigError, LlmosError
from llmos.kernel.cliutil import _table, _ts, echo_json, json_option, state_dir_option, with_client
from llmos.paths import KERNEL_FILE, resolve_state_dir
from llmos.protocol import END_STATES, JOB_STATES, Event
from llmos.units import format_size, parse_size

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50}


class _OneLineUsageError(click.ClickException):
    exit_code = 2


class LlmosGroup(click.Group):
    """Turns llmos errors into one-line messages; adds plugin commands on first use."""

    _plugins_loaded = False

    def _load_plugin_commands(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        if os.environ.get("LLMOS_NO_PLUGIN_COMMANDS") == "1":
            return
        try:
            from llmos.kernel.plugins import collect_commands, load_plugins

            reg = load_plugins()
            for _plugin, cmd in collect_commands(reg, set(self.commands)):
                self.add_command(cmd)
        except Exception as exc:  # a broken plugin never breaks the CLI
            click.echo(f"warning: plugin commands unavailable: {exc}", err=True)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is None:
            self._load_plugin_commands()
            cmd = super().get_command(ctx, cmd_name)
        return cmd

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LlmosError as exc:
            raise click.ClickException(str(exc)) from None
        except click.UsageError as exc:
            # A bad option or argument: one line that says what was wrong and where help is,
            # not click's usage block (exit code 2, as click gives).
            where = exc.ctx.command_path if exc.ctx is not None else "llmos"
            raise _OneLineUsageError(f"{exc.format_message()} (see '{where} --help')") from None
        except KeyboardInterrupt:
            click.echo("", err=True)
            ctx.exit(130)


@click.group(cls=LlmosGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(llmos.__version__, prog_name="llmos")
def cli() -> None:
    """llmos: an operating system for language-model work.

    Start a kernel with `llmos boot`, then submit jobs, follow their logs and manage the machine.
    Every command finds the kernel through its state directory: --state-dir, else
    $LLMOS_STATE_DIR, else $XDG_STATE_HOME/llmos.
    """


# ---------------------------------------------------------------------------------------------
# the kernel


@cli.command()
@state_dir_option
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), help="A TOML settings file (see config/default.toml).")
@click.option("--fake-gpus", default=None, help="Simulated GPUs for placement tests, e.g. 2x24GiB.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None, help="Level of <state-dir>/kernel.log.")
@click.option("--detach", is_flag=True, help="Start in the background and return once the kernel answers.")
@json_option
def boot(state_dir: Path | None, config_file: Path | None, fake_gpus: str | None, log_level: str | None, detach: bool, as_json: bool) -> None:
    """Start the kernel (in the foreground; Ctrl-C or SIGTERM stops it cleanly)."""
    from llmos.config import load_settings

    overrides = {"devices.fake_gpus": fake_gpus, "kernel.log_level": log_level}
    settings = load_settings(config_file, overrides=overrides)
    state = resolve_state_dir(state_dir or settings["state_dir"] or None)
    if detach:
        _boot_detached(state, config_file, fake_gpus, log_level, as_json)
        return
    from llmos.kernel.logs import configure_logging
    from llmos.kernel.server import Kernel

    _make_state_dir(state)
    log_file = open(state / "kernel.log", "a", buffering=1)  # noqa: SIM115 - open for the kernel's lifetime
    configure_logging(json_lines=True, level=settings["kernel"]["log_level"], stream=log_file)
    kernel = Kernel(settings, state)

    original_boot = kernel.boot

    def boot_and_announce() -> None:
        original_boot()
        info = {"pid": os.getpid(), "state_dir": str(state), **kernel.endpoints}
        if as_json:
            echo_json(info)
        else:
            click.echo(f"llmos kernel {llmos.__version__} ready: pid {os.getpid()}, state dir {state}, control {kernel.endpoints['control']}")
        sys.stdout.flush()

    kernel.boot = boot_and_announce  # type: ignore[method-assign]
    try:
        kernel.run()
    except OSError as exc:
        # A file or socket the kernel needs could not be made (the runtime dir, the database):
        # one line here, the traceback in the kernel's log.
        traceback.print_exc(file=log_file)
        raise click.ClickException(f"the kernel could not run: {exc} (details in {state / 'kernel.log'})") from None
    finally:
        log_file.close()


def _make_state_dir(state: Path) -> None:
    """Create the state directory (mode 0700), or say in one line why it cannot be used."""
    try:
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(state, os.W_OK | os.X_OK):
            raise PermissionError(f"[Errno 13] Permission denied: {str(state)!r}")
    except OSError as exc:
        raise click.ClickException(f"cannot use state dir {state}: {exc.strerror or exc}; choose another with --state-dir or LLMOS_STATE_DIR") from None


def _boot_detached(state: Path, config_file: Path | None, fake_gpus: str | None, log_level: str | None, as_json: bool) -> None:
    from llmos.kernel.statedir import holder_pid

    held = holder_pid(state)
    if held:
        raise click.ClickException(f"another kernel (pid {held}) is running on state dir {state}; stop it with: llmos shutdown --state-dir {state}")
    _make_state_dir(state)
    argv = [sys.executable, "-m", "llmos.kernel.cli", "boot", "--state-dir", str(state)]
    if config_file:
        argv += ["--config", str(config_file.absolute())]
    if fake_gpus is not None:
        argv += ["--fake-gpus", fake_gpus]
    if log_level:
        argv += ["--log-level", log_level]
    out_path = state / "kernel.out"
    with open(out_path, "ab") as out:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + 30
    info_path = state / KERNEL_FILE
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = out_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise click.ClickException(f"the kernel exited during boot (code {child.returncode}): " + " | ".join(tail))
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            info = None
        if info and info.get("pid") == child.pid:
            with llmos.connect(state) as client:
                client.status()
            if as_json:
                echo_json(info)
            else:
                click.echo(f"llmos kernel {llmos.__version__} started in the background: pid {child.pid}, state dir {state}")
            return
        time.sleep(0.01)
    child.terminate()
    raise click.ClickException(f"the kernel did not become ready within 30s; see {out_path} and {state / 'kernel.log'}")


@cli.command()
@with_client
@json_option
def shutdown(client: Client, as_json: bool) -> None:
    """Stop the kernel (its running jobs are stopped and fail as "kernel restarted")."""
    pid = client.kernel["pid"]
    client.shutdown()
    if as_json:
        echo_json({"stopped": True, "pid": pid})
    else:
        click.echo(f"kernel (pid {pid}) stopped")


@cli.command()
@with_client
@json_option
def status(client: Client, as_json: bool) -> None:
    """Show the kernel's version, endpoints, job counts and workers."""
    info = client.status()
    if as_json:
        echo_json(info)
        return
    click.echo(f"llmos kernel {info['version']}  pid {info['pid']}  up {time.time() - info['started_at']:.0f}s")
    click.echo(f"state dir  {info['state_dir']}")
    for name, url in sorted(info["endpoints"].items()):
        click.echo(f"{name:<10} {url}")
    click.echo("jobs       " + "  ".join(f"{k} {v}" for k, v in info["jobs"].items()))
    click.echo("workers    " + "  ".join(f"{k} {v}" for k, v in info["workers"].items()))
    click.echo(f"journal    {info['last_seq']} events")


@cli.command()
@with_client
@json_option
def devices(client: Client, as_json: bool) -> None:
    """Show the device table: capacity, what is reserved and by which jobs."""
    table = client.devices()
    if as_json:
        echo_json(table)
        return
    rows = []
    for d in table:
        if d["kind"] == "cpu":
            share = f"{d['share_reserved']:g}/{d['capacity']:g} cores"
        else:
            share = f"{d['share_reserved']:g}/1"
        rows.append([
            d["id"],
            d["kind"],
            d["name"] + (" (fake)" if d["fake"] else ""),
            f"{format_size(d['memory_reserved'])}/{format_size(d['memory_total'])}",
            share,
            ",".join(map(str, d["jobs"])) or "-",
        ])
    _table(rows, ["ID", "KIND", "NAME", "MEMORY RESERVED", "SHARE", "JOBS"])


# ---------------------------------------------------------------------------------------------
# jobs


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


@cli.command()
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
        click.echo(f"job {info.id} {info.state}: {info.reason} (exit code {info.exit_code}, attempts {info.attempts})")


@cli.command()
@click.option("--state", type=click.Choice(JOB_STATES), default=None, help="Only jobs in this state.")
@click.option("--limit", type=int, default=1000, show_default=True, help="At most this many, newest.")
@click.option("--all", "show_all", is_flag=True, help="Services' jobs too (llmos services lists the running ones).")
@with_client
@json_option
def jobs(client: Client, state: str | None, limit: int, show_all: bool, as_json: bool) -> None:
    """List jobs, oldest first; services (serve, monitor...) only with --all."""
    infos = client.jobs(state=state, limit=limit)
    if not show_all:
        services = {k["name"] for k in client.kinds() if k.get("service")}
        infos = [i for i in infos if i.kind not in services]
    if as_json:
        echo_json([i.to_dict() for i in infos])
        return
    rows = []
    for i in infos:
        took = (i.ended_at or time.time()) - i.started_at if i.started_at else None
        rows.append([str(i.id), i.kind, i.state, str(i.attempts), f"{took:.1f}s" if took is not None else "-", (i.reason or "")[:60]])
    _table(rows, ["ID", "KIND", "STATE", "TRIES", "TIME", "REASON"])


@cli.command()
@click.argument("job_id", type=int)
@with_client
@json_option
def job(client: Client, job_id: int, as_json: bool) -> None:
    """Show one job's record."""
    info = client.job(job_id).info()
    if as_json:
        echo_json(info.to_dict())
        return
    for key, value in info.to_dict().items():
        if key.endswith("_at"):
            value = _dt.datetime.fromtimestamp(value).isoformat(sep=" ", timespec="milliseconds") if value else "-"
        elif isinstance(value, dict | list):
            value = json.dumps(value, default=str)
        click.echo(f"{key:<13} {value}")


@cli.command()
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


# ---------------------------------------------------------------------------------------------
# logs and events


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


@cli.command()
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


@cli.command()
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


def _since(value: str | None) -> float | None:
    """``2h``, ``30m``, ``1d``, ``90s``, an ISO date-time, or epoch seconds."""
    if value is None:
        return None
    import re

    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", value.strip())
    if match:
        return time.time() - float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return _dt.datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise click.BadParameter(f"expected a duration like 2h or 30m, an ISO date-time, or epoch seconds, got {value!r}", param_hint="--since") from None


@cli.command()
@click.option("--since", default=None, help="Only jobs that ended since: 2h, 30m, 1d, an ISO date-time, or epoch seconds.")
@click.option("--limit", type=int, default=1000, show_default=True, help="At most this many, newest.")
@with_client
@json_option
def acct(client: Client, since: str | None, limit: int, as_json: bool) -> None:
    """Accounting of finished jobs: wall and CPU time, peak memory, GPU use and tokens, one row each."""
    rows = client.acct(_since(since), limit)
    if as_json:
        echo_json(rows)
        return
    table = []
    for r in rows:
        gpu = f"{r['gpu_seconds']:.1f}" if r["gpu_seconds"] is not None else "-"
        table.append([
            str(r["id"]), r["kind"], r.get("plugin") or "-", r["state"], f"{r['wall_seconds']:.2f}s",
            f"{r['cpu_seconds']:.2f}s" if r["cpu_seconds"] is not None else "-",
            format_size(r["max_rss"]) if r["max_rss"] else "-", gpu, str(r["tokens"]) if r["tokens"] is not None else "-",
            (r["reason"] or "")[:40],
        ])
    _table(table, ["ID", "KIND", "PLUGIN", "STATE", "WALL", "CPU", "PEAK RSS", "GPU-S", "TOKENS", "REASON"])


# ---------------------------------------------------------------------------------------------
# plugins (kernel/plugin_cli.py)

from llmos.kernel.plugin_cli import plugins  # noqa: E402 - the group needs the helpers above

cli.add_command(plugins)



def main() -> None:
    """Entry point of the ``llmos`` command."""
    from llmos.kernel.logs import configure_logging

    # Warnings (a broken plugin, say) go to stderr, never into --json output.
    configure_logging(json_lines=False, level="warning", stream=sys.stderr)
    try:
        cli.main(prog_name="llmos")
    except ConfigError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
