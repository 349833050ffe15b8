"""Messages about jobs: submitting, asking, listing, cancelling, accounting; the job states."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmos.protocol.registry import message


@message("kernel.submit_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class SubmitRequest:
    """Queue a job of ``kind``. With ``coerce``, string parameter values are converted to the
    schema's types (what the CLI sends for ``-p KEY=VALUE``)."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    max_retries: int = 0
    timeout: float | None = None
    coerce: bool = False
    #: May the scheduler stop it for a job of higher priority (it resumes later)? None: the kind's default.
    preemptible: bool | None = None
    #: The submitter's working directory: relative path parameters are resolved against it.
    cwd: str | None = None


@message("kernel.job_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobReply:
    """One job's record (the answer to submit, job and cancel requests)."""

    status: str = "ok"
    job: dict[str, Any]


@message("kernel.job_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobRequest:
    """Ask for one job's record."""

    id: int


@message("kernel.jobs_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobsRequest:
    """List jobs, oldest first: the newest ``limit`` of those with an id below ``before`` (None:
    the newest page), optionally only those in ``state``; services' jobs (serve, monitor...)
    unless ``services`` is false."""

    state: str | None = None
    limit: int = 1000
    before: int | None = None
    services: bool = True


@message("kernel.jobs_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobsReply:
    """Job records, with how many match in all (``total``) and how many of those are older
    than the first one listed (``older``: the next page is ``before`` its id)."""

    status: str = "ok"
    jobs: list[dict[str, Any]]
    total: int | None = None
    older: int | None = None


@message("kernel.cancel_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class CancelRequest:
    """Cancel a job: pending ones end at once, running ones are asked to stop, then signalled."""

    id: int
    reason: str = "cancelled by user"


@message("kernel.acct_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class AcctRequest:
    """Accounting of finished jobs that ended after ``since`` (epoch seconds)."""

    since: float | None = None
    limit: int = 1000


@message("kernel.acct_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class AcctReply:
    """One row per finished job: kind, plugin, state, wall and CPU time, peak memory, GPU use, tokens."""

    status: str = "ok"
    jobs: list[dict[str, Any]]


JOB_STATES = ("pending", "running", "succeeded", "failed", "cancelled")
END_STATES = frozenset({"succeeded", "failed", "cancelled"})
