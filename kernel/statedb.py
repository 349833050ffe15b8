"""The state database's health: the check at boot, and ``llmos state check | backup | repair``.

At boot (:func:`open_store`, after the kernel has taken the state dir's lock) the kernel refuses,
in one line that names the file, says what is wrong and what to do:

- a state dir it cannot write: a read-only filesystem (``statvfs`` says ``ST_RDONLY``) and a
  permission problem (EACCES/EPERM: owner, mode) are told apart (:func:`write_problem`);
- a damaged ``llmos.db``: not an SQLite file, shorter than its header says (truncated), or failing
  ``PRAGMA quick_check`` (run with a time budget, :data:`QUICK_CHECK_BUDGET`: a database too
  large to check within it boots unchecked, with a log line; ``llmos state check`` checks all);
- an empty (0 bytes, or no job table) or missing ``llmos.db`` in a state dir that has *history*
  (:func:`history_of`), where a silent fresh store would drop every job without a word.

*History* is what only a kernel that had its store open leaves behind: an entry in ``jobs/`` (a
job's folder) or ``workers/`` (a worker's log), a ``llmos.db-wal`` with data in it, or a
``kernel.log`` that records a ready kernel. A fresh state dir has none and boots as always.

``check`` runs the full ``PRAGMA integrity_check`` on a read-only connection (safe beside a
running kernel) and counts the jobs and events it can read. ``backup`` copies the database with
SQLite's online backup, page-stepped, inside one read transaction of its own: in WAL mode a reader
never blocks the kernel's writes, and the held snapshot keeps the backup from starting over each
time the kernel commits (without it, a busy kernel restarted a 10 MiB backup some 3,000 times).
``repair`` (no kernel running) reads the damaged database table by table, row by row in rowid
order, steps over what cannot be read (:class:`Salvage`) and writes what it read into a new file;
the damaged one is kept aside as ``llmos.db.damaged-<time>`` with its ``-wal`` and ``-shm``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import structlog

from llmos.errors import LlmosError
from llmos.kernel import artifacts as _artifacts
from llmos.kernel import store as _store
from llmos.kernel.statedir import holder_pid
from llmos.units import format_size

log = structlog.get_logger("llmos.kernel")

__all__ = [
    "DB_FILE",
    "QUICK_CHECK_BUDGET",
    "BackupReport",
    "CheckReport",
    "RepairReport",
    "Salvage",
    "StateDamaged",
    "StateUnwritable",
    "backup",
    "check",
    "check_at_boot",
    "history_of",
    "open_store",
    "repair",
    "write_problem",
]

DB_FILE = "llmos.db"
#: Seconds the boot's ``PRAGMA quick_check`` may take (about 1 ms per MiB here); past it the
#: database boots unchecked and the log says so.
QUICK_CHECK_BUDGET = 2.0
_SIDE_FILES = ("-wal", "-shm")
_MIN_ROWID = -(2**63)
_MAX_ROWID = 2**63 - 1
_LOG_SCAN = 256 * 1024  # bytes of kernel.log read at each end when looking for a ready kernel


class StateDamaged(LlmosError):
    """The state database is damaged, or empty or missing where the state dir has history;
    ``.state_dir`` and ``.path`` name it, ``.problem`` says what is wrong."""

    code = 221


class StateUnwritable(LlmosError):
    """The state dir (or its database) cannot be written: ``.why`` is ``read-only`` (the
    filesystem) or ``permission`` (owner or mode)."""

    code = 222


# ---------------------------------------------------------------------------------------------
# what is wrong, in words


def write_problem(path: Path) -> tuple[str, str] | None:
    """Why this process cannot write ``path`` (a file or a directory), or None if it can:
    (``read-only``, words) for a read-only filesystem, (``permission``, words) otherwise."""
    try:
        readonly = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return None  # not there: whoever makes it will say why not
    if readonly:
        return "read-only", f"{path} is on a read-only filesystem (mounted read-only at {_mount_point(path)})"
    if os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
        return None
    st = path.stat()
    return "permission", (
        f"{path} is not writable by this user (uid {os.geteuid()}; it belongs to uid {st.st_uid}, mode {st.st_mode & 0o7777:04o})"
    )


def _mount_point(path: Path) -> Path:
    """The mount point of the filesystem that holds ``path`` (or would: its nearest parent that exists)."""
    path = path.resolve()
    while not path.exists() and path.parent != path:
        path = path.parent
    dev = path.stat().st_dev
    while path.parent != path and path.parent.stat().st_dev == dev:
        path = path.parent
    return path


def unwritable(state_dir: Path, why: str, words: str) -> StateUnwritable:
    """The one-line refusal for a state dir that cannot be written, with what to do."""
    if why == "read-only":
        todo = f"remount it read-write (mount -o remount,rw {_mount_point(state_dir)}) or choose another state dir with --state-dir"
    else:
        todo = "fix its owner or mode (chown, chmod), run as its owner, or choose another state dir with --state-dir"
    return StateUnwritable(f"cannot use state dir {state_dir}: {words}; {todo}", state_dir=str(state_dir), why=why)


def history_of(state_dir: Path) -> str | None:
    """What in ``state_dir`` shows that a kernel had its store open here (see the module's
    docstring), in words, or None for a fresh state dir."""
    found = []
    for folder, what in (("jobs", "job folder"), ("workers", "worker log")):
        with contextlib.suppress(OSError), os.scandir(state_dir / folder) as entries:
            n = sum(1 for _ in entries)
            if n:
                found.append(f"{n:,} {what}{'s' if n != 1 else ''} in {folder}/")
    with contextlib.suppress(OSError):
        size = (state_dir / (DB_FILE + "-wal")).stat().st_size
        if size:
            found.append(f"{format_size(size)} in {DB_FILE}-wal")
    if _log_has_ready_kernel(state_dir / "kernel.log"):
        found.append("kernel.log records a kernel that ran")
    return ", ".join(found) or None


def _log_has_ready_kernel(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(_LOG_SCAN)
            size = os.fstat(f.fileno()).st_size
            if size > 2 * _LOG_SCAN:
                f.seek(size - _LOG_SCAN)
            tail = f.read(_LOG_SCAN)
    except OSError:
        return False
    return b'"kernel_ready"' in head or b'"kernel_ready"' in tail


def header_problem(path: Path) -> str | None:
    """What the first 100 bytes of an SQLite file say is wrong with it (not SQLite; shorter than
    the size its header records), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(100)
        size = path.stat().st_size
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if len(head) < 100 or not head.startswith(b"SQLite format 3\x00"):
        return "not an SQLite database (its first bytes are not an SQLite header)"
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    pages = int.from_bytes(head[28:32], "big")
    valid = head[24:28] == head[92:96]  # the size field is only meaningful when these agree
    wal = Path(str(path) + "-wal")
    pending = wal.exists() and wal.stat().st_size > 0  # a checkpoint may be under way: the WAL decides
    if valid and pages and not pending and size < pages * page:
        return f"truncated: {format_size(size)} of the {format_size(pages * page)} its header records ({pages:,} pages of {page:,} bytes)"
    return None


