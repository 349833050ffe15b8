"""Memory limits: a job over its ``memory`` reservation fails with the memory reason, under a
cgroup and under the monitor; a job within it is untouched; the node guard stops jobs."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

import llmos
from tests.conftest import KernelHandle

MiB = 1 << 20
EXCEEDED = re.compile(r"^exceeded its memory \([0-9.]+MiB used of 64\.0MiB reserved\)")


def _boot(tmp_path: Path, config: str, *, monitor: bool = False) -> KernelHandle:
    path = tmp_path / "limits.toml"
    path.write_text(config)
    env = {"LLMOS_MONITOR_AUTOSTART": "1"} if monitor else None
    return KernelHandle(tmp_path / "state", "--config", str(path), env=env).boot()


def _enforcement(handle: KernelHandle) -> dict[str, str]:
    """What the kernel said at boot about how it enforces memory (its ``memory_limits`` record)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in (handle.state_dir / "kernel.log").read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "memory_limits":
                return record
        time.sleep(0.05)
    raise AssertionError("the kernel logged no memory_limits record")


def _wait_running(job: llmos.Job, timeout: float = 30) -> llmos.JobInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = job.info()
        if info.state == "running" and info.worker_pid and (info.progress or {}).get("message") == "allocating":
            return info
        assert info.state in ("pending", "running") and time.monotonic() < deadline, info
        time.sleep(0.05)


@pytest.fixture
def cgroup_kernel(tmp_path: Path):
    handle = _boot(tmp_path, "[limits]\ncgroup = 'auto'\nnode_min_free = ''\n")
    try:
        how = _enforcement(handle)
        if not how["enforcement"].startswith("cgroup"):
            pytest.skip(f"no memory cgroup can be created here: {how.get('why')}")
        yield handle, how
    finally:
        handle.shutdown()


def test_cgroup_over_reservation_fails_and_within_succeeds(cgroup_kernel) -> None:
    handle, how = cgroup_kernel
    base = Path(how["groups"])
    with handle.client() as c:
        held = c.submit("diag.alloc", params={"bytes": 8 * MiB, "hold": 30}, resources={"memory": "64MiB"})
        info = _wait_running(held)
        # The job's own code runs in a group of its own, limited to its reservation, and its worker
        # is the OOM killer's choice before the kernel.
        groups = Path(f"/proc/{info.worker_pid}/cgroup").read_text()
        assert f"{base.name}/w" in groups, groups
        leaf = next(p for p in base.iterdir() if p.name.startswith("w"))
        limit_file = leaf / ("memory.max" if (leaf / "memory.max").exists() else "memory.limit_in_bytes")
        assert int(limit_file.read_text()) == 64 * MiB
        kernel_adj = int(Path(f"/proc/{handle.pid}/oom_score_adj").read_text())
        assert int(Path(f"/proc/{info.worker_pid}/oom_score_adj").read_text()) == min(1000, kernel_adj + 500)
        held.cancel()

        over = c.submit("diag.alloc", params={"bytes": 200 * MiB}, resources={"memory": "64MiB"})
        within = c.submit("diag.alloc", params={"bytes": 16 * MiB, "hold": 0.5}, resources={"memory": "256MiB"})
        unlimited = c.submit("diag.alloc", params={"bytes": 100 * MiB})  # no reservation: no limit
        failed = over.wait(timeout=60)
        assert failed.state == "failed" and EXCEEDED.match(failed.reason or ""), failed.reason
        logs = [e.body for e in over.events(follow=False) if e.type == "job.log" and e.body["event"] == "memory_exceeded"]
        assert logs and logs[0]["fields"]["reserved"] == 64 * MiB
        assert within.result(timeout=60) == {"allocated": 16 * MiB, "held": 0.5}
        assert unlimited.result(timeout=60)["allocated"] == 100 * MiB
        assert held.wait(timeout=30).state == "cancelled"
        # Every worker's group goes with its worker.
        deadline = time.monotonic() + 10
        while [p for p in base.iterdir() if p.is_dir() and p.name.startswith("w")]:
            assert time.monotonic() < deadline, list(base.iterdir())
            time.sleep(0.1)
    handle.shutdown()
    assert not base.exists()


