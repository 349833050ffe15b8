"""``llmos.connect(embedded=True)``: a kernel tied to the caller's lifetime."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import llmos


def _gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower():
            return True
        time.sleep(0.05)
    return False


def test_an_embedded_kernel_runs_jobs_and_stops_with_its_client() -> None:
    client = llmos.connect(embedded=True)
    state, pid = client.state_dir, int(client.kernel["pid"])
    assert client.submit("diag.echo", {"message": "hi"}).result(30)["message"] == "hi"
    client.close()
    assert _gone(pid) and not state.exists()  # a temporary state dir goes with it


def test_an_embedded_kernel_in_a_given_state_dir_keeps_it(tmp_path: Path) -> None:
    state = tmp_path / "s"
    with llmos.connect(state, embedded=True) as client:
        job = client.submit("diag.echo", {"message": "kept"})
        job.wait(30)
        pid = int(client.kernel["pid"])
    assert _gone(pid) and (state / "llmos.db").exists()
    with llmos.connect(state, embedded=True) as again:
        assert again.job(job.id).result(5)["message"] == "kept"


def test_the_embedded_kernel_ends_when_its_caller_exits_or_is_killed(tmp_path: Path) -> None:
    start = "import llmos; c = llmos.connect(embedded=True); print(c.kernel['pid'], flush=True)"
    for how, code in (("exit", start), ("kill", start + "; import time; time.sleep(60)")):
        with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=tmp_path) as proc:
            assert proc.stdout is not None
            pid = int(proc.stdout.readline())
            if how == "kill":
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        assert _gone(pid), f"the embedded kernel outlived its caller ({how})"