def _damaged(state_dir: Path, path: Path, what: str) -> StateDamaged:
    return StateDamaged(
        f"state dir {state_dir}: {path} is damaged ({what}); run `llmos state check --state-dir {state_dir}`, then "
        f"`llmos state repair --state-dir {state_dir}` (keeps the damaged file aside) or restore a backup",
        state_dir=str(state_dir), path=str(path), problem=what,
    )


def _gone(state_dir: Path, path: Path, what: str, history: str) -> StateDamaged:
    return StateDamaged(
        f"state dir {state_dir}: {path} is {what} but the state dir has history ({history}), so its jobs and journal are gone; "
        f"restore {DB_FILE} from a backup (`llmos state backup` makes one), or run `llmos state repair --state-dir {state_dir}` "
        "to start an empty store beside that history",
        state_dir=str(state_dir), path=str(path), problem=what,
    )


def _connect_ro(path: Path, *, tolerant: bool = False) -> sqlite3.Connection:
    """A read-only connection that still sees the WAL (and never checkpoints it into the file).
    ``tolerant``: one that reads the tables even where the schema cannot be loaded whole
    (``writable_schema``, as the sqlite3 shell's ``.dump`` does; nothing is written)."""
    wal = Path(str(path) + "-wal")
    if (write_problem(path.parent) or ("", ""))[0] == "read-only" and not (wal.exists() and wal.stat().st_size):
        # No -shm can be made on a read-only filesystem, and none is needed: nothing can write
        # there, and there is no WAL to read.
        uri = f"file:{path}?immutable=1"
    else:
        uri = f"file:{path}?mode=ro"
    db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA query_only=1")
    if tolerant:
        db.execute("PRAGMA writable_schema=ON")
    return db


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# boot