def test_monitor_over_reservation_fails_and_within_succeeds(tmp_path: Path) -> None:
    handle = _boot(tmp_path, "[limits]\ncgroup = 'off'\nnode_min_free = ''\n[monitor]\ninterval = 0.2\n", monitor=True)
    try:
        assert _enforcement(handle)["enforcement"] == "monitor"
        with handle.client() as c:
            over = c.submit("diag.alloc", params={"bytes": 200 * MiB, "hold": 60}, resources={"memory": "64MiB"})
            within = c.submit("diag.alloc", params={"bytes": 16 * MiB, "hold": 1.5}, resources={"memory": "1GiB"})
            t0 = time.monotonic()
            failed = over.wait(timeout=60)
            assert failed.state == "failed" and EXCEEDED.match(failed.reason or ""), failed.reason
            assert time.monotonic() - t0 < 30  # a sample or two, not the 60 s it would hold
            assert within.result(timeout=60) == {"allocated": 16 * MiB, "held": 1.5}
            assert [e for e in within.events(follow=False) if e.type == "job.usage"]  # it was measured, and left alone
    finally:
        handle.shutdown()


def test_report_mode_only_warns(tmp_path: Path) -> None:
    handle = _boot(tmp_path, "[limits]\nmemory = 'report'\nnode_min_free = ''\n[monitor]\ninterval = 0.2\n", monitor=True)
    try:
        assert _enforcement(handle)["enforcement"] == "report"
        with handle.client() as c:
            over = c.submit("diag.alloc", params={"bytes": 200 * MiB, "hold": 1.5}, resources={"memory": "64MiB"})
            assert over.result(timeout=60) == {"allocated": 200 * MiB, "held": 1.5}
            warned = [e.body for e in over.events(follow=False) if e.type == "job.log" and e.body["event"] == "memory_over_reservation"]
            assert len(warned) == 1 and warned[0]["level"] == "warning" and warned[0]["fields"]["reserved"] == 64 * MiB
    finally:
        handle.shutdown()


def test_node_guard_stops_lowest_priority_first(tmp_path: Path) -> None:
    # A threshold no machine meets: the guard acts at once, one job at a time.
    handle = _boot(tmp_path, "[limits]\ncgroup = 'off'\nnode_min_free = '100%'\nguard_interval = 0.3\n")
    try:
        with handle.client() as c:
            low = c.submit("diag.sleep", params={"seconds": 60}, priority=-5)
            high = c.submit("diag.sleep", params={"seconds": 60}, priority=5)
            ends = [low.wait(timeout=60), high.wait(timeout=60)]
        for info in ends:
            assert info.state == "failed", info
            assert re.match(r"^stopped to keep the machine from running out of memory: [0-9.]+[KMGT]iB free of [0-9.]+[KMGT]iB$", info.reason or ""), info.reason
        assert ends[0].ended_at is not None and ends[1].ended_at is not None and ends[0].ended_at <= ends[1].ended_at
    finally:
        handle.shutdown()


def test_groups_of_a_killed_kernel_go_at_the_next_boot(tmp_path: Path) -> None:
    handle = _boot(tmp_path, "[limits]\nnode_min_free = ''\n")
    try:
        how = _enforcement(handle)
        if not how["enforcement"].startswith("cgroup"):
            pytest.skip(f"no memory cgroup can be created here: {how.get('why')}")
        base = Path(how["groups"])
        with handle.client() as c:
            _wait_running(c.submit("diag.alloc", params={"bytes": 8 * MiB, "hold": 60}, resources={"memory": "64MiB"}))
        handle.kill()
        assert base.is_dir()
        handle.boot()
        deadline = time.monotonic() + 20
        while base.exists():  # once the dead kernel's orphaned worker has gone too
            assert time.monotonic() < deadline, list(base.iterdir())
            time.sleep(0.1)
    finally:
        handle.shutdown()
