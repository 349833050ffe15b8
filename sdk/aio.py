"""The SDK for asyncio: :class:`AsyncClient`, for servers built on llmos (an HTTP gateway, a
dashboard) that talk to the kernel from one event loop.

::

    import asyncio, llmos

    async def main():
        async with llmos.AsyncClient() as client:
            job = await client.submit("diag.echo", params={"data": 1})
            print(await job.result())
            async for event in job.events():
                print(event.topic)
            async for reply in client.call("my-service", {"prompt": "def "}):
                print(reply)

    asyncio.run(main())

It runs on the same connection core as :class:`~llmos.client.Client` (:mod:`llmos.connection`).
Made inside a running loop, the client's loop leads the shared socket itself (a reader on its
descriptor files each reply in its request's mailbox and sets the waiter's event: a reply wakes
no other thread); made outside one, a pump thread leads it and wakes the loop. Requests and
service streams are awaited without a thread each. Event
streams (journal replay, gap filling, live SUB) run the synchronous stream in a thread of their
own and hand its events to the loop, so both clients deliver exactly the same events.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

from llmos.client import Client, service_body, submit_request
from llmos.connection import ALIVE_CHECK, Mailbox
from llmos.errors import KernelError, error_from_reply
from llmos.job import JobInfo, JobList, result_of
from llmos.protocol import (
    AcctRequest,
    CancelRequest,
    DevicesRequest,
    ErrorReply,
    Event,
    JobRequest,
    JobsRequest,
    PluginsRequest,
    ReplayRequest,
    ServiceCancel,
    ServiceRequest,
    ServicesRequest,
    StatusRequest,
    encode_body,
    event_from_item,
)

T = TypeVar("T")
_END = object()


class AsyncJob:
    """A handle on one job, for an event loop (what :meth:`AsyncClient.submit` returns)."""

    def __init__(self, client: AsyncClient, job_id: int, info: JobInfo | None = None) -> None:
        self.client = client
        self.id = int(job_id)
        self._info = info

    def __repr__(self) -> str:
        return f"<AsyncJob {self.id}{' ' + self._info.kind + ' ' + self._info.state if self._info else ''}>"

    async def info(self) -> JobInfo:
        """The job's current record."""
        self._info = JobInfo.from_dict((await self.client.request(JobRequest(id=self.id))).job)
        return self._info

    async def wait(self, timeout: float | None = None) -> JobInfo:
        """Until the job ends (TimeoutError after ``timeout`` seconds); its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = await self.info()
            if info.ended:
                return info
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"job {self.id} is still {info.state} after {timeout}s")
            async for _ in self.client._threaded(lambda stop, left=left: self.client.sync.job(self.id).events(timeout=left, _states_only=True, _stop=stop)):
                pass

    async def result(self, timeout: float | None = None) -> Any:
        """Wait and return the result; JobFailed or JobCancelled if it did not succeed."""
        return result_of(await self.wait(timeout))

    async def cancel(self, reason: str = "cancelled by user") -> JobInfo:
        """Ask the kernel to cancel the job; the record right after the request."""
        self._info = JobInfo.from_dict((await self.client.request(CancelRequest(id=self.id, reason=reason))).job)
        return self._info

    def events(self, since: int = 0, follow: bool = True, timeout: float | None = None) -> AsyncIterator[Event]:
        """``async for`` over the job's events, as :meth:`llmos.Job.events` yields them."""
        return self.client._threaded(lambda stop: self.client.sync.job(self.id).events(since=since, follow=follow, timeout=timeout, _stop=stop))

    async def logs(self, follow: bool = True, since: int = 0) -> AsyncIterator[Event]:
        """The job's ``job.log`` events."""
        async for event in self.events(since=since, follow=follow):
            if event.type == "job.log":
                yield event


