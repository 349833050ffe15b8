"""Messages between the kernel and its workers: ready, heartbeat, assign, cancel, exit, job done."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from llmos.protocol.registry import message


@message("worker.ready")
@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerReady:
    """A worker process is up, connected and waiting for a job."""

    worker_id: str
    pid: int


@message("worker.heartbeat")
@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerHeartbeat:
    """A worker is alive (sent every ``workers.heartbeat_interval`` seconds)."""

    worker_id: str
    job_id: int | None = None


@message("worker.assign")
@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerAssign:
    """Kernel to worker: run this job."""

    job_id: int
    kind: str
    params: dict[str, Any]
    attempt: int
    resources: dict[str, Any]
    placement: dict[str, Any]
    workdir: str
    env: dict[str, str] = field(default_factory=dict)
    #: The artifacts the job takes as inputs, {param: {"id": sha256, "path": ...}}: the worker
    #: checks each hash before the job runs.
    inputs: dict[str, Any] = field(default_factory=dict)


@message("worker.rank_start")
@dataclass(frozen=True, slots=True, kw_only=True)
class RankStart:
    """Worker to kernel: start rank ``rank`` of my job (``python ARGV...`` with ``env``) on the
    node the kernel's rank plan gave it (a gang spread over a cluster's nodes). The kernel answers
    with :class:`RankExited` when it ends."""

    job_id: int
    rank: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    log: str = ""


@message("worker.rank_stop")
@dataclass(frozen=True, slots=True, kw_only=True)
class RankStop:
    """Worker to kernel: kill rank ``rank`` of my job, which I started through the kernel."""

    job_id: int
    rank: int


@message("worker.rank_exited")
@dataclass(frozen=True, slots=True, kw_only=True)
class RankExited:
    """Kernel to worker: a rank it started through the kernel ended (``code`` as subprocess's
    returncode; None with ``reason`` when its node or host is gone)."""

    job_id: int
    rank: int
    code: int | None = None
    reason: str | None = None


@message("worker.cancel")
@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerCancel:
    """Kernel to worker: stop the running job (the runner sees ``ctx.cancelled``)."""

    job_id: int
    reason: str


@message("worker.exit")
@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerExit:
    """Kernel to an idle worker: leave."""


@message("worker.job_done")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobDone:
    """Worker to kernel (on the ingest path, after the job's last event): how the runner ended."""

    job_id: int
    attempt: int
    outcome: Literal["succeeded", "failed", "cancelled"]
    result: Any = None
    error: str | None = None
    traceback: str | None = None
