"""The kernel's commands: boot, shutdown, status, devices."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import click

import llmos
from llmos.client import Client
from llmos.kernel.cli.common import (
    _table,
    echo_json,
    json_option,
    state_dir_option,
    with_client,
)
from llmos.paths import KERNEL_FILE, resolve_state_dir
from llmos.units import format_duration, format_size


@click.command()
@state_dir_option
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), help="A TOML settings file (see config/default.toml).")
@click.option("--fake-gpus", default=None, help="Simulated GPUs for placement tests, e.g. 2x24GiB.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None, help="Level of <state-dir>/kernel.log.")
@click.option("--listen", default=None, metavar="HOST:PORT", help="Also listen on TCP (CurveZMQ) for remote clients and workers: control on PORT, events PORT+1, ingest PORT+2 (0: any free ports).")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Run jobs on a Ray cluster: its GCS address (HOST:PORT) or 'auto' (needs pip install 'llmos[ray]'). Same as [cluster] backend = \"ray\".")
@click.option("--detach", is_flag=True, help="Start in the background and return once the kernel answers.")
@json_option
def boot(state_dir: Path | None, config_file: Path | None, fake_gpus: str | None, log_level: str | None, listen: str | None, ray_address: str | None,
         detach: bool, as_json: bool) -> None:
    """Start the kernel (in the foreground; Ctrl-C or SIGTERM stops it cleanly).

    \b
    One machine (the default): jobs run in worker processes the kernel forks.
    A Ray cluster:   llmos boot --ray HOST:PORT   (or --ray auto)
      the kernel places every job on a node of the cluster and Ray starts its worker there;
      workers reach the kernel over CurveZMQ TCP (see --listen).
    """
    from llmos.config import load_settings

    overrides = {"devices.fake_gpus": fake_gpus, "kernel.log_level": log_level, "kernel.listen": listen}
    if ray_address is not None:
        overrides.update({"cluster.backend": "ray", "cluster.address": ray_address})
    settings = load_settings(config_file, overrides=overrides)
    state = resolve_state_dir(state_dir or settings["state_dir"] or None)
    if detach:
        _boot_detached(state, config_file, fake_gpus, log_level, as_json, listen=listen, ray_address=ray_address)
        return
    from llmos.kernel.logs import QuietStream, configure_logging
    from llmos.kernel.server import Kernel

    _make_state_dir(state)
    # Writes to the log never raise: a full disk costs log lines, not the kernel (nor does stderr,
    # which is kernel.out on the same disk when detached).
    log_file = QuietStream(open(state / "kernel.log", "a", buffering=1))  # noqa: SIM115 - open for the kernel's lifetime
    sys.stderr = QuietStream(sys.stderr)  # type: ignore[assignment]
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
    """Create the state directory (mode 0700), or say in one line why it cannot be used: a
    read-only filesystem and a permission problem each say so, and what to do."""
    from llmos.kernel.statedb import unwritable, write_problem

    try:
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise click.ClickException(str(unwritable(state, "read-only", f"{exc.filename or state} would be on a read-only filesystem"))) from None
        raise click.ClickException(f"cannot use state dir {state}: {exc.strerror or exc}; choose another with --state-dir or LLMOS_STATE_DIR") from None
    problem = write_problem(state)
    if problem:
        raise click.ClickException(str(unwritable(state, *problem)))


def _boot_detached(state: Path, config_file: Path | None, fake_gpus: str | None, log_level: str | None, as_json: bool, *, quiet: bool = False,
                   listen: str | None = None, ray_address: str | None = None) -> None:
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
    if listen:
        argv += ["--listen", listen]
    if ray_address:
        argv += ["--ray", ray_address]
    out_path = state / "kernel.out"
    with open(out_path, "ab") as out:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + 30
    info_path = state / KERNEL_FILE
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = out_path.read_text(errors="replace").strip().splitlines()[-5:]
            if tail and tail[-1].startswith("Error: "):  # the kernel's own one-line refusal says it all
                raise click.ClickException(tail[-1].removeprefix("Error: "))
            raise click.ClickException(f"the kernel exited during boot (code {child.returncode}): " + " | ".join(tail))
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            info = None
        if info and info.get("pid") == child.pid:
            with llmos.connect(state) as client:
                client.status()
            if as_json and not quiet:
                echo_json(info)
            elif not quiet:
                click.echo(f"llmos kernel {llmos.__version__} started in the background: pid {child.pid}, state dir {state}")
            return
        time.sleep(0.01)
    child.terminate()
    raise click.ClickException(f"the kernel did not become ready within 30s; see {out_path} and {state / 'kernel.log'}")


@click.command()
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


@click.command()
@with_client
@json_option
def status(client: Client, as_json: bool) -> None:
    """Show the kernel's version, endpoints, job counts and workers."""
    info = client.status()
    info["dashboard_url"] = _dashboard_url(client)
    if as_json:
        echo_json(info)
        return
    click.echo(f"llmos kernel {info['version']}  pid {info['pid']}  up {format_duration(time.time() - info['started_at'])}")
    click.echo(f"state dir  {info['state_dir']}")
    for name, url in sorted(info["endpoints"].items()):
        click.echo(f"{name:<10} {url}")
    click.echo("jobs       " + "  ".join(f"{k} {v}" for k, v in info["jobs"].items()))
    click.echo("workers    " + "  ".join(f"{k} {v}" for k, v in info["workers"].items()))
    click.echo(f"journal    {info['last_seq']} events")
    if info.get("metrics_url"):
        click.echo(f"metrics    {info['metrics_url']}")
    if info.get("dashboard_url"):
        click.echo(f"dashboard  {info['dashboard_url']}")
    storage = info.get("storage")
    if storage:
        click.echo(f"storage    {describe_storage(storage)}")
    cluster = info.get("cluster")
    if cluster:
        state = cluster["state"] + (f" ({cluster['error']})" if cluster.get("error") else "")
        click.echo(f"cluster    ray {cluster['address']}: {state}, {len(cluster['nodes'])} node(s) {' '.join(cluster['nodes'])}")


