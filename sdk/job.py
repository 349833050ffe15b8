"""Job records and handles: what :meth:`Client.submit <llmos.client.Client.submit>` returns."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmos.errors import JobCancelled, JobFailed
from llmos.events import EventStream, is_end
from llmos.protocol import END_STATES, CancelRequest, Event

if TYPE_CHECKING:
    from llmos.client import Client


@dataclass(frozen=True)
class JobInfo:
    """A job's record as the kernel keeps it."""

    id: int
    kind: str
    state: str
    params: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    max_retries: int = 0
    timeout: float | None = None
    reason: str | None = None
    exit_code: int | None = None
    attempts: int = 0
    result: Any = None
    placement: dict[str, Any] | None = None
    submitted_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    worker_pid: int | None = None
    progress: dict[str, Any] | None = None  # a running job's last progress event body
    usage: dict[str, Any] | None = None  # a running job's last measured usage
    preemptible: bool = False  # may be stopped for a job of higher priority, then resumed
    preemptions: int = 0  # how many of its tries were preempted

    @property
    def ended(self) -> bool:
        """True once the job is succeeded, failed or cancelled."""
        return self.state in END_STATES

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobInfo:
        """Build from the kernel's map, ignoring keys a newer kernel may add."""
        known = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """A plain map, as ``llmos job --json`` prints it."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class JobList(list[JobInfo]):
    """A page of job records, oldest first: a list, which also says how many jobs match in all
    (``total``) and how many of them are older than its first (``older``). The next page back is
    ``client.jobs(..., before=page.before)``."""

    def __init__(self, infos: list[JobInfo], total: int | None = None, older: int | None = None) -> None:
        super().__init__(infos)
        self.total = len(infos) if total is None else total
        self.older = 0 if older is None else older

    @property
    def before(self) -> int | None:
        """The id to page back from (the first one listed), or None when nothing is older."""
        return self[0].id if self and self.older else None

    @classmethod
    def from_reply(cls, reply: Any) -> JobList:
        return cls([JobInfo.from_dict(j) for j in reply.jobs], reply.total, reply.older)


class Job:
    """A handle on one job of a kernel."""

    def __init__(self, client: Client, job_id: int, info: JobInfo | None = None) -> None:
        self.client = client
        self.id = int(job_id)
        self._info = info

    def __repr__(self) -> str:
        return f"<Job {self.id} {self._info.kind + ' ' + self._info.state if self._info else ''}>".replace(" >", ">")

    def info(self) -> JobInfo:
        """The job's current record."""
        self._info = self.client._job_info(self.id)
        return self._info

    def wait(self, timeout: float | None = None) -> JobInfo:
        """Block until the job ends (or ``timeout`` seconds pass: TimeoutError); return its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.info()
            if info.ended:
                return info
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"job {self.id} is still {info.state} after {timeout}s")
            for _ in self.events(since=0, follow=True, timeout=left, _states_only=True):
                pass

    def artifacts(self, kind: str | None = None) -> list[dict[str, Any]]:
        """What the job published (``job.<id>.artifact`` events), oldest first: maps with ``path``,
        ``kind``, ``meta`` and the event's ``seq``; only those of ``kind`` if given."""
        out = []
        for event in self.client.events(f"job.{self.id}.artifact"):
            if event.type == "job.artifact" and (kind is None or event.body.get("kind") == kind):
                out.append({**event.body, "seq": event.seq})
        return out

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the job and return its result; JobFailed or JobCancelled if it did not succeed."""
        return result_of(self.wait(timeout))

    def cancel(self, reason: str = "cancelled by user") -> JobInfo:
        """Ask the kernel to cancel the job; returns the record right after the request."""
        reply = self.client.request(CancelRequest(id=self.id, reason=reason))
        self._info = JobInfo.from_dict(reply.job)
        return self._info

    def events(self, since: int = 0, follow: bool = True, timeout: float | None = None, *, _states_only: bool = False,
               _stop: threading.Event | None = None) -> Iterator[Event]:
        """The job's events from the journal (seq above ``since``); with ``follow``, then live
        until the job has ended and its last event was delivered."""
        prefix = f"job.{self.id}.state" if _states_only else f"job.{self.id}."
        stream = EventStream(self.client, prefix, since, timeout, stop=_stop)
        try:
            for event in stream.history():
                yield event
                if is_end(event):
                    return
            if not follow:
                return
            if self.info().ended:
                # It ended before ``since``, or just now: catch up once and stop.
                for event in stream.history_after():
                    yield event
                return
            for event in stream.live():
                yield event
                if is_end(event):
                    return
        finally:
            stream.close()

    def logs(self, follow: bool = True, since: int = 0) -> Iterator[Event]:
        """The job's ``job.log`` events (see :meth:`events`)."""
        for event in self.events(since=since, follow=follow):
            if event.type == "job.log":
                yield event


def result_of(info: JobInfo) -> Any:
    """An ended job's result; JobFailed or JobCancelled when it did not succeed."""
    if info.state == "failed":
        raise JobFailed(f"job {info.id} ({info.kind}) failed: {info.reason}", job_id=info.id, reason=info.reason, exit_code=info.exit_code)
    if info.state == "cancelled":
        raise JobCancelled(f"job {info.id} ({info.kind}) was cancelled: {info.reason}", job_id=info.id, reason=info.reason)
    return info.result


__all__ = ["Job", "JobInfo", "result_of"]
