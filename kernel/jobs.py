"""The job state machine: which state changes are legal, and the one function that makes them.

::

    pending ──► running ──► succeeded
       │  ▲        │ │
       │  └────────┘ └────► failed / cancelled
       └──────────────────► failed / cancelled

``running -> pending`` is a retry, a preemption (the job keeps its place in the queue) or a
kernel restart with retries left; ``pending -> failed`` a request that can never fit, ``pending ->
cancelled`` a cancel before the start. Ended states are final. The kernel changes a state only
through :func:`transition` (its ``Kernel._transition`` then persists the row and journals the
``job.<id>.state`` event), so no path can skip the store or the event.
"""

from __future__ import annotations

import time
from typing import Any

from llmos.errors import LlmosError
from llmos.kernel.store import JobRecord
from llmos.protocol import END_STATES, JOB_STATES

__all__ = ["LEGAL", "IllegalTransition", "transition"]

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
