"""Damaged state: a truncated, empty or missing database beside history is refused at boot in one
line; a read-only filesystem and a permission problem are told apart; ``llmos state check``,
``backup`` (while the kernel runs jobs) and ``repair`` (then boot shows the recovered jobs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LLMOS, KernelHandle, cli

JOBS = 40


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dir a kernel ran JOBS diag.emit jobs in (their rows and events interleave in the
    file), stopped cleanly: copy it before changing it."""
    root = tmp_path_factory.mktemp("history") / "state"
    handle = KernelHandle(root).boot()
    try:
        with handle.client() as c:
            jobs = [c.submit("diag.emit", params={"count": 40}) for _ in range(JOBS)]
            assert all(j.wait(timeout=60).state == "succeeded" for j in jobs)
    finally:
        handle.shutdown()
    return root


@pytest.fixture
def copy(history: Path, tmp_path: Path) -> Path:
    target = tmp_path / "state"
    shutil.copytree(history, target)
    return target


def _truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _refused(state: Path, *extra: str, detach: bool = False, prefix: tuple[str, ...] = ()) -> str:
    """Boot on ``state`` (in the foreground unless ``detach``): it must fail with one line on
    stderr and no traceback; returns that line."""
    argv = [*prefix, *LLMOS, "boot", "--state-dir", str(state), *(["--detach"] if detach else []), *extra]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=dict(os.environ, LLMOS_MONITOR_AUTOSTART="0"))
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("Error: "), proc.stderr
    return proc.stderr.strip()


@pytest.mark.parametrize("detach", [False, True])
def test_a_truncated_database_is_refused_in_one_line(copy: Path, detach: bool) -> None:
    _truncate_half(copy / "llmos.db")
    line = _refused(copy, detach=detach)
    assert f"state dir {copy}: {copy / 'llmos.db'} is damaged (truncated: " in line, line
    assert f"`llmos state check --state-dir {copy}`" in line and f"`llmos state repair --state-dir {copy}`" in line, line


@pytest.mark.parametrize("how", ["empty", "missing"])
def test_an_empty_or_missing_database_beside_history_is_refused(copy: Path, how: str) -> None:
    db = copy / "llmos.db"
    if how == "empty":
        db.write_bytes(b"")
    else:
        db.unlink()
    line = _refused(copy)
    said = "is empty (0 bytes)" if how == "empty" else "is missing"
    assert f"{db} {said} but the state dir has history ({JOBS} job folders in jobs/" in line, line
    assert "restore llmos.db from a backup" in line and f"llmos state repair --state-dir {copy}" in line, line
    proc = cli("state", "check", state_dir=copy, check=False)
    assert proc.returncode == 1 and how.upper() in proc.stdout, proc.stdout
    # Repair makes an empty store; the history stays, and new jobs do not take its ids.
    repaired = json.loads(cli("state", "repair", "--json", state_dir=copy).stdout)
    assert repaired["found"] == how and repaired["top_id"] == JOBS
    handle = KernelHandle(copy).boot()
    try:
        with handle.client() as c:
            assert c.jobs() == []
            assert c.submit("diag.echo", params={"message": "after"}).id == JOBS + 1
    finally:
        handle.shutdown()


def test_a_fresh_state_dir_boots_and_checks_clean(tmp_path: Path) -> None:
    state = tmp_path / "fresh"
    assert json.loads(cli("state", "check", "--json", state_dir=state).stdout)["state"] == "fresh"
    handle = KernelHandle(state).boot()
    try:
        report = json.loads(handle.cli("state", "check", "--json").stdout)  # beside the running kernel
        assert report["state"] == "ok" and report["ok"]
    finally:
        handle.shutdown()


