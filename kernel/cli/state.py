"""The state database: ``llmos state check | backup | repair`` (kernel/statedb.py does the work)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from llmos.kernel.cli.common import echo_json, json_option, parent_state_dir, state_dir_option
from llmos.paths import resolve_state_dir
from llmos.units import format_size


def _state(state_dir: Path | None) -> Path:
    return resolve_state_dir(state_dir or parent_state_dir())


@click.group()
@state_dir_option
def state(state_dir: Path | None) -> None:
    """Check, back up and repair the kernel's state database (<state-dir>/llmos.db).

    \b
    llmos state check          integrity_check, and the jobs and events it can read
    llmos state backup PATH    an online copy, safe while the kernel runs and writes
    llmos state repair         salvage a damaged database (the kernel stopped first)

    A kernel refuses to boot on a damaged database, or on an empty or missing one in a state dir
    that has history (job folders, worker logs, a kernel.log of a kernel that ran); these
    commands are what it tells you to run.
    """


@state.command()
@state_dir_option
@json_option
def check(state_dir: Path | None, as_json: bool) -> None:
    """Run SQLite's full integrity_check on the state database and count what can be read.

    Works beside a running kernel (a read-only connection). Exit code 0 when the database is
    sound (or no kernel has stored anything yet), 1 when it is damaged, empty or missing.
    """
    from llmos.kernel.statedb import check as run_check
    from llmos.kernel.statedb import describe_gaps

    root = _state(state_dir)
    report = run_check(root)
    if as_json:
        echo_json(report.to_dict())
    elif report.state == "fresh":
        click.echo(f"{report.path}: no database yet, and no history: a kernel has not stored anything in {root}")
    elif report.state in ("empty", "missing"):
        click.echo(f"{report.path}: {report.state.upper()}")
        for problem in report.problems:
            click.echo(f"  {problem}")
    else:
        click.echo(f"{report.path}: {'ok' if report.ok else report.state.upper()}, {format_size(report.size)} (integrity_check in {report.seconds * 1000:.0f} ms)")
        for problem in report.problems[:10]:
            click.echo(f"  {problem}")
        if len(report.problems) > 10:
            click.echo(f"  ... and {len(report.problems) - 10} more")
        lost = f"; {report.jobs_lost:,} of ids 1-{report.top_id:,} missing" if report.jobs_lost else ""
        click.echo(f"jobs     {report.jobs:,} readable{lost}")
        click.echo(f"events   {report.events:,} readable, in {report.journal_rows:,} journal rows")
        for table, gaps in report.gaps.items():
            click.echo(f"unread   {table}: rowids {describe_gaps(gaps)}")
    if not report.ok:
        if not as_json:
            keeps = "it keeps the damaged file aside" if report.state == "damaged" else "it makes an empty store beside that history"
            click.echo(f"llmos: {report.path} is {report.state}; restore a backup, or run `llmos state repair --state-dir {root}` "
                       f"(with the kernel stopped; {keeps})", err=True)
        sys.exit(1)


@state.command()
@click.argument("path", type=click.Path(path_type=Path))
@state_dir_option
@json_option
def backup(path: Path, state_dir: Path | None, as_json: bool) -> None:
    """Copy the state database to PATH (a file, or a folder to put llmos-<time>.db in).

    An online SQLite backup: safe while the kernel runs and writes, which it never blocks. The
    copy is written beside PATH, checked with integrity_check, then renamed into place, so PATH is
    never half written. To restore: stop the kernel, then copy the backup over llmos.db.
    """
    from llmos.kernel.statedb import backup as run_backup

    root = _state(state_dir)
    report = run_backup(root, path)
    if as_json:
        echo_json(report.to_dict())
        return
    click.echo(f"backed up {root / 'llmos.db'} to {report.path}: {format_size(report.size)}, {report.jobs:,} jobs, "
               f"{report.events:,} events; integrity ok ({report.seconds:.2f}s)")


@state.command()
@state_dir_option
@json_option
def repair(state_dir: Path | None, as_json: bool) -> None:
    """Salvage a damaged state database into a new one (no kernel may run: llmos shutdown first).

    Every table is read row by row, stepping over what cannot be read; what was read goes into a
    new llmos.db. The damaged file is kept aside as llmos.db.damaged-<time> (with its -wal and
    -shm). An empty or missing database beside history gets an empty store. A sound database is
    left as it is. Then `llmos boot` shows the recovered jobs.
    """
    from llmos.kernel.statedb import repair as run_repair

    root = _state(state_dir)
    report = run_repair(root)
    if as_json:
        echo_json(report.to_dict())
        return
    if not report.repaired:
        click.echo(f"{report.path} is sound ({report.jobs:,} jobs, {report.events:,} events): nothing to repair")
        return
    if report.found in ("empty", "missing"):
        click.echo(f"made an empty store at {report.path} ({report.found} before): the job folders and logs beside it stay; "
                   f"new jobs get ids above {report.top_id:,}")
    else:
        lost = f", {report.jobs_lost:,} lost" if report.jobs_lost else ""
        click.echo(f"repaired {report.path}: {report.jobs:,} jobs recovered{lost}; {report.events:,} events in the journal")
        for name, table in sorted(report.tables.items()):
            click.echo(_table_line(name, table))
    if report.kept:
        side = [s for s in ("-wal", "-shm") if Path(report.kept + s).exists()]
        click.echo(f"the {report.found} file is kept as {report.kept}" + (f" (with its {' and '.join(side)})" if side else ""))
    click.echo(f"boot with: llmos boot --state-dir {root}")


def _table_line(name: str, table: dict[str, Any]) -> str:
    from llmos.kernel.statedb import describe_gaps

    line = f"  {name:<18} {table['rows']:>9,} rows"
    gaps = table.get("gaps") or []
    if table.get("error"):
        line += f"; unreadable: {table['error']}"
    elif gaps and gaps[0]["after"] is None and gaps[0]["before"] is None:
        line += f"; unreadable ({gaps[0]['error']})"
    elif gaps:
        line += f"; rowids {describe_gaps(gaps)} unreadable"
    if table.get("torn"):
        line += f"; {table['torn']:,} torn (read past the end of the file) left out"
    return line
