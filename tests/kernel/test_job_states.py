"""The job state machine: legal and illegal transitions, without a kernel."""

from __future__ import annotations

import pytest

from llmos.kernel.jobs import LEGAL, IllegalTransition, transition
from llmos.kernel.store import JobRecord
from llmos.protocol import END_STATES, JOB_STATES


def _job(state: str) -> JobRecord:
    return JobRecord(id=1, kind="k", params={}, resources={}, priority=0, max_retries=0, timeout=None, state=state, submitted_at=0.0, queued_at=0.0)


ALLOWED = {
    ("pending", "running"), ("pending", "failed"), ("pending", "cancelled"),
    ("running", "pending"), ("running", "succeeded"), ("running", "failed"), ("running", "cancelled"),
}


@pytest.mark.parametrize("before", JOB_STATES)
@pytest.mark.parametrize("after", JOB_STATES)
def test_every_pair_of_states(before: str, after: str) -> None:
    job = _job(before)
    if (before, after) in ALLOWED:
        transition(job, after, "why", now=5.0, exit_code=3)
        assert (job.state, job.reason, job.exit_code) == (after, "why", 3)
        assert job.ended_at == (5.0 if after in END_STATES else None)
    else:
        with pytest.raises(IllegalTransition, match=f"{before} -> {after} is not a legal transition"):
            transition(job, after, "why")
        assert job.state == before and job.reason is None  # nothing changed


def test_the_table_is_the_diagram() -> None:
    assert {(a, b) for a, targets in LEGAL.items() for b in targets} == ALLOWED
    assert set(LEGAL) == set(JOB_STATES)


def test_unknown_states_and_fields_are_refused() -> None:
    with pytest.raises(IllegalTransition, match="not a job state"):
        transition(_job("pending"), "paused")
    with pytest.raises(AttributeError, match="no field 'colour'"):
        transition(_job("pending"), "running", colour="red")
