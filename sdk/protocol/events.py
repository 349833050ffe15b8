"""The events on the bus: a job's state, progress, logs, metrics, artifacts and usage; devices' and the kernel's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmos.protocol.registry import message


@message("kernel.plugins_changed")
@dataclass(frozen=True, slots=True, kw_only=True)
class PluginsChanged:
    """The kernel's plugin set changed."""

    added: list[str]
    removed: list[str]
    kinds_added: list[str]
    kinds_removed: list[str]


@message("kernel.service_quarantined")
@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceQuarantined:
    """A service crashed too often and will not be restarted: an autostart service's kind until
    the plugins are reloaded (``job_id`` None), or one started instance (its last job, ``job_id``)."""

    service: str
    plugin: str
    crashes: int
    window: float
    reason: str
    job_id: int | None = None


@message("device.metrics")
@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceMetrics:
    """A device's measured use (published on ``device.<id>.metrics``)."""

    used: dict[str, Any]


@message("job.usage")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobUsage:
    """A running job's measured use: CPU %, resident memory of its process tree, GPU memory."""

    cpu_percent: float
    rss: int
    processes: int = 0
    gpu_memory: int | None = None


@message("job.state")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobStateChanged:
    """A job moved to ``state``; ends carry ``reason`` and ``exit_code``."""

    state: str
    reason: str | None = None
    exit_code: int | None = None
    attempts: int = 0
    placement: dict[str, Any] | None = None


@message("job.progress")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobProgress:
    """A runner's progress: ``step`` of ``total``, a message and any numbers worth showing."""

    step: int | float
    total: int | float | None = None
    message: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@message("job.log")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobLog:
    """One structured log record of a runner."""

    level: str
    event: str
    logger: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@message("job.metric")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobMetric:
    """One named number, optionally at a step."""

    name: str
    value: float
    step: int | None = None


@message("job.artifact")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobArtifact:
    """A file or directory a job produced."""

    path: str
    kind: str = "file"
    meta: dict[str, Any] = field(default_factory=dict)


@message("generate.text")
@dataclass(frozen=True, slots=True, kw_only=True)
class GeneratedText:
    """A piece of generated text, as it is made: prompt ``index``, the token id and its text."""

    index: int
    token: int
    text: str


@message("kernel.started")
@dataclass(frozen=True, slots=True, kw_only=True)
class KernelStarted:
    """The kernel booted."""

    version: str
    pid: int


@message("kernel.stopping")
@dataclass(frozen=True, slots=True, kw_only=True)
class KernelStopping:
    """The kernel is shutting down."""

    reason: str


@message("kernel.cluster")
@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterChanged:
    """The kernel's link to its Ray cluster changed: ``connected`` or ``unavailable`` (why in
    ``error``; the kernel keeps its state and tries again)."""

    state: str
    address: str
    error: str | None = None
    nodes: list[str] = field(default_factory=list)


@message("kernel.storage")
@dataclass(frozen=True, slots=True, kw_only=True)
class StorageChanged:
    """The state dir's disk changed state: ``ok``, ``low`` (free space below the warning
    threshold) or ``full`` (a write was refused, ``reason`` says how; submits and workers' events
    are refused until there is room again). ``free`` and ``total`` in bytes."""

    state: str
    path: str
    free: int
    total: int
    reason: str | None = None


@message("kernel.retention")
@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionDone:
    """What one retention pass removed (``[retention]``): journal rows and events of samples past
    ``samples``, the streams and folders of jobs ended past ``ended_jobs``."""

    sample_rows: int = 0
    sample_events: int = 0
    job_streams: int = 0
    job_events: int = 0
    job_folders: int = 0
    folder_bytes: int = 0


@message("kernel.node")
@dataclass(frozen=True, slots=True, kw_only=True)
class NodeChanged:
    """A cluster node ``joined`` or was ``lost`` (``why``; its jobs fail with "node <id> lost")."""

    node: str
    state: str
    cpus: float = 0.0
    memory: int = 0
    why: str | None = None