def test_check_and_repair_a_truncated_database_then_boot_shows_the_jobs(copy: Path, history: Path) -> None:
    whole = json.loads(cli("state", "check", "--json", state_dir=copy).stdout)
    assert (whole["state"], whole["jobs"]) == ("ok", JOBS)
    _truncate_half(copy / "llmos.db")
    proc = cli("state", "check", state_dir=copy, check=False)
    assert proc.returncode == 1 and "DAMAGED" in proc.stdout and "llmos state repair" in proc.stderr, proc.stdout + proc.stderr
    damaged = json.loads(cli("state", "check", "--json", state_dir=copy, check=False).stdout)
    assert damaged["state"] == "damaged" and damaged["top_id"] == JOBS
    report = json.loads(cli("state", "repair", "--json", state_dir=copy).stdout)
    # What can be read is back (where the file was cut depends on where SQLite put the pages).
    assert report["repaired"] and 0 < report["jobs"] <= JOBS and report["jobs"] + report["jobs_lost"] == JOBS, report
    assert 0 < report["events"] < whole["events"], report
    kept = Path(report["kept"])
    assert kept.name.startswith("llmos.db.damaged-") and kept.stat().st_size == (history / "llmos.db").stat().st_size // 2
    assert json.loads(cli("state", "check", "--json", state_dir=copy).stdout)["state"] == "ok"
    handle = KernelHandle(copy).boot()
    try:
        with handle.client() as c:
            jobs = c.jobs()
            assert len(jobs) == report["jobs"] and all(j.state == "succeeded" and j.result == {"count": 40} for j in jobs)
            streams = [list(c.job(j.id).events(follow=False)) for j in jobs[:5]]
            assert any(s and s[-1].type == "job.state" and s[-1].body["state"] == "succeeded" for s in streams)
            assert c.submit("diag.echo", params={"message": "after"}).id == JOBS + 1  # not the id of a lost job
        proc = handle.cli("state", "repair", check=False)  # never beside a running kernel
        assert proc.returncode == 1 and f"llmos shutdown --state-dir {copy}" in proc.stderr, proc.stderr
    finally:
        handle.shutdown()


