"""Named services: requests routed by the kernel to a replica, responses streamed back."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from llmos.errors import ProtocolError, ServiceError, ServiceUnavailable
from llmos.protocol import ServiceResponses
from tests.conftest import KernelHandle
from tests.e2e.conftest import wait_service as _wait_service


def test_requests_stream_back_and_replicas_share(echo_kernel: KernelHandle) -> None:
    with echo_kernel.client() as c:
        with pytest.raises(ServiceUnavailable, match="no service named 'echo'"):
            list(c.call("echo", {"text": "x"}))
        jobs = [c.submit("echo.service"), c.submit("echo.service")]
        _wait_service(c, "echo", replicas=2)
        replies = list(c.call("echo", {"text": "hi", "n": 4}))
        assert [r.get("i") for r in replies] == [0, 1, 2, 3, None] and replies[-1] == {"end": True}
        assert all(r["text"] == "hi" for r in replies[:-1])
        # Stopping early cancels the request at the replica.
        stream = c.call("echo", {"n": 1000})
        next(stream)
        stream.close()
        # A replica that dies mid-request turns the request into an error, not a hang.
        with pytest.raises(ServiceError, match="replica stopped"):
            list(c.call("echo", {"die": True}))
        # The other replica still answers.
        assert list(c.call("echo", {"n": 1}))[-1] == {"end": True}
        deadline = time.monotonic() + 10
        while "failed" not in [j.info().state for j in jobs]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert sorted(j.info().state for j in jobs) == ["failed", "running"]
        listed = c.services()
        assert listed[0]["name"] == "echo" and len(listed[0]["replicas"]) == 1
        # (a failed service is started again after a backoff: wait for it, then stop everything)
        _wait_service(c, "echo", replicas=2)
        jobs = [j for j in c.jobs(state="running") if j.kind == "echo.service"]
        for j in jobs:
            c.job(j.id).cancel()
        for j in jobs:
            c.job(j.id).wait(timeout=30)
        with pytest.raises(ServiceUnavailable):
            list(c.call("echo", {}))


def test_a_clean_shutdown_cancels_services_and_jobs_lists_them_only_with_all(echo_kernel: KernelHandle) -> None:
    with echo_kernel.client() as c:
        service = c.submit("echo.service")
        _wait_service(c, "echo")
        job = c.submit("diag.echo", params={"data": 1})
        job.wait(timeout=30)
    listed = [j["id"] for j in echo_kernel.cli_json("jobs")]
    assert job.id in listed and service.id not in listed
    assert service.id in [j["id"] for j in echo_kernel.cli_json("jobs", "--all")]
    echo_kernel.shutdown()
    echo_kernel.boot()
    with echo_kernel.client() as c:
        info = c.job(service.id).info()
        assert (info.state, info.reason) == ("cancelled", "kernel shut down")
        assert [j.state for j in c.jobs() if j.state == "failed"] == []


def test_a_step_answered_together_reaches_each_caller_in_order(echo_kernel: KernelHandle) -> None:
    """One service.responses message from the replica carries three calls' pieces, from two
    clients (one of them shared by two threads): each call gets its own pieces, in order."""
    with echo_kernel.client() as a, echo_kernel.client() as b:
        a.submit("echo.service")
        _wait_service(a, "echo")
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(lambda c, t: list(c.call("echo", {"together": 3, "text": t}, timeout=30)), c, t)
                       for c, t in ((a, "a1"), (a, "a2"), (b, "b"))]
            results = {t: f.result() for f, t in zip(futures, ("a1", "a2", "b"))}
        for text, replies in results.items():
            assert replies == [{"i": i, "text": text} for i in range(3)] + [{"end": True}]
        assert a.services()[0]["in_flight"] == 0
        # A malformed batch is refused whole, with what each item must be.
        with pytest.raises(ProtocolError, match=r"each item of service\.responses"):
            a.request(ServiceResponses(responses=[{"request_id": 5}]))
