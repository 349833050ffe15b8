"""State survives the kernel: history stays, pending jobs run, running ones end as "kernel restarted"."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import KernelHandle, cli


@pytest.mark.slow
def test_restart_keeps_history_and_runs_pending(state_dir: Path) -> None:
    handle = KernelHandle(state_dir, "--fake-gpus", "1x24GiB").boot()
    try:
        with handle.client() as c:
            done = c.submit("diag.emit", params={"count": 5})
            assert done.wait(timeout=30).state == "succeeded"
            before = [e.seq for e in done.events(follow=False)]
            running = c.submit("diag.sleep", params={"seconds": 60}, resources={"gpus": 1})
            retried = c.submit("diag.sleep", params={"seconds": 60}, resources={"gpus": 1}, max_retries=1)
            waiting = c.submit("diag.echo", params={"message": "after restart"}, resources={"gpus": 1})
            _wait(lambda: running.info().state == "running")
            assert waiting.info().state == "pending"
        handle.kill()  # a crash: no clean shutdown
        handle.boot()
        with handle.client() as c:
            assert [e.seq for e in c.job(done.id).events(follow=False)] == before
            assert c.job(done.id).info().result == {"count": 5}
            r = c.job(running.id).wait(timeout=30)
            assert (r.state, r.reason) == ("failed", "kernel restarted")
            # The two that were pending are queued again, in order: the first takes the GPU.
            r = c.job(retried.id)
            deadline = time.monotonic() + 15
            while r.info().state != "running":
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert c.job(waiting.id).info().state == "pending"
            r.cancel()
            assert c.job(waiting.id).result(timeout=60) == {"data": None, "message": "after restart"}
    finally:
        handle.shutdown()


@pytest.mark.slow
def test_restart_requeues_running_job_with_retries(state_dir: Path) -> None:
    handle = KernelHandle(state_dir).boot()
    try:
        with handle.client() as c:
            job = c.submit("diag.sleep", params={"seconds": 1.0}, max_retries=1)
            _wait(lambda: job.info().state == "running")
        handle.shutdown()  # a clean stop also ends running jobs
        handle.boot()
        with handle.client() as c:
            info = c.job(job.id).wait(timeout=30)
            assert info.state == "succeeded" and info.attempts == 2
            states = [(e.body["state"], e.body["reason"]) for e in c.job(job.id).events(follow=False) if e.type == "job.state"]
            assert ("pending", "kernel restarted; retrying") in states
    finally:
        handle.shutdown()


def test_second_kernel_is_refused_and_names_pid(fresh_kernel: KernelHandle) -> None:
    proc = cli("boot", state_dir=fresh_kernel.state_dir, check=False, timeout=30)
    assert proc.returncode == 1
    assert f"pid {fresh_kernel.pid}" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("boot", "--detach", state_dir=fresh_kernel.state_dir, check=False, timeout=30)
    assert proc.returncode == 1 and f"pid {fresh_kernel.pid}" in proc.stderr


def test_kernel_file_and_private_socket_dir(fresh_kernel: KernelHandle) -> None:
    info = json.loads((fresh_kernel.state_dir / "kernel.json").read_text())
    assert info["pid"] == fresh_kernel.pid and info["version"]
    for key in ("control", "events"):
        assert info[key].startswith("ipc://")
    sock_dir = Path(info["control"][len("ipc://"):]).parent
    assert sock_dir.stat().st_mode & 0o777 == 0o700
    assert (fresh_kernel.state_dir / "kernel.log").read_text().count("kernel_ready") == 1


def test_shutdown_and_no_kernel_error(state_dir: Path) -> None:
    handle = KernelHandle(state_dir).boot()
    proc = cli("shutdown", state_dir=state_dir)
    assert "stopped" in proc.stdout
    handle.pid = None
    assert not (state_dir / "kernel.json").exists()
    proc = cli("status", state_dir=state_dir, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"Error: no kernel is running for state dir {state_dir} (start one with: llmos boot --state-dir {state_dir})"


def test_foreground_boot_stops_cleanly_on_sigterm(state_dir: Path) -> None:
    import subprocess
    import sys

    with subprocess.Popen([sys.executable, "-m", "llmos.kernel.cli", "boot", "--state-dir", str(state_dir)], stdout=subprocess.PIPE, text=True) as proc:
        try:
            line = proc.stdout.readline()
            assert "ready" in line
            proc.terminate()
            assert proc.wait(15) == 0
            assert not (state_dir / "kernel.json").exists()
            assert "kernel_stopped" in (state_dir / "kernel.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()


def _wait(cond, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.02)