def _dashboard_url(client: Client) -> str | None:
    """The web dashboard's page, when the ``dashboard`` service runs (``llmos dashboard``)."""
    if not any(s["name"] == "dashboard" and s["replicas"] for s in client.services()):
        return None
    try:
        for reply in client.call("dashboard", {}, timeout=5):
            return str(reply.get("page") or reply.get("url"))
    except llmos.LlmosError:
        return None
    return None


def describe_storage(storage: dict[str, Any]) -> str:
    """The state dir's disk in one line: how much is free, and what the kernel does about it."""
    free, total = int(storage.get("free") or 0), int(storage.get("total") or 0)
    line = f"{format_size(free)} free of {format_size(total)}"
    if storage.get("state") == "full":
        line += f"; FULL: submits and workers' events refused ({storage.get('reason')}); llmos goes on by itself once space is freed"
        if storage.get("refused_events"):
            line += f"; {storage['refused_events']:,} events refused"
    elif storage.get("state") == "low":
        line += f"; low: below {format_size(int(storage.get('low_space') or 0))} ([storage] low_space)"
    return line


@click.command()
@with_client
@json_option
def devices(client: Client, as_json: bool) -> None:
    """Show the device table: capacity, what is reserved and by which jobs."""
    table = client.devices()
    if as_json:
        echo_json(table)
        return
    rows = []
    nodes = any(d.get("node") for d in table)  # a cluster: grouped by node, one row per device
    for d in sorted(table, key=lambda d: (d.get("node") or "", d["kind"] != "cpu", d["id"])) if nodes else table:
        if d["kind"] == "cpu":
            share = f"{d['share_reserved']:g}/{d['capacity']:g} cores"
        else:
            share = f"{d['share_reserved']:g}/1"
        rows.append([
            *([d.get("node") or "-"] if nodes else []),
            d["id"].split(":", 1)[-1] if nodes else d["id"],
            d["kind"],
            d["name"] + (" (fake)" if d["fake"] else ""),
            f"{format_size(d['memory_reserved'])}/{format_size(d['memory_total'])}",
            share,
            ",".join(map(str, d["jobs"])) or "-",
        ])
    if nodes:
        _table(rows, ["NODE", "DEVICE", "KIND", "NAME", "MEMORY RESERVED", "SHARE", "JOBS"])
    elif not rows:
        click.echo("no devices (a cluster kernel shows its nodes' devices once they have joined)")
    else:
        _table(rows, ["ID", "KIND", "NAME", "MEMORY RESERVED", "SHARE", "JOBS"])
