"""The job state machine: which state changes are legal, and the one function that makes them.

::

    pending ──► running ──► succeeded
       │  ▲        │ │
       │  └────────┘ └────► failed / cancelled
       └──────────────────► failed / cancelled

``running -> pending`` is a retry, a preemption (the job keeps its place in the queue) or a
kernel restart with retries left; ``pending -> failed`` a request that can never fit, ``pending ->
cancelled`` a cancel before the start. Ended states are final. The kernel changes a state only
through :func:`transition`, called by :meth:`JobTable.transition`, which then stores the row and
journals the ``job.<id>.state`` event, so no path can skip the store or the event.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from llmos.errors import JobNotFound, LlmosError
from llmos.kernel.store import JobRecord, Store
from llmos.protocol import END_STATES, JOB_STATES, JobStateChanged

__all__ = ["LEGAL", "IllegalTransition", "JobTable", "transition"]

#: state -> the states it may change to.
LEGAL: dict[str, frozenset[str]] = {
    "pending": frozenset({"running", "failed", "cancelled"}),
    "running": frozenset({"pending", "succeeded", "failed", "cancelled"}),
    **{state: frozenset() for state in END_STATES},
}


class IllegalTransition(LlmosError):
    """A state change the job state machine does not allow (a kernel bug, never user input)."""

    code = 1


def transition(job: JobRecord, state: str, reason: str | None = None, *, now: float | None = None, **fields: Any) -> None:
    """Move ``job`` to ``state`` with ``reason`` (and set ``fields``: exit_code, placement,
    queued_at...); an ended state stamps ``ended_at``. IllegalTransition when not allowed."""
    if state not in JOB_STATES:
        raise IllegalTransition(f"job {job.id}: {state!r} is not a job state (states: {', '.join(JOB_STATES)})")
    if state not in LEGAL.get(job.state, frozenset()):
        raise IllegalTransition(f"job {job.id}: {job.state} -> {state} is not a legal transition")
    unknown = [name for name in fields if not hasattr(job, name)]
    if unknown:
        raise AttributeError(f"JobRecord has no field {unknown[0]!r}")
    for name, value in fields.items():
        setattr(job, name, value)
    job.state = state
    job.reason = reason
    if state in END_STATES:
        job.ended_at = time.time() if now is None else now


class JobTable(Mapping[int, JobRecord]):
    """The jobs not ended yet (pending and running), by id, in memory; every ended job is in the
    store. Reads like a dict; changes go through its methods, each of which stores the row and
    journals the ``job.<id>.state`` event with the change."""

    def __init__(self, store: Store, emit: Callable[[str, Any], None]) -> None:
        self.store = store
        self.emit = emit
        self._active: dict[int, JobRecord] = {}
        # The jobs that ended last, as they ended: what find() answers even while the store's
        # writes wait for room on a full disk (kernel/storage.py).
        self._ended: collections.OrderedDict[int, JobRecord] = collections.OrderedDict()
        self.ended_counts = {k: v for k, v in store.count_jobs().items() if k in END_STATES}

    def __getitem__(self, job_id: int) -> JobRecord:
        return self._active[job_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._active)

    def __len__(self) -> int:
        return len(self._active)

    def counts(self) -> dict[str, int]:
        """Jobs by state, ended ones included."""
        counts = dict.fromkeys(JOB_STATES, 0)
        counts.update(self.ended_counts)
        for job in self._active.values():
            counts[job.state] += 1
        return counts

    def latest(self, stored: JobRecord) -> JobRecord:
        """The record as the kernel holds it now, for a row read from the store: an active
        job's carries its last progress and usage, an ended one's may not be written yet."""
        return self._active.get(stored.id) or self._ended.get(stored.id) or stored

    def of_state(self, state: str) -> list[JobRecord]:
        return [j for j in self._active.values() if j.state == state]

    def find(self, job_id: int) -> JobRecord:
        """An active job from memory, an ended one from the store; JobNotFound otherwise."""
        if not 0 < job_id < 2**63:
            raise JobNotFound(f"no job with id {job_id}", job_id=job_id)
        job = self._active.get(job_id) or self._ended.get(job_id) or self.store.get_job(job_id)
        if job is None:
            raise JobNotFound(f"no job with id {job_id}", job_id=job_id)
        return job

    def create(self, kind: str, params: dict[str, Any], resources: dict[str, Any], *, priority: int = 0, max_retries: int = 0,
               timeout: float | None = None, preemptible: bool = False) -> JobRecord:
        now = time.time()
        job = JobRecord(
            id=0, kind=kind, params=params, resources=resources, priority=priority, max_retries=max_retries, timeout=timeout,
            state="pending", submitted_at=now, queued_at=now, preemptible=preemptible,
        )
        job.id = self.store.insert_job(job)
        self._active[job.id] = job
        self.emit_state(job)
        return job

    def transition(self, job: JobRecord, state: str, reason: str | None, *, persist: bool = True, **fields: Any) -> None:
        """The only place a job's state changes (:func:`transition`): then the row is stored
        (unless the caller stores it right after) and the state event journaled. An ended job
        leaves the table."""
        transition(job, state, reason, **fields)
        if persist:
            self.store.update_job(job)
        self.emit_state(job)
        if state in END_STATES:
            self._active.pop(job.id, None)
            self._ended[job.id] = job
            while len(self._ended) > 256:
                self._ended.popitem(last=False)
            self.ended_counts[state] = self.ended_counts.get(state, 0) + 1

    def emit_state(self, job: JobRecord) -> None:
        self.emit(
            f"job.{job.id}.state",
            JobStateChanged(state=job.state, reason=job.reason, exit_code=job.exit_code, attempts=job.attempts, placement=job.placement),
        )

    def settle(self, job: JobRecord, state: str, reason: str, exit_code: int | None, *, retry: bool = True) -> bool:
        """A try ended as ``state``: a preempted job goes back to the queue keeping its place (it
        ages; no retry is spent), a failed one with retries left is queued again, anything else
        ends. Returns True when the job ended."""
        if state == "preempted":
            self.transition(job, "pending", f"{reason}; queued to start again", preemptions=job.preemptions + 1, exit_code=exit_code,
                            placement=None, end_state_on_stop=None)
            return False
        if state == "failed" and retry and job.attempts - job.preemptions <= job.max_retries and job.attempts > 0:
            self.transition(job, "pending", f"retrying after: {reason}", exit_code=exit_code, placement=None, queued_at=time.time(),
                            end_state_on_stop=None)
            return False
        self.transition(job, state, reason, exit_code=exit_code)
        return True

    def recover(self) -> list[JobRecord]:
        """Load the jobs the previous kernel left unfinished: pending ones wait again; running
        ones died with it and are retried if they have retries left, else fail. Returns the
        ones that were running (whose processes may still be alive)."""
        orphans = []
        for job in self.store.unfinished_jobs():
            self._active[job.id] = job
            if job.state == "running":
                orphans.append(job)
                job.placement = None
                if job.attempts - job.preemptions <= job.max_retries:
                    self.transition(job, "pending", "kernel restarted; retrying", queued_at=time.time())
                else:
                    self.transition(job, "failed", "kernel restarted", exit_code=None, worker_id=None, stop_stage=0, stop_at=None, deadline=None)
        return orphans