def check_at_boot(state_dir: Path, *, budget: float = QUICK_CHECK_BUDGET) -> str:
    """Refuse a state dir the kernel cannot write, or whose database is damaged, or empty or
    missing beside history (StateUnwritable, StateDamaged); else say how the database was found:
    ``fresh``, ``ok`` or ``unchecked`` (the quick check ran out of ``budget``)."""
    path = state_dir / DB_FILE
    for target in (state_dir, path, *(Path(str(path) + s) for s in _SIDE_FILES)):
        problem = write_problem(target)
        if problem:
            raise unwritable(state_dir, *problem)
    size = path.stat().st_size if path.exists() else None
    if not size:
        history = history_of(state_dir)
        if history:
            raise _gone(state_dir, path, "missing" if size is None else "empty (0 bytes)", history)
        return "fresh"
    what = header_problem(path)
    if what:
        raise _damaged(state_dir, path, what)
    try:
        db = _connect_ro(path)
    except sqlite3.DatabaseError as exc:
        raise _damaged(state_dir, path, _first_line(exc)) from None
    try:
        return _quick_check(db, state_dir, path, budget)
    finally:
        db.close()


def _quick_check(db: sqlite3.Connection, state_dir: Path, path: Path, budget: float) -> str:
    deadline = time.monotonic() + budget
    db.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    try:
        rows = db.execute("PRAGMA quick_check(5)").fetchall()
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.OperationalError as exc:
        if "interrupted" in str(exc):
            log.warning("state_db_unchecked", path=str(path), budget=budget, size=path.stat().st_size,
                        why="the quick check ran out of time; `llmos state check` checks it all")
            return "unchecked"
        raise _damaged(state_dir, path, _first_line(exc)) from None
    except sqlite3.DatabaseError as exc:
        raise _damaged(state_dir, path, _first_line(exc)) from None
    finally:
        db.set_progress_handler(None, 0)
    if rows != [("ok",)]:
        raise _damaged(state_dir, path, "; ".join(str(r[0]) for r in rows[:2]))
    if "jobs" not in tables:
        history = history_of(state_dir)
        if history:
            raise _gone(state_dir, path, "an SQLite file without a job table", history)
    return "ok"


def open_store(state_dir: Path) -> _store.Store:
    """The kernel's store, once :func:`check_at_boot` passed; a database SQLite refuses on open
    is refused the same way (one line, never a traceback)."""
    t0 = time.perf_counter()
    path = state_dir / DB_FILE
    try:
        found = check_at_boot(state_dir)
        try:
            store = _store.Store(path)
        except sqlite3.DatabaseError as exc:
            problem = write_problem(path) or write_problem(state_dir)
            if problem:
                raise unwritable(state_dir, *problem) from None
            raise _damaged(state_dir, path, _first_line(exc)) from None
    except (StateDamaged, StateUnwritable) as exc:
        log.error("state_refused", path=str(path), error=str(exc))
        raise
    log.info("state_db_opened", path=str(path), found=found, check_ms=round((time.perf_counter() - t0) * 1000, 1))
    return store


# ---------------------------------------------------------------------------------------------
# reading what can be read


@dataclass
class Gap:
    """Rows that could not be read: rowids after ``after`` and before ``before`` (None: the
    table's start or end)."""

    after: int | None
    before: int | None
    error: str


