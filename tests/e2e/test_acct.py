"""Accounting: every finished job's wall and CPU time, peak memory, reserved GPU use and tokens."""

from __future__ import annotations

import time

from tests.conftest import KernelHandle


def test_acct_rows_for_finished_jobs(kernel: KernelHandle) -> None:
    t0 = time.time()
    with kernel.client() as c:
        sleep = c.submit("diag.sleep", params={"seconds": 0.5}, resources={"gpus": 0.5})
        crash = c.submit("diag.crash")
        retried = c.submit("diag.fail", max_retries=1)
        running = c.submit("diag.sleep", params={"seconds": 30})
        for job in (sleep, crash, retried):
            job.wait(timeout=60)
        deadline = time.monotonic() + 10
        while True:  # usage lands when the workers have been reaped
            rows = {r["id"]: r for r in c.acct(since=t0)}
            if all(j.id in rows and rows[j.id]["cpu_seconds"] is not None for j in (sleep, crash, retried)):
                break
            assert time.monotonic() < deadline, rows
            time.sleep(0.05)
        assert running.id not in rows  # only finished jobs
        s = rows[sleep.id]
        assert s["kind"] == "diag.sleep" and s["plugin"] == "diag" and s["state"] == "succeeded"
        assert 0.5 <= s["wall_seconds"] < 5 and s["cpu_seconds"] >= 0 and s["max_rss"] > 1 << 20
        assert s["gpu_seconds"] >= 0.25 and s["gpu_memory"] == 12 * 1024**3
        assert rows[crash.id]["state"] == "failed" and rows[crash.id]["gpu_seconds"] is None
        assert rows[retried.id]["attempts"] == 2
        running.cancel()
    text = kernel.cli("acct", "--since", "1h").stdout
    assert "diag.sleep" in text and "PEAK RSS" in text
    as_json = kernel.cli_json("acct", "--since", str(t0))
    assert {r["id"] for r in as_json} >= {sleep.id, crash.id, retried.id}
    proc = kernel.cli("acct", "--since", "yesterday-ish", check=False)
    assert proc.returncode == 2 and "expected a duration" in proc.stderr


def test_since_a_small_bare_number_is_refused_not_read_as_1970(kernel: KernelHandle) -> None:
    out = kernel.cli("acct", "--since", "5", check=False)
    assert out.returncode == 2 and "is in 1970" in out.stderr and "5h" in out.stderr
    assert kernel.cli("acct", "--since", "5m").returncode == 0