class AsyncClient:
    """A connection to one kernel for asyncio code; one client serves any number of tasks.

    Its methods mirror :class:`~llmos.client.Client`'s, awaited; :meth:`events`,
    :meth:`AsyncJob.events` and :meth:`call` are ``async for`` iterators. ``sync`` is the
    synchronous client on the same connection, for code that must call one from a thread."""

    def __init__(self, state_dir: str | os.PathLike[str] | None = None, *, timeout: float = 30.0, key: Any = None) -> None:
        self.sync = Client(state_dir, timeout=timeout, key=key)
        self.state_dir, self.timeout, self.kernel = self.sync.state_dir, timeout, self.sync.kernel
        self._conn = self.sync.connection
        self._stop = threading.Event()
        self._pump: threading.Thread | None = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:  # made in its loop: the loop reads the socket itself
            self._conn.lead_on(loop)
        else:  # made outside any loop: a pump thread reads it, for whichever loop awaits
            self._pump = threading.Thread(target=self._conn.pump, args=(self._stop,), name="llmos-aio-pump", daemon=True)
            self._pump.start()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop reading and close the connection (idempotent)."""
        self._stop.set()
        if self._pump is None:
            self._conn.stop_leading_on()
        await asyncio.get_running_loop().run_in_executor(None, self._close_sync)

    def _close_sync(self) -> None:
        if self._pump is not None:
            self._pump.join(timeout=2 * ALIVE_CHECK + 1)
        self.sync.close()

    # -- the core: a reply, awaited --

    def _open(self, request_id: str) -> tuple[Mailbox, asyncio.Event]:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        conn = self._conn

        def notify() -> None:
            if conn.on_loop_thread():  # filed by the loop itself: no thread to wake
                wake.set()
                return
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(wake.set)

        return self._conn.open(request_id, notify), wake

    async def _next(self, box: Mailbox, wake: asyncio.Event, timeout: float | None, what: str) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        conn = self._conn
        while True:
            if box.replies:
                return box.replies.popleft()
            if conn.dead is not None:
                raise conn.dead
            if conn.closed:
                raise KernelError("this llmos client is closed", endpoint=conn.endpoint)
            wake.clear()
            if box.replies:
                continue
            wait = ALIVE_CHECK if deadline is None else min(ALIVE_CHECK, deadline - time.monotonic())
            if wait <= 0:
                conn._check_alive()
                raise TimeoutError(f"{what} did not answer within {timeout}s")
            try:
                async with asyncio.timeout(wait):  # no task per wait, as wait_for makes one: this runs once per reply
                    await wake.wait()
            except TimeoutError:
                conn._check_alive()

    async def request(self, msg: Any, timeout: float | None = None) -> Any:
        """Send one control request; its reply (error replies are raised)."""
        timeout = self.timeout if timeout is None else timeout
        request_id, frames = self._conn.frames(msg)
        box, wake = self._open(request_id)
        try:
            self._conn.send(frames)
            try:
                reply = await self._next(box, wake, timeout, "the kernel")
            except TimeoutError:
                raise KernelError(f"the kernel did not answer within {timeout}s", endpoint=self._conn.endpoint) from None
        finally:
            self._conn.forget(request_id)
        if isinstance(reply, ErrorReply):
            raise error_from_reply(reply.ename, reply.evalue, reply.code, reply.context)
        return reply

    # -- jobs --

    async def submit(self, kind: str, params: dict[str, Any] | None = None, resources: dict[str, Any] | None = None, priority: int = 0,
                     max_retries: int = 0, timeout: float | None = None, *, coerce: bool = False, preemptible: bool | None = None) -> AsyncJob:
        """Queue a job (see :meth:`llmos.Client.submit`)."""
        reply = await self.request(submit_request(kind, params, resources, priority, max_retries, timeout, coerce, preemptible))
        info = JobInfo.from_dict(reply.job)
        return AsyncJob(self, info.id, info)

    async def job(self, job_id: int) -> AsyncJob:
        """A handle on an existing job (JobNotFound if there is none)."""
        info = JobInfo.from_dict((await self.request(JobRequest(id=int(job_id)))).job)
        return AsyncJob(self, info.id, info)

    async def jobs(self, state: str | None = None, limit: int = 1000, *, before: int | None = None, services: bool = True) -> JobList:
        """A page of job records, as :meth:`Client.jobs <llmos.client.Client.jobs>` gives."""
        return JobList.from_reply(await self.request(JobsRequest(state=state, limit=limit, before=before, services=services)))

    # -- services --

    async def call(self, service: str, body: dict[str, Any] | None = None, *, timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """``async for`` over a service's responses to one request (see :meth:`llmos.Client.call`);
        leaving the loop early cancels the request at the replica."""
        conn = self._conn
        request_id, frames = conn.frames(ServiceRequest(service=service, body=dict(body or {})))
        box, wake = self._open(request_id)
        finished = False
        try:
            conn.send(frames)
            while True:
                reply = await self._next(box, wake, timeout, f"service {service!r}")
                finished = True  # an error ends the request (the kernel has freed its slot)
                body, done = service_body(reply, service)
                finished = done
                yield body
                if done:
                    return
        finally:
            conn.forget(request_id)
            if not finished and not conn.closed and conn.dead is None:
                with contextlib.suppress(Exception):
                    conn.send(conn.frames(ServiceCancel(request_id=request_id))[1])

    async def services(self) -> list[dict[str, Any]]:
        """Running services with their replicas and the requests in flight."""
        return (await self.request(ServicesRequest())).services

    # -- the machine --

    async def status(self) -> dict[str, Any]:
        """The kernel's version, pid, endpoints and counters."""
        return encode_body(await self.request(StatusRequest()))

    async def devices(self) -> list[dict[str, Any]]:
        """The device table."""
        return (await self.request(DevicesRequest())).devices

    async def plugins(self) -> list[dict[str, Any]]:
        """Loaded plugins, their status and what each registered."""
        return (await self.request(PluginsRequest())).plugins

    async def kinds(self) -> list[dict[str, Any]]:
        """Every job kind with its plugin, schema and default resources."""
        return (await self.request(PluginsRequest())).kinds

    async def acct(self, since: float | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Accounting of finished jobs (see :meth:`llmos.Client.acct`)."""
        return (await self.request(AcctRequest(since=since, limit=limit))).jobs

    # -- the bus --

    async def replay(self, prefix: str = "", since: int = 0, until: int | None = None, limit: int = 1000) -> tuple[list[Event], int, bool]:
        """One page of the journal: (events, the journal's last seq, whether more follow)."""
        reply = await self.request(ReplayRequest(prefix=prefix, since=since, until=until, limit=limit))
        return [event_from_item(item) for item in reply.events], reply.last_seq, reply.more

    def events(self, prefix: str = "", since: int = 0, follow: bool = False, timeout: float | None = None) -> AsyncIterator[Event]:
        """``async for`` over events (see :meth:`llmos.Client.events`); a reconnecting reader
        passes the last seq it saw as ``since``."""
        return self._threaded(lambda stop: self.sync.events(prefix, since=since, follow=follow, timeout=timeout, _stop=stop))

    async def _threaded(self, make: Callable[[threading.Event], Iterator[T]]) -> AsyncIterator[T]:
        """Run a synchronous iterator in a thread of its own; its items, on the loop."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
        stop = threading.Event()

        def put(item: Any, exc: BaseException | None = None) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, (item, exc))

        def run() -> None:
            try:
                for item in make(stop):
                    put(item)
                    if stop.is_set():
                        break
            except BaseException as exc:
                put(_END, exc)
            else:
                put(_END)

        thread = threading.Thread(target=run, name="llmos-aio-events", daemon=True)
        thread.start()
        try:
            while True:
                item, exc = await queue.get()
                if item is _END:
                    if exc is not None:
                        raise exc
                    return
                yield item
        finally:
            stop.set()


__all__ = ["AsyncClient", "AsyncJob"]
