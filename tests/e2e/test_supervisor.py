"""The supervisor and scheduler under stress: dead, silent and starving workers and jobs."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import llmos
from tests.conftest import KernelHandle


@pytest.fixture
def quick_kernel(short_tmp: Path):
    config = short_tmp / "quick.toml"
    config.write_text(
        "[workers]\nheartbeat_timeout = 1.0\ncancel_grace = 0.5\nkill_grace = 1.0\n"
        "[scheduler]\naging_seconds = 0.5\n"
    )
    handle = KernelHandle(short_tmp / "state", "--config", str(config), "--fake-gpus", "1x8GiB").boot()
    try:
        yield handle
    finally:
        handle.shutdown()


def test_dead_worker_is_noticed_within_a_second(quick_kernel: KernelHandle) -> None:
    with quick_kernel.client() as c:
        job = c.submit("diag.crash", params={"delay": 0.3})
        info = job.wait(timeout=30)
        events = {e.body["state"]: e.ts for e in job.events(follow=False) if e.type == "job.state"}
        assert info.state == "failed" and info.exit_code == -9
        assert events["failed"] - events["running"] < 0.3 + 1.0


def test_silent_worker_is_killed_and_its_job_fails(quick_kernel: KernelHandle) -> None:
    with quick_kernel.client() as c:
        job = c.submit("diag.sleep", params={"seconds": 60}, resources={"gpus": 1})
        pid = _worker_pid(c, job)
        os.kill(pid, signal.SIGSTOP)  # alive but silent: no heartbeats
        info = job.wait(timeout=30)
        assert info.state == "failed"
        assert info.reason.startswith("worker lost its heartbeat")
        assert all(job.id not in d["jobs"] for d in c.devices())


def test_runner_that_ignores_cancel_is_terminated(quick_kernel: KernelHandle, short_tmp: Path) -> None:
    with quick_kernel.client() as c:
        job = c.submit("diag.sleep", params={"seconds": 60})
        pid = _worker_pid(c, job)
        # Stop the worker's bus thread from seeing the cancel: freeze, cancel, thaw after the grace.
        os.kill(pid, signal.SIGSTOP)
        job.cancel()
        time.sleep(0.8)
        os.kill(pid, signal.SIGCONT)
        info = job.wait(timeout=30)
        assert info.state == "cancelled"


def test_a_worker_deaf_to_sigterm_is_killed(quick_kernel: KernelHandle) -> None:
    """Cancel asks, then SIGTERM, then SIGKILL: a stopped worker takes neither the ask nor SIGTERM."""
    with quick_kernel.client() as c:
        job = c.submit("diag.sleep", params={"seconds": 60})
        pid = _worker_pid(c, job)
        os.kill(pid, signal.SIGSTOP)  # SIGTERM stays pending on a stopped process; SIGKILL does not
        t0 = time.monotonic()
        job.cancel()
        info = job.wait(timeout=30)
        assert info.state == "cancelled" and info.exit_code == -9 and "SIGKILL" in info.reason, info
        assert time.monotonic() - t0 < 0.5 + 1.0 + 2.0  # cancel_grace + kill_grace, plus reaping


def test_aging_lets_an_old_low_priority_job_go_first(quick_kernel: KernelHandle) -> None:
    with quick_kernel.client() as c:
        blocker = c.submit("diag.sleep", params={"seconds": 1.5}, resources={"gpus": 1})
        old_low = c.submit("diag.echo", resources={"gpus": 1}, priority=0)
        time.sleep(1.2)
        new_high = c.submit("diag.echo", resources={"gpus": 1}, priority=1)
        # At the blocker's end the low one has waited ~1.5 s (+3 with aging 0.5 s) and beats priority 1.
        low, high = old_low.wait(timeout=30), new_high.wait(timeout=30)
        blocker.wait(timeout=30)
        assert low.started_at < high.started_at


def test_sdk_without_kernel_names_state_dir_and_command(tmp_path: Path) -> None:
    with pytest.raises(llmos.KernelUnavailable) as err:
        llmos.connect(tmp_path / "nothing-here")
    assert str(tmp_path / "nothing-here") in str(err.value)
    assert "llmos boot --state-dir" in str(err.value)


def _worker_pid(c: llmos.Client, job: llmos.Job) -> int:
    deadline = time.monotonic() + 15
    while True:
        events = [e for e in job.events(follow=False) if e.type == "job.log" and e.body["event"] == "sleeping"]
        if events:
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    pid = job.info().worker_pid
    assert pid
    return pid