def test_repair_leaves_out_rows_read_torn_and_the_kernel_lists_the_rest(copy: Path) -> None:
    """A cut file can give back a row whose value ran onto pages past its end, read as zeros:
    such rows (a job's JSON, a journal batch) are left out of the repaired copy, not handed to
    the kernel, whose listing of jobs failed on one ("internal error: JSONDecodeError")."""
    import sqlite3

    db = sqlite3.connect(copy / "llmos.db", isolation_level=None)
    try:
        params = db.execute("SELECT params FROM jobs WHERE id=1").fetchone()[0]
        db.execute("UPDATE jobs SET params=? WHERE id=1", (params[:2] + "\x00" * (len(params) - 2),))
        first, items = db.execute("SELECT first_seq, items FROM journal ORDER BY first_seq LIMIT 1").fetchone()
        db.execute("UPDATE journal SET items=? WHERE first_seq=?", (items[: len(items) // 2] + bytes(len(items) - len(items) // 2), first))
    finally:
        db.close()
    with open(copy / "llmos.db", "r+b") as f:  # damaged as check sees it: its last page cut off
        f.truncate(os.path.getsize(copy / "llmos.db") - 4096)
    report = json.loads(cli("state", "repair", "--json", state_dir=copy).stdout)
    assert report["tables"]["jobs"]["torn"] == 1 and report["tables"]["journal"]["torn"] == 1, report["tables"]
    assert report["jobs"] + report["jobs_lost"] == JOBS, report
    table = cli("state", "repair", state_dir=copy).stdout  # sound now: nothing more to do
    assert "nothing to repair" in table
    handle = KernelHandle(copy).boot()
    try:
        with handle.client() as c:
            jobs = c.jobs()
            ids = {j.id for j in jobs}
            assert 1 not in ids and len(jobs) == report["jobs"] and all(j.result == {"count": 40} for j in jobs)
            assert all(e.type for e in c.events("job."))  # every journal item decodes
    finally:
        handle.shutdown()


def test_backup_while_the_kernel_runs_jobs(fresh_kernel: KernelHandle, tmp_path: Path) -> None:
    with fresh_kernel.client() as c:
        before = [c.submit("diag.emit", params={"count": 50}) for _ in range(10)]
        stop = threading.Event()

        def load() -> None:
            with fresh_kernel.client() as c2:
                while not stop.is_set():
                    c2.submit("diag.emit", params={"count": 200})

        loader = threading.Thread(target=load)
        loader.start()
        try:
            for job in before:
                job.wait(timeout=60)
            target = tmp_path / "backups" / "llmos.db"
            target.parent.mkdir()
            copies = [json.loads(fresh_kernel.cli("state", "backup", str(target), "--json").stdout) for _ in range(2)]
        finally:
            stop.set()
            loader.join(timeout=30)
        assert c.status()["pid"] == fresh_kernel.pid  # the kernel went on
    assert copies[-1]["path"] == str(target) and copies[-1]["size"] == target.stat().st_size
    assert not [p for p in target.parent.iterdir() if p != target]  # no temporary file left, no -wal
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(target, restored / "llmos.db")
    report = json.loads(cli("state", "check", "--json", state_dir=restored).stdout)
    assert report["state"] == "ok" and report["jobs"] >= len(before) and report["events"] > 50 * len(before), report
    handle = KernelHandle(restored).boot()
    try:
        with handle.client() as c:
            done = {j.id: j for j in c.jobs(state="succeeded")}
            assert all(done[j.id].result == {"count": 50} for j in before)
    finally:
        handle.shutdown()


def _mount_tmpfs(where: Path) -> str | None:
    where.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"mount is not available: {exc}"
    return None if proc.returncode == 0 else f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}"


@pytest.fixture
def read_only_copy(history: Path, tmp_path: Path) -> Iterator[Path]:
    """A copy of ``history`` on a tmpfs remounted read-only (skipped where mounting is not allowed)."""
    where = tmp_path / "ro"
    why = _mount_tmpfs(where)
    if why:
        pytest.skip(why)
    try:
        shutil.copytree(history, where / "state")
        proc = subprocess.run(["mount", "-o", "remount,ro", str(where)], capture_output=True, text=True, timeout=10)
        if proc.returncode != 0:
            pytest.skip(f"cannot remount a tmpfs read-only here: {proc.stderr.strip()}")
        yield where / "state"
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


def test_a_read_only_filesystem_is_named_as_such(read_only_copy: Path) -> None:
    for detach in (False, True):
        line = _refused(read_only_copy, detach=detach)
        assert f"cannot use state dir {read_only_copy}: {read_only_copy} is on a read-only filesystem (mounted read-only at " in line, line
        assert "remount it read-write" in line and "Permission denied" not in line, line
    line = _refused(read_only_copy / "new")
    assert "would be on a read-only filesystem" in line, line
    # Reading still works there: check, and a backup to somewhere writable.
    assert json.loads(cli("state", "check", "--json", state_dir=read_only_copy).stdout)["jobs"] == JOBS


def _unprivileged() -> tuple[str, ...]:
    """A command prefix under which file permissions apply to this process (root drops the
    capabilities that override them), or skip."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("root ignores file modes, and setpriv (to drop CAP_DAC_OVERRIDE) is not installed")
    prefix = ("setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search")
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"cannot drop CAP_DAC_OVERRIDE here: {probe.stderr.strip()}")
    return prefix


def test_a_permission_problem_is_named_as_such(copy: Path) -> None:
    prefix = _unprivileged()
    copy.chmod(0o500)
    try:
        line = _refused(copy, prefix=prefix)
    finally:
        copy.chmod(0o700)
    assert f"{copy} is not writable by this user (uid {os.geteuid()}; it belongs to uid " in line and "mode 0500" in line, line
    assert "read-only filesystem" not in line and "chmod" in line, line
    (copy / "llmos.db").chmod(0o444)
    line = _refused(copy, prefix=prefix)
    assert f"{copy / 'llmos.db'} is not writable by this user" in line and "mode 0444" in line, line
