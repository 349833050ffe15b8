"""A full disk under the state dir: the kernel stays up, says so, loses no committed event, and
goes on by itself once there is room again. The state dir lives on a small tmpfs (skipped with a
reason where this process cannot mount one)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import llmos
from llmos.errors import StorageFull
from tests.conftest import KernelHandle


def _mount_tmpfs(where: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` at ``where``; None, or why it could not be."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"mount is not available: {exc}"
    return None if proc.returncode == 0 else f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}"


@pytest.fixture
def small_disk(short_tmp: Path) -> Iterator[Path]:
    where = short_tmp / "disk"
    why = _mount_tmpfs(where, "3m")
    if why:
        pytest.skip(why)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


def _fill(disk: Path, leave: int = 0) -> Path:
    """Write a filler file until the disk is full (less ``leave`` bytes)."""
    filler = disk / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb") as f:
        try:
            while True:
                free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
                if free <= leave:
                    break
                f.write(chunk[: max(4096, min(len(chunk), free - leave))])
                f.flush()
        except OSError:
            pass
    return filler


def _wait(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _stream_seqs(c: llmos.Client, job_id: int) -> list[int]:
    return [e.stream_seq for e in c.job(job_id).events(follow=False)]


def test_a_flood_on_a_full_disk_fails_its_job_and_the_kernel_goes_on(small_disk: Path) -> None:
    kernel = KernelHandle(small_disk / "state").boot()
    ballast = small_disk / "ballast"  # what the operator deletes to make room
    ballast.write_bytes(b"\0" * (1 << 20))
    try:
        with kernel.client() as c:
            assert c.status()["storage"]["state"] in ("ok", "low")
            job = c.submit("diag.emit", {"count": 50_000, "payload": 200})  # 15 MB of events for a 3 MiB disk
            info = job.wait(timeout=60)
            assert info.state == "failed"
            assert "its events could not be stored: state dir" in info.reason and "is full" in info.reason and "bytes free" in info.reason
            status = c.status()  # the kernel answers
            assert status["storage"]["path"] == str(small_disk / "state") and status["storage"]["total"] > 0
            assert status["storage"]["state"] == "full"
            ballast.unlink()
            _wait(lambda: c.status()["storage"]["state"] != "full", "the storage to leave full once there is room")
            # The storage events were journaled, and what the job said before the refusal is all there.
            states = [e.body["state"] for e in c.events("kernel.storage", follow=False)]
            assert states[0] == "full" and states[-1] in ("ok", "low")
            seqs = _stream_seqs(c, job.id)
            assert seqs == list(range(1, len(seqs) + 1)), "a gap in the job's stream: a committed event was lost"
            assert c.job(job.id).info().state == "failed" and any(j.id == job.id and j.state == "failed" for j in c.jobs())
            assert c.submit("diag.echo", {"message": "after"}).wait(timeout=30).result["message"] == "after"
    finally:
        kernel.shutdown()


def test_a_full_disk_refuses_submits_until_space_is_freed(small_disk: Path) -> None:
    kernel = KernelHandle(small_disk / "state").boot()
    try:
        with kernel.client() as c:
            filler = _fill(small_disk)
            job = c.submit("diag.emit", {"count": 20_000, "payload": 100})
            _wait(lambda: c.status()["storage"]["state"] == "full", "the kernel to see the full disk")
            with pytest.raises(StorageFull, match=r"state dir .* is full: [\d,]+ bytes free"):
                c.submit("diag.echo")
            result = kernel.cli("status", check=False)
            assert "FULL" in result.stdout
            _wait(lambda: job.info().state == "failed", "the flooding job to fail")
            filler.unlink()  # room again: the kernel goes on by itself
            _wait(lambda: c.status()["storage"]["state"] in ("ok", "low"), "the storage to recover")
            assert c.submit("diag.echo", {"message": "back"}).wait(timeout=30).result["message"] == "back"
            states = [e.body["state"] for e in c.events("kernel.storage", follow=False)]
            assert "full" in states and states[-1] in ("ok", "low")
    finally:
        kernel.shutdown()
