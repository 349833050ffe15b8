"""Preemption: a job of higher priority that cannot fit stops preemptible jobs of lower priority,
which go back to the queue and run again; nothing else is ever stopped."""

from __future__ import annotations

import time

import pytest

import llmos
from tests.conftest import KernelHandle

GPU = {"gpus": 1, "cpus": 0}


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory: pytest.TempPathFactory):
    handle = KernelHandle(tmp_path_factory.mktemp("k") / "state", "--fake-gpus", "1x24GiB").boot()
    try:
        yield handle
    finally:
        handle.shutdown()


def _wait_state(job: llmos.Job, state: str, timeout: float = 20) -> llmos.JobInfo:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job.info()
        if info.state == state:
            return info
        time.sleep(0.05)
    raise AssertionError(f"job {job.id} never reached {state}: {job.info()}")


def test_higher_priority_job_preempts_and_the_victim_runs_again(one_gpu):
    with one_gpu.client() as client:
        low = client.submit("diag.sleep", {"seconds": 60}, GPU, priority=0, preemptible=True)
        assert _wait_state(low, "running").preemptible is True
        high = client.submit("diag.echo", {"message": "m1"}, GPU, priority=5)
        assert high.wait(timeout=30).state == "succeeded"
        # The victim went back to the queue (not cancelled, no retry spent) and runs again.
        states = [(e.body["state"], e.body.get("reason") or "") for e in low.events(follow=False) if e.type == "job.state"]
        assert any(s == "pending" and r.startswith(f"preempted by job {high.id} (priority 5)") for s, r in states), states
        info = _wait_state(low, "running")
        assert info.attempts == 2 and info.preemptions == 1 and info.max_retries == 0
        low.cancel()
        end = low.wait(timeout=30)
        assert end.state == "cancelled" and end.preemptions == 1


def test_jobs_not_preemptible_or_not_lower_are_never_stopped(one_gpu):
    with one_gpu.client() as client:
        steady = client.submit("diag.sleep", {"seconds": 60}, GPU, priority=0)  # diag.sleep is not preemptible by default
        _wait_state(steady, "running")
        same = client.submit("diag.sleep", {"seconds": 60}, GPU, priority=0, preemptible=True)
        high = client.submit("diag.echo", {"message": "m2"}, GPU, priority=9)
        time.sleep(1.0)
        assert steady.info().state == "running" and steady.info().attempts == 1
        assert high.info().state == "pending" and same.info().state == "pending"
        steady.cancel()
        # The GPU frees: the high-priority job goes first, then the other.
        assert high.wait(timeout=30).state == "succeeded"
        _wait_state(same, "running")
        # Equal priority never preempts.
        peer = client.submit("diag.echo", {"message": "m3"}, GPU, priority=0)
        time.sleep(0.8)
        assert same.info().state == "running" and same.info().preemptions == 0
        same.cancel()
        assert peer.wait(timeout=30).state == "succeeded"


def test_preempted_runner_sees_why_and_a_service_cannot_be_preemptible(one_gpu):
    with one_gpu.client() as client:
        with pytest.raises(llmos.errors.JobRejected, match="services cannot be preempted"):
            client.submit("monitor", {}, preemptible=True)
        low = client.submit("diag.sleep", {"seconds": 60}, GPU, priority=-3, preemptible=True)
        _wait_state(low, "running")
        cli = one_gpu.cli_json("submit", "diag.echo", "-p", "message=m4", "--gpus", "1", "--cpus", "0", "--priority", "1", "--wait")
        assert cli["state"] == "succeeded"
        info = _wait_state(low, "running")
        assert info.preemptions == 1
        low.cancel()
        low.wait(timeout=30)
