"""llmos: an operating system for language-model work.

The SDK is the front door: :func:`connect` to a running kernel, submit and follow jobs, read the
bus; and the plugin-author API: :data:`hookimpl`, :class:`JobKind`, :class:`Runner`,
:class:`JobContext`, :func:`param`, :func:`message`. Importing it loads neither torch nor the
kernel.
"""

from typing import TYPE_CHECKING, Any

from llmos._version import PLUGIN_API, __version__
from llmos.client import Client, Job, JobInfo, connect
from llmos.completion import Completion
from llmos.context import JobContext
from llmos.errors import (
    ConfigError,
    JobCancelled,
    JobError,
    JobFailed,
    JobNotFound,
    JobRejected,
    KernelError,
    KernelUnavailable,
    LlmosError,
    PluginError,
    ProtocolError,
    ResourceError,
    ServiceBusy,
    ServiceError,
    ServiceUnavailable,
    StorageFull,
    ValidationError,
)
from llmos.job import JobList
from llmos.params import param
from llmos.pipeline import Pipeline
from llmos.plugin import JobKind, Resources, Runner, ServiceKind, hookimpl
from llmos.protocol import Event, message, topic

if TYPE_CHECKING:
    from llmos.aio import AsyncClient, AsyncJob

__all__ = [
    "PLUGIN_API",
    "AsyncClient",
    "AsyncJob",
    "Client",
    "Completion",
    "ConfigError",
    "Event",
    "Job",
    "JobCancelled",
    "JobContext",
    "JobError",
    "JobFailed",
    "JobInfo",
    "JobKind",
    "JobList",
    "JobNotFound",
    "JobRejected",
    "KernelError",
    "KernelUnavailable",
    "LlmosError",
    "Pipeline",
    "PluginError",
    "ProtocolError",
    "ResourceError",
    "Resources",
    "Runner",
    "ServiceBusy",
    "ServiceError",
    "ServiceKind",
    "ServiceUnavailable",
    "StorageFull",
    "ValidationError",
    "__version__",
    "connect",
    "hookimpl",
    "message",
    "param",
    "topic",
]


def __getattr__(name: str) -> Any:
    # The asyncio client loads on first use: a command line or a sync client starts without asyncio.
    if name in ("AsyncClient", "AsyncJob"):
        from llmos import aio

        return getattr(aio, name)
    raise AttributeError(f"module 'llmos' has no attribute {name!r}")