class Salvage:
    """The rows of one table of a (damaged) database in rowid order, stepping over what cannot
    be read: after a read fails, seek forward in growing steps until a row can be read again,
    then back by bisection to the first one. What was stepped over is in :attr:`gaps`."""

    def __init__(self, db: sqlite3.Connection, table: str, columns: str = "*") -> None:
        self.db = db
        self.sql = f"SELECT rowid, {columns} FROM {_q(table)} WHERE rowid >= ? ORDER BY rowid"
        self.gaps: list[Gap] = []
        self.read = 0

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        start = _MIN_ROWID
        last: int | None = None
        while True:
            try:
                for row in self.db.execute(self.sql, (start,)):
                    last = row[0]
                    self.read += 1
                    yield row
                return
            except sqlite3.DatabaseError as exc:
                error = _first_line(exc)
            found = self._next_readable(start if last is None or last < start else last + 1)
            self.gaps.append(Gap(last, found, error))
            if found is None:
                return
            start = found

    def _readable_from(self, start: int) -> int | None:
        """The rowid of the first row at or after ``start`` if it can be read, None when there is
        none; raises DatabaseError when the seek or the read fails."""
        row = self.db.execute(self.sql + " LIMIT 1", (start,)).fetchone()
        return None if row is None else int(row[0])

    def _fails_from(self, start: int) -> bool:
        try:
            self._readable_from(start)
        except sqlite3.DatabaseError:
            return True
        return False

    def _next_readable(self, bad: int) -> int | None:
        """The first readable rowid past ``bad`` (a start whose read failed), or None."""
        lo, base, step = bad, bad, 1
        while True:
            probe = base + step
            if probe > _MAX_ROWID:
                return None
            if base < 0 < probe:
                base, step, probe = 0, 1, 1  # rowids mostly start at 1: search the positive ones closely too
            if not self._fails_from(probe):
                break
            lo, step = probe, step * 2
        hi = probe  # a read from lo fails, one from hi does not: find the first good start
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._fails_from(mid):
                lo = mid
            else:
                hi = mid
        return self._readable_from(hi)


def _job_folder_max(state_dir: Path) -> int:
    with contextlib.suppress(OSError), os.scandir(state_dir / "jobs") as entries:
        return max((int(e.name) for e in entries if e.name.isdigit()), default=0)
    return 0


@dataclass
class TableCount:
    """What was read of one table."""

    rows: int = 0
    gaps: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None  # the table could not be read at all


def _count(db: sqlite3.Connection, table: str, columns: str = "NULL", add: Callable[[tuple[Any, ...]], int] | None = None) -> tuple[TableCount, int, int]:
    """(what was read, the sum of ``add`` over its rows, the highest rowid read)."""
    reader = Salvage(db, table, columns)
    total, top = 0, 0
    try:
        for row in reader:
            top = max(top, int(row[0]))
            if add is not None:
                total += add(row)
    except sqlite3.DatabaseError as exc:  # e.g. the table is not there
        return TableCount(error=_first_line(exc)), 0, 0
    return TableCount(rows=reader.read, gaps=[asdict(g) for g in reader.gaps]), total, top


# ---------------------------------------------------------------------------------------------
# llmos state check


