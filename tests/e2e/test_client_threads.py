"""One client shared by many threads (and by one event loop): each gets exactly its own replies,
nothing hangs, and when the kernel dies every waiter hears of it within a second."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import llmos
from llmos.connection import ForkedClient
from llmos.errors import KernelUnavailable
from tests.conftest import KernelHandle
from tests.e2e.conftest import wait_service as _wait_service

THREADS = 32


def _work(c: llmos.Client, me: int, until: float) -> dict[str, int]:
    """One thread's mix, round after round: status, submit + wait, a job's events, a service
    stream; every answer checked to be this thread's own."""
    done = {"status": 0, "jobs": 0, "events": 0, "streams": 0}
    round_ = 0
    while time.monotonic() < until:
        kind = (me + round_) % 4
        tag = f"{me}-{round_}"
        if kind == 0:
            assert c.status()["pid"] > 0
            done["status"] += 1
        elif kind == 1:
            job = c.submit("diag.echo", params={"data": {"tag": tag}})
            assert job.result(timeout=60)["data"] == {"tag": tag}
            done["jobs"] += 1
        elif kind == 2:
            job = c.submit("diag.echo", params={"data": {"tag": tag}})
            events = list(job.events(timeout=60))
            assert events and all(e.topic.startswith(f"job.{job.id}.") for e in events)
            assert events[-1].type == "job.state" and events[-1].body["state"] == "succeeded"
            done["events"] += 1
        else:
            replies = list(c.call("echo", {"text": tag, "n": 5}, timeout=60))
            assert [r.get("text") for r in replies[:-1]] == [tag] * 5 and replies[-1] == {"end": True}
            done["streams"] += 1
        round_ += 1
    return done


def test_threads_share_one_client(echo_kernel: KernelHandle) -> None:
    seconds = float(os.environ.get("LLMOS_TEST_THREADS_SECONDS", "8"))
    with echo_kernel.client() as c:
        c.submit("echo.service")
        c.submit("echo.service")
        _wait_service(c, "echo", replicas=2)
        until = time.monotonic() + seconds
        with ThreadPoolExecutor(THREADS) as pool:
            futures = [pool.submit(_work, c, i, until) for i in range(THREADS)]
            totals = [f.result(timeout=seconds + 120) for f in futures]
        counts = {k: sum(t[k] for t in totals) for k in totals[0]}
        assert all(v > 0 for v in counts.values()), counts
        assert all(sum(t.values()) > 0 for t in totals)  # every thread got through its rounds
        # The client is as good as new afterwards.
        assert c.submit("diag.echo", params={"data": 7}).result(timeout=30)["data"] == 7


def test_every_waiter_hears_of_a_killed_kernel(echo_kernel: KernelHandle) -> None:
    c = echo_kernel.client()
    c.submit("echo.service")
    _wait_service(c, "echo")
    errors: list[BaseException] = []
    started = threading.Barrier(13)
    ended: list[float] = []

    def wait_job() -> None:
        job = c.submit("diag.sleep", params={"seconds": 600})
        started.wait()
        try:
            job.wait()
        except BaseException as exc:
            errors.append(exc)
        ended.append(time.monotonic())

    def stream() -> None:
        started.wait()
        try:  # one replica: the first streams without end, the others wait in its queue
            for _ in c.call("echo", {"n": 10**9}):
                pass
        except BaseException as exc:
            errors.append(exc)
        ended.append(time.monotonic())

    def follow() -> None:
        started.wait()
        try:
            for _ in c.events("kernel", follow=True):
                pass
        except BaseException as exc:
            errors.append(exc)
        ended.append(time.monotonic())

    threads = [threading.Thread(target=f, daemon=True) for f in [wait_job] * 4 + [stream] * 4 + [follow] * 4]
    for t in threads:
        t.start()
    started.wait(timeout=60)
    time.sleep(0.5)
    killed = time.monotonic()
    echo_kernel.kill()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "a waiter hung after the kernel died"
    assert len(errors) == 12 and all(isinstance(e, KernelUnavailable) for e in errors), errors
    assert max(ended) - killed < 1.5, max(ended) - killed  # within a second of the kill (plus the reaping)
    with pytest.raises(KernelUnavailable):
        c.status()
    c.close()


def test_a_client_used_after_fork_says_so(echo_kernel: KernelHandle) -> None:
    with echo_kernel.client() as c:
        c.status()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: the parent's client must refuse, and a new one must work
            code = 1
            try:
                try:
                    c.status()
                except ForkedClient as exc:
                    code = 0 if "fork()" in str(exc) else 2
                with llmos.connect(echo_kernel.state_dir) as fresh:
                    fresh.status()
            except BaseException:
                code = 3
            os.write(w, bytes([code]))
            os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"\0"
        os.waitpid(pid, 0)
        assert c.status()["pid"] == echo_kernel.pid  # the parent's client is untouched


def test_async_client_from_one_event_loop(echo_kernel: KernelHandle) -> None:
    async def main() -> dict[str, int]:
        async with llmos.AsyncClient(echo_kernel.state_dir) as c:
            await c.submit("echo.service")
            deadline = time.monotonic() + 30
            while not any(s["name"] == "echo" for s in await c.services()):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)

            async def status() -> None:
                assert (await c.status())["pid"] > 0

            async def job(tag: int) -> None:
                handle = await c.submit("diag.echo", params={"data": {"tag": tag}})
                assert (await handle.result(timeout=60))["data"] == {"tag": tag}
                events = [e async for e in handle.events(timeout=60)]
                assert events[-1].body["state"] == "succeeded" and all(e.topic.startswith(f"job.{handle.id}.") for e in events)

            async def stream(tag: int) -> None:
                replies = [r async for r in c.call("echo", {"text": str(tag), "n": 5}, timeout=60)]
                assert [r.get("text") for r in replies[:-1]] == [str(tag)] * 5 and replies[-1] == {"end": True}

            tasks = [status() for _ in range(32)] + [job(i) for i in range(16)] + [stream(i) for i in range(32)]
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
            return {"tasks": len(tasks)}

    assert asyncio.run(main()) == {"tasks": 80}


def test_async_client_hears_of_a_killed_kernel(echo_kernel: KernelHandle) -> None:
    async def main() -> float:
        c = llmos.AsyncClient(echo_kernel.state_dir)
        await c.submit("echo.service")
        while not any(s["name"] == "echo" for s in await c.services()):
            await asyncio.sleep(0.05)

        async def stream() -> BaseException | None:
            try:
                async for _ in c.call("echo", {"n": 10**9}):
                    pass
            except BaseException as exc:
                return exc
            return None

        tasks = [asyncio.ensure_future(stream()) for _ in range(8)]
        await asyncio.sleep(1.0)
        killed = time.monotonic()
        os.kill(echo_kernel.pid, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert all(isinstance(r, KernelUnavailable) for r in results), results
        took = time.monotonic() - killed
        await c.close()
        return took

    assert asyncio.run(main()) < 1.5
