"""Retention: samples and ended jobs' events and folders go after their time; artifacts, job
rows and sequence numbers stay."""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import KernelHandle


def _wait(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_samples_and_ended_jobs_go_after_their_time(short_tmp: Path) -> None:
    config = short_tmp / "llmos.toml"
    config.write_text('[monitor]\ninterval = 0.2\n[retention]\nsamples = "2s"\nended_jobs = "3s"\ninterval = 0.5\n')
    kernel = KernelHandle(short_tmp / "state", "--config", str(config), env={"LLMOS_MONITOR_AUTOSTART": "1"}).boot()
    try:
        with kernel.client() as c:
            _wait(lambda: len(c.replay("device.", limit=100)[0]) >= 3, "the monitor's first samples")
            first_sample = c.replay("device.", limit=1)[0][0].seq
            plain = c.submit("diag.emit", {"count": 5})
            plain.wait(timeout=30)
            kept = c.submit("diag.artifact", {"text": "weights"})
            kept.wait(timeout=30)
            folder = kernel.state_dir / "jobs" / str(plain.id)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "scratch.txt").write_text("x" * 1000)
            assert (kernel.state_dir / "jobs" / str(kept.id)).is_dir()
            assert c.replay(f"job.{plain.id}.")[0]
            # Samples older than 2 s go, then the ended jobs' events and folders after 3 s.
            _wait(lambda: c.replay("device.", limit=1)[0][0].seq > first_sample, "old samples to go")
            _wait(lambda: not c.replay(f"job.{plain.id}.")[0], "the ended job's events to go")
            _wait(lambda: not folder.exists(), "the ended job's folder to go")
            assert (kernel.state_dir / "jobs" / str(kept.id)).is_dir()  # it holds a registered artifact
            assert c.artifacts()[0]["job_id"] == kept.id
            assert {j.id for j in c.jobs()} >= {plain.id, kept.id}  # the rows stay
            done = [e.body for e in c.events("kernel.retention", follow=False)]
            assert sum(d["sample_events"] for d in done) > 0 and sum(d["job_folders"] for d in done) >= 1
            last = c.status()["last_seq"]
        kernel.shutdown()
        kernel.boot()
        with kernel.client() as c:
            assert c.status()["last_seq"] >= last  # numbers are never reused
    finally:
        kernel.shutdown()