@dataclass
class CheckReport:
    """What ``llmos state check`` found: ``state`` is ``ok``, ``fresh`` (no database and no
    history: nothing to check), ``damaged``, ``empty`` or ``missing`` (beside history), or
    ``unreadable`` (SQLite cannot open it: see ``problems``)."""

    path: str
    state: str
    problems: list[str] = field(default_factory=list)
    size: int = 0
    jobs: int = 0  # job rows read
    jobs_lost: int = 0  # ids up to top_id that are not in the table (or could not be read)
    top_id: int = 0  # the highest job id known: from the rows, the id counter and the jobs/ folders
    events: int = 0  # events in the journal rows read
    journal_rows: int = 0
    gaps: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # table -> rowids not read
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.state in ("ok", "fresh")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def check(state_dir: Path) -> CheckReport:
    """``PRAGMA integrity_check`` (the full one) of the state dir's database on a read-only
    connection, and the jobs and events it can read."""
    t0 = time.perf_counter()
    path = state_dir / DB_FILE
    size = path.stat().st_size if path.exists() else None
    if not size:
        history = history_of(state_dir)
        if history is None:
            return CheckReport(path=str(path), state="fresh", seconds=time.perf_counter() - t0)
        what = "missing" if size is None else "empty"
        return CheckReport(path=str(path), state=what, problems=[f"{what}, beside history: {history}"], jobs_lost=_job_folder_max(state_dir), top_id=_job_folder_max(state_dir),
                           seconds=time.perf_counter() - t0)
    report = CheckReport(path=str(path), state="damaged", size=size)
    head = header_problem(path)
    if head:
        report.problems.append(head)
    try:
        db = _connect_ro(path)
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.DatabaseError as exc:
        if "unable to open" in str(exc):
            db.close()
            problem = write_problem(path.parent)
            report.state, report.problems = "unreadable", [_first_line(exc) + (f": {problem[1]}" if problem else "")]
            return report
        # else damaged: integrity_check says how
    try:
        try:
            rows = [str(r[0]) for r in db.execute("PRAGMA integrity_check(20)")]
            if rows != ["ok"]:
                report.problems += rows
        except sqlite3.DatabaseError as exc:
            report.problems.append(_first_line(exc))
        if report.problems:
            db.close()
            db = _connect_ro(path, tolerant=True)  # count what can be read, past a damaged schema
        jobs, _, top = _count(db, "jobs")
        journal, events, _ = _count(db, "journal", "n", add=lambda row: row[1] if type(row[1]) is int else 0)
        report.jobs, report.events, report.journal_rows = jobs.rows, events, journal.rows
        report.top_id = max(top, _sequence(db, "jobs"), _job_folder_max(state_dir))
        report.jobs_lost = max(0, report.top_id - jobs.rows)
        for name, counted in (("jobs", jobs), ("journal", journal)):
            if counted.gaps:
                report.gaps[name] = counted.gaps
            if counted.error:
                report.problems.append(f"table {name}: {counted.error}")
    finally:
        db.close()
    if not report.problems:
        report.state = "ok"
    report.seconds = time.perf_counter() - t0
    return report


def _sequence(db: sqlite3.Connection, table: str) -> int:
    """The AUTOINCREMENT counter of ``table`` (the highest id it ever gave), 0 if unreadable."""
    try:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name=?", (table,)).fetchone()
    except sqlite3.DatabaseError:
        return 0
    return int(row[0]) if row and isinstance(row[0], int) else 0


# ---------------------------------------------------------------------------------------------
# llmos state backup


@dataclass
class BackupReport:
    """Where ``llmos state backup`` wrote, and what the copy holds."""

    path: str
    size: int
    jobs: int
    events: int
    seconds: float
    steps: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


BACKUP_PAGES = 1024  # pages per step (4 MiB with 4 KiB pages)


