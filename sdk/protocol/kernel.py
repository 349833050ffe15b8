"""Messages about the kernel itself: errors, status, devices, plugins, replay, shutdown, usage reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmos.protocol.registry import message


@message("kernel.error_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorReply:
    """Any request can be answered with this: the error's class name, text and stable code."""

    status: str = "error"
    ename: str
    evalue: str
    code: int
    context: dict[str, Any] = field(default_factory=dict)


@message("kernel.devices_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class DevicesRequest:
    """Ask for the device table."""


@message("kernel.devices_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class DevicesReply:
    """The device table: one map per device."""

    status: str = "ok"
    devices: list[dict[str, Any]]


@message("kernel.plugins_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class PluginsRequest:
    """Ask which plugins the kernel loaded and what they registered."""


@message("kernel.plugins_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class PluginsReply:
    """Plugins with their status, and the job kinds they registered."""

    status: str = "ok"
    plugins: list[dict[str, Any]]
    kinds: list[dict[str, Any]]


@message("kernel.status_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class StatusRequest:
    """Ask for the kernel's status."""


@message("kernel.status_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class StatusReply:
    """The kernel's identity, endpoints and counters."""

    status: str = "ok"
    version: str
    pid: int
    started_at: float
    state_dir: str
    endpoints: dict[str, str]
    jobs: dict[str, int]
    workers: dict[str, int]
    last_seq: int
    metrics_url: str | None = None
    stats: dict[str, int] = field(default_factory=dict)
    #: With the Ray backend: its address, state (connected / unavailable), error and node ids.
    cluster: dict[str, Any] | None = None
    #: The state dir's disk: state (ok / low / full), path, free and total bytes, low_space, reason.
    storage: dict[str, Any] | None = None


@message("kernel.replay_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayRequest:
    """Journaled events whose topic starts with ``prefix`` and whose seq is above ``since``
    (and at most ``until``), oldest first, at most ``limit`` of them."""

    prefix: str = ""
    since: int = 0
    until: int | None = None
    limit: int = 1000


@message("kernel.replay_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayReply:
    """Events as ``[topic, header, body]`` items; ``more`` when the limit cut the answer short;
    ``last_seq`` is the journal's newest seq when the answer was made."""

    status: str = "ok"
    events: list[Any]
    last_seq: int
    more: bool


@message("kernel.stream_heads_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class StreamHeadsRequest:
    """The newest event of every stream matching ``prefix`` that has events above ``since``: how
    a follower checks, cheaply, that it has missed nothing (a dropped last event of a stream)."""

    prefix: str = ""
    since: int = 0


@message("kernel.stream_heads_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class StreamHeadsReply:
    """``heads`` maps a stream to ``[stream_seq, seq]`` of its newest event; ``last_seq`` is the
    journal's newest seq when the answer was made."""

    status: str = "ok"
    heads: dict[str, list[int]]
    last_seq: int


@message("kernel.plugins_reload_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class PluginsReloadRequest:
    """Load the plugins again (after an install, uninstall, enable or disable); new workers get the new set."""


@message("kernel.plugins_reload_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class PluginsReloadReply:
    """What a reload changed: plugins and job kinds added and removed, and the new plugin list."""

    status: str = "ok"
    added: list[str]
    removed: list[str]
    kinds_added: list[str]
    kinds_removed: list[str]
    plugins: list[dict[str, Any]]


@message("monitor.usage_report")
@dataclass(frozen=True, slots=True, kw_only=True)
class UsageReport:
    """From the monitor service to the kernel: what the node, each GPU (by index) and each
    running job (by id) use now. Fields a device cannot report are absent, never zero."""

    node: dict[str, Any]
    gpus: list[dict[str, Any]] = field(default_factory=list)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)


@message("kernel.shutdown_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownRequest:
    """Stop the kernel (running jobs' workers are stopped; their jobs fail as "kernel restarted"
    when it comes back)."""


@message("kernel.ok_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class OkReply:
    """A request done, with nothing more to say."""

    status: str = "ok"