def backup(state_dir: Path, dest: Path, *, pages: int = BACKUP_PAGES) -> BackupReport:
    """Copy the state dir's database to ``dest`` while a kernel may run and write: an online,
    page-stepped backup within one read snapshot, into a temporary file beside ``dest`` that is
    checked with ``integrity_check``, made a single file (no WAL) and renamed into place."""
    t0 = time.perf_counter()
    src_path = state_dir / DB_FILE
    if not src_path.exists() or not src_path.stat().st_size:
        raise StateDamaged(f"state dir {state_dir} has no database to back up ({src_path} is missing or empty)", state_dir=str(state_dir))
    if dest.is_dir():
        dest = dest / f"llmos-{time.strftime('%Y%m%d-%H%M%S')}.db"
    if dest.resolve() == src_path.resolve():
        raise LlmosError(f"the backup would overwrite the database itself ({src_path}); give another path")
    if not dest.parent.is_dir():
        raise LlmosError(f"cannot write the backup to {dest}: {dest.parent} is not a directory")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    steps = 0

    def progress(status: int, remaining: int, total: int) -> None:
        nonlocal steps
        steps += 1

    try:
        src = _connect_ro(src_path)
        try:
            # One read transaction over every step: the kernel's commits do not restart the copy.
            src.execute("BEGIN")
            src.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            out = sqlite3.connect(str(tmp), isolation_level=None)
            try:
                src.backup(out, pages=pages, progress=progress, sleep=0.01)
                out.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
                rows = [str(r[0]) for r in out.execute("PRAGMA integrity_check(5)")]
                if rows != ["ok"]:
                    raise StateDamaged(f"the backup of {src_path} does not pass integrity_check ({'; '.join(rows)}); "
                                       f"run `llmos state check --state-dir {state_dir}`", state_dir=str(state_dir))
                jobs = int(out.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
                events = int(out.execute("SELECT COALESCE(SUM(n), 0) FROM journal").fetchone()[0])
            finally:
                out.close()
            src.execute("COMMIT")
        finally:
            src.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except sqlite3.DatabaseError as exc:
        raise StateDamaged(f"cannot back up {src_path}: {_first_line(exc)}; run `llmos state check --state-dir {state_dir}`",
                           state_dir=str(state_dir)) from None
    except OSError as exc:
        raise LlmosError(f"cannot write the backup to {dest}: {exc.strerror or exc}") from None
    finally:
        for leftover in (tmp, Path(str(tmp) + "-journal")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    return BackupReport(path=str(dest), size=dest.stat().st_size, jobs=jobs, events=events, seconds=time.perf_counter() - t0, steps=steps)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# llmos state repair


@dataclass
class RepairReport:
    """What ``llmos state repair`` recovered, and where the damaged file went."""

    path: str
    kept: str | None  # the damaged database, kept aside (None: there was no file)
    tables: dict[str, dict[str, Any]]  # name -> {"rows": read, "gaps": [...], "error": ...}
    jobs: int
    jobs_lost: int
    events: int
    seconds: float
    repaired: bool = True  # False: nothing was wrong, nothing was changed
    found: str = "damaged"  # what check() said before: damaged, empty or missing (then nothing could be salvaged)
    top_id: int = 0  # the highest job id known; new jobs get higher ones

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class KernelRunning(LlmosError):
    """``llmos state repair`` needs the state dir to itself."""

    code = 223


def repair(state_dir: Path) -> RepairReport:
    """Salvage what can be read of the state dir's database into a new file and put it in its
    place; the damaged one is kept aside. Refused while a kernel runs on the state dir. A healthy
    database is left as it is (``repaired`` is False)."""
    t0 = time.perf_counter()
    path = state_dir / DB_FILE
    problem = write_problem(state_dir) or write_problem(path)
    if problem:
        raise unwritable(state_dir, *problem)
    with _exclusive(state_dir):
        found = check(state_dir)
        if found.ok:
            return RepairReport(path=str(path), kept=None, tables={}, jobs=found.jobs, jobs_lost=0, events=found.events,
                                seconds=time.perf_counter() - t0, repaired=False)
        new = state_dir / f"{DB_FILE}.repair-{os.getpid()}"
        for leftover in (new, Path(str(new) + "-journal")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        try:
            tables = _salvage_into(path, new, state_dir)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                new.unlink()
            raise
        kept = _keep_aside(path)
        os.replace(new, path)
        _fsync_dir(state_dir)
    jobs = int(tables.get("jobs", {}).get("rows", 0))
    known = max(found.top_id, _job_folder_max(state_dir))
    events = int(tables.get("journal", {}).get("events", 0))
    report = RepairReport(path=str(path), kept=kept, tables=tables, jobs=jobs, jobs_lost=max(0, known - jobs), events=events,
                          seconds=time.perf_counter() - t0, found=found.state, top_id=known)
    log.info("state_db_repaired", **{k: v for k, v in report.to_dict().items() if k != "tables"})
    return report


@contextlib.contextmanager
def _exclusive(state_dir: Path) -> Iterator[None]:
    """Hold the state dir's kernel lock (no kernel may boot meanwhile); KernelRunning if held."""
    running = holder_pid(state_dir)
    lock = state_dir / "kernel.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise LlmosError(f"cannot use state dir {state_dir}: {lock}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or running or "unknown"
            raise KernelRunning(
                f"a kernel (pid {holder}) is running on state dir {state_dir}: stop it first with `llmos shutdown --state-dir {state_dir}`, "
                f"then run `llmos state repair --state-dir {state_dir}` again (`llmos state backup PATH` works while it runs)",
                state_dir=str(state_dir), pid=holder,
            ) from None
        yield
    finally:
        os.close(fd)


def _keep_aside(path: Path) -> str | None:
    """Rename the damaged database (and its -wal and -shm, which belong with it) aside."""
    if not path.exists():
        return None
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    os.rename(path, aside)
    for suffix in _SIDE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.rename(str(path) + suffix, str(aside) + suffix)
    return str(aside)


_KNOWN_SCHEMAS = (_store.SCHEMA, _artifacts.SCHEMA)


def _schema_of(src: sqlite3.Connection | None) -> list[tuple[str, str, str, str]]:
    """(type, name, table, sql) of what the damaged database declares; the kernel's own schema
    where its ``sqlite_master`` cannot be read."""
    if src is not None:
        try:
            rows = src.execute("SELECT type, name, tbl_name, sql FROM sqlite_master WHERE sql IS NOT NULL").fetchall()
            return [(str(t), str(n), str(tb), str(s)) for t, n, tb, s in rows if not str(n).startswith("sqlite_")]
        except sqlite3.DatabaseError as exc:
            log.info("state_db_schema_unreadable", error=_first_line(exc))
    scratch = sqlite3.connect(":memory:")
    try:
        for script in _KNOWN_SCHEMAS:
            scratch.executescript(script)
        rows = scratch.execute("SELECT type, name, tbl_name, sql FROM sqlite_master WHERE sql IS NOT NULL").fetchall()
    finally:
        scratch.close()
    return [(str(t), str(n), str(tb), str(s)) for t, n, tb, s in rows if not str(n).startswith("sqlite_")]


def _salvage_into(path: Path, new: Path, state_dir: Path) -> dict[str, dict[str, Any]]:
    """Copy every table of ``path`` that can be read, row by row, into the new file ``new``;
    then its indexes, the jobs' id counter and the journal's span. Returns what was read."""
    src: sqlite3.Connection | None = None
    if path.exists() and path.stat().st_size:
        try:
            src = _connect_ro(path, tolerant=True)
        except sqlite3.DatabaseError as exc:
            log.info("state_db_unreadable", path=str(path), error=_first_line(exc))
    out = sqlite3.connect(str(new), isolation_level=None)
    tables: dict[str, dict[str, Any]] = {}
    try:
        schema = _schema_of(src)
        out.execute("BEGIN")
        for kind, _name, _table, sql in schema:
            if kind == "table":
                out.execute(sql)
        for kind, name, _table, sql in schema:
            if kind == "table":
                tables[name] = _copy_table(src, out, name, sql)
        top = max(_sequence(src, "jobs") if src is not None else 0, _job_folder_max(state_dir))
        if top and "jobs" in tables:
            # New jobs must not take the ids of lost ones: their folders are still in jobs/.
            have = out.execute("SELECT seq FROM sqlite_sequence WHERE name='jobs'").fetchone()
            if have is None:
                out.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('jobs', ?)", (top,))
            elif int(have[0]) < top:
                out.execute("UPDATE sqlite_sequence SET seq=? WHERE name='jobs'", (top,))
        if "journal" in tables:
            row = out.execute("SELECT COALESCE(SUM(n), 0), COALESCE(MAX(last_seq - first_seq), 0) FROM journal").fetchone()
            tables["journal"]["events"] = int(row[0])
            if "meta" in tables:
                out.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('journal_max_span', ?)", (str(int(row[1])),))
        for kind, name, _table, sql in schema:
            if kind != "table":
                try:
                    out.execute(sql)
                except sqlite3.DatabaseError as exc:  # a unique index that salvaged rows now break
                    log.info("state_db_index_skipped", name=name, error=_first_line(exc))
        out.execute("COMMIT")
        for script in _KNOWN_SCHEMAS:  # what the kernel expects, where the damaged file lacked it
            out.executescript(script)
        rows = [str(r[0]) for r in out.execute("PRAGMA integrity_check(5)")]
        if rows != ["ok"]:
            raise StateDamaged(f"the repaired copy of {path} does not pass integrity_check ({'; '.join(rows)})", state_dir=str(state_dir))
    finally:
        out.close()
        if src is not None:
            src.close()
    return tables


def _q(name: str) -> str:
    """An SQL identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


def _copy_table(src: sqlite3.Connection | None, out: sqlite3.Connection, name: str, sql: str) -> dict[str, Any]:
    """Copy the rows of ``name`` that can be read, keeping their rowids."""
    if src is None:
        return {"rows": 0, "gaps": [], "error": "the database could not be opened"}
    info = out.execute(f"PRAGMA table_info({_q(name)})").fetchall()
    columns = [str(c[1]) for c in info]
    if "WITHOUT ROWID" in sql.upper():
        return _copy_without_rowid(src, out, name, columns)
    keys = [c for c in info if c[5]]
    alias = str(keys[0][1]) if len(keys) == 1 and str(keys[0][2]).upper() == "INTEGER" else None  # the rowid under its own name
    copied = [c for c in columns if c != alias]
    names = ", ".join(["rowid", *map(_q, copied)])
    insert = f"INSERT OR IGNORE INTO {_q(name)} ({names}) VALUES ({', '.join('?' * (len(copied) + 1))})"
    reader = Salvage(src, name, ", ".join(map(_q, copied)) or "NULL")
    batch: list[tuple[Any, ...]] = []
    torn = 0
    try:
        for row in reader:
            if copied and not _whole(name, copied, row[1:]):
                torn += 1
                continue
            batch.append(row if copied else row[:1])
            if len(batch) >= 500:
                out.executemany(insert, batch)
                batch = []
    except sqlite3.DatabaseError as exc:  # not even a seek works (say, the table is not there)
        return {"rows": reader.read - torn, "torn": torn, "gaps": [asdict(g) for g in reader.gaps], "error": _first_line(exc)}
    finally:
        if batch:
            out.executemany(insert, batch)
    return {"rows": reader.read - torn, "torn": torn, "gaps": [asdict(g) for g in reader.gaps], "error": None}


#: The columns the kernel keeps JSON in, by table: a salvaged row must parse there.
_JSON_COLUMNS = {"jobs": _store._JSON_COLUMNS, "artifacts": ("provenance", "rejected"), "pipelines": ("spec",), "pipeline_stages": ("result",)}


def _whole(table: str, columns: list[str], values: tuple[Any, ...]) -> bool:
    """Whether a salvaged row reads whole. SQLite reads the pages of a cut file that lie past its
    end as zeros, so a value whose overflow pages were there comes back with its tail zeroed:
    text with NUL characters (the kernel writes none), JSON that does not parse, journal items
    that do not decode. Such a row is left out (counted as ``torn``) rather than handed to the
    kernel, whose reads of it would fail."""
    row = dict(zip(columns, values))
    for value in values:
        if isinstance(value, str) and "\x00" in value:
            return False
    for column in _JSON_COLUMNS.get(table, ()):
        value = row.get(column)
        if value is not None:
            try:
                json.loads(value)
            except (TypeError, ValueError):
                return False
    if table == "journal":
        return _journal_row_whole(row)
    return True


def _journal_row_whole(row: dict[str, Any]) -> bool:
    """Whether a journal batch's ends fit its items and every item decodes (read as the store
    reads it, :func:`llmos.kernel.store._split`)."""
    items, ends, n = row.get("items"), row.get("ends"), row.get("n")
    if not isinstance(items, bytes) or not isinstance(ends, bytes) or not isinstance(n, int) or len(ends) != 4 * n:
        return False
    total = 0
    for item in _store._split(items, ends):
        try:
            msgpack.unpackb(item, raw=False)
        except Exception:  # any way an item fails to decode (an empty slice of ends out of order too)
            return False
        total += len(item)
    return total == len(items)


def _copy_without_rowid(src: sqlite3.Connection, out: sqlite3.Connection, name: str, columns: list[str]) -> dict[str, Any]:
    rows = 0
    insert = f"INSERT OR IGNORE INTO {_q(name)} VALUES ({', '.join('?' * len(columns))})"
    try:
        for row in src.execute(f"SELECT {', '.join(map(_q, columns))} FROM {_q(name)}"):
            out.execute(insert, row)
            rows += 1
    except sqlite3.DatabaseError as exc:
        return {"rows": rows, "gaps": [], "error": _first_line(exc)}
    return {"rows": rows, "gaps": [], "error": None}


def describe_gaps(gaps: list[dict[str, Any]]) -> str:
    """``ids 4,001-4,800, after 9,000`` for a table's gaps."""
    parts = []
    for g in gaps[:4]:
        after, before = g.get("after"), g.get("before")
        if after is None and before is None:
            parts.append("every row")
        elif after is None:
            parts.append(f"below {before:,}")
        elif before is None:
            parts.append(f"after {after:,}")
        else:
            parts.append(f"{after + 1:,}-{before - 1:,}")
    if len(gaps) > 4:
        parts.append(f"{len(gaps) - 4} more")
    return ", ".join(parts)

