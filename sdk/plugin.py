"""What a plugin registers: job kinds, services and their resources, and the runner protocol.

A plugin is a module with ``@llmos.hookimpl`` functions (see ``llmos.kernel.hookspecs``)::

    @llmos.hookimpl
    def llmos_register_job_kinds(register):
        register(JobKind("wordcount", params=WordcountParams, runner=WordcountRunner))

The kernel imports plugins only to read these registrations; runners run in worker processes.
A runner may be a class or an ``"package.module:Class"`` string, so the plugin's top-level
module stays light (no torch) and the heavy module is imported only in the worker.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from llmos.errors import ValidationError
from llmos.params import NoParams, schema_of
from llmos.units import parse_size

if TYPE_CHECKING:
    from llmos.context import JobContext

#: Marks a plugin's hook implementations; pluggy pairs it with the kernel's specs by project name.
hookimpl = pluggy.HookimplMarker("llmos")

RESOURCE_KEYS = ("cpus", "memory", "gpus", "gpu_memory")


@dataclass(frozen=True, slots=True)
class Resources:
    """What a job asks for: CPU cores, RAM bytes, GPUs (below 1 shares one) and GPU bytes per GPU.

    ``gpu_memory=0`` with ``gpus`` set means: a whole GPU's memory for whole GPUs, and the
    fraction's share of it for a fraction.
    """

    cpus: float = 1.0
    memory: int = 0
    gpus: float = 0.0
    gpu_memory: int = 0

    @classmethod
    def parse(cls, values: dict[str, Any] | None, base: Resources | None = None) -> Resources:
        """Validate a resource map (sizes may be strings like ``"4GiB"``) over ``base``'s values."""
        out = dict(cpus=(base or cls()).cpus, memory=(base or cls()).memory, gpus=(base or cls()).gpus, gpu_memory=(base or cls()).gpu_memory)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ValidationError(f"resources must be a map with keys {', '.join(RESOURCE_KEYS)}")
        for key, value in values.items():
            if key not in RESOURCE_KEYS:
                raise ValidationError(f"unknown resource {key!r}; expected one of {', '.join(RESOURCE_KEYS)}", field=str(key))
            if value is None:
                continue
            try:
                if key in ("memory", "gpu_memory"):
                    out[key] = parse_size(value)
                else:
                    if isinstance(value, bool) or not isinstance(value, int | float | str):
                        raise ValueError
                    number = float(value)
                    if not math.isfinite(number) or number < 0 or number > 1e6:
                        raise ValueError
                    out[key] = number
            except (ValueError, TypeError, OverflowError):
                what = "a size such as 4GiB or bytes" if key in ("memory", "gpu_memory") else "a number >= 0"
                raise ValidationError(f"resource {key!r} expected {what}, got {value!r}", field=key) from None
        gpus = out["gpus"]
        if gpus > 1 and not float(gpus).is_integer():
            raise ValidationError(f"resource 'gpus' above 1 must be a whole number, got {gpus}", field="gpus")
        if out["gpu_memory"] and not gpus:
            raise ValidationError("resource 'gpu_memory' needs 'gpus' greater than 0", field="gpu_memory")
        return cls(cpus=float(out["cpus"]), memory=int(out["memory"]), gpus=float(gpus), gpu_memory=int(out["gpu_memory"]))

    def to_dict(self) -> dict[str, Any]:
        """The plain map stored with a job."""
        return {"cpus": self.cpus, "memory": self.memory, "gpus": self.gpus, "gpu_memory": self.gpu_memory}


class Runner:
    """Base class for runners: the worker calls ``setup``, ``run`` and ``teardown`` in order.

    ``run`` returns the job's result (anything msgpack and JSON can carry: maps, lists, numbers,
    strings). Raising fails the job with the exception as its reason; returning while
    ``ctx.cancelled`` is set ends it as cancelled. ``teardown`` runs however ``run`` ended.
    """

    def setup(self, ctx: JobContext) -> None:
        """Prepare (load models, open files). Runs before ``run``."""

    def run(self, ctx: JobContext) -> Any:
        """Do the job's work and return its result."""
        raise NotImplementedError

    def teardown(self, ctx: JobContext) -> None:
        """Release what ``setup`` took. Runs after ``run``, also when it raised."""


def resolve_runner(runner: type | str) -> type:
    """The runner class, importing ``"module:Class"`` strings on first use."""
    if isinstance(runner, str):
        module_name, _, attr = runner.partition(":")
        if not attr:
            raise ValueError(f"runner {runner!r} must look like 'package.module:Class'")
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    return runner


@dataclass(frozen=True)
class JobKind:
    """A kind of job a plugin offers: its name, parameter schema, default resources and runner."""

    name: str
    runner: type | str
    params: type = NoParams
    resources: Resources = field(default_factory=Resources)
    help: str = ""
    #: Optional ``check(params) -> None`` run by the kernel at submit (torch-free): raise ValueError
    #: to refuse the job with that message, for rules a schema cannot say (a path must exist).
    check: Any = None
    #: Jobs of this kind may be preempted by default: stopped (``ctx.preempted``) for a job of higher
    #: priority that cannot fit otherwise, then queued again. Say True when the runner checkpoints
    #: on stop and resumes from its checkpoint on the next attempt.
    preemptible: bool = False
    #: The name of an integer parameter that says how many processes (ranks) a job of this kind
    #: runs under torch.distributed, or None. The kernel then treats the job as one gang: resources
    #: the submitter did not set scale with the ranks, a job whose ranks cannot each get a device
    #: of their own is refused at submit, and at start the kernel splits the placement among the
    #: ranks and picks the rendezvous address (``ctx.distributed``; the usual ``MASTER_ADDR``,
    #: ``MASTER_PORT``, ``WORLD_SIZE`` and ``RANK`` in the environment of rank 0, the job's worker).
    ranks: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"job kind name must be a non-empty string without spaces, got {self.name!r}")
        if not isinstance(self.resources, Resources):
            raise TypeError(f"job kind {self.name!r}: resources must be llmos.Resources, got {type(self.resources).__name__}")
        if not isinstance(self.runner, str | type):
            raise TypeError(f"job kind {self.name!r}: runner must be a class or 'module:Class', got {self.runner!r}")
        schema_of(self.params)  # fails early on a bad schema or default
        if self.ranks is not None:
            types = {f.name: f.type for f in dataclasses.fields(self.params)}
            if types.get(self.ranks) not in (int, "int"):
                raise TypeError(f"job kind {self.name!r}: ranks={self.ranks!r} must name an int parameter of {self.params.__name__}")


@dataclass(frozen=True)
class ServiceKind(JobKind):
    """A long-lived worker (a monitor, an inference server): a job kind that runs until cancelled,
    is restarted when it fails, and with ``autostart`` is started by the kernel at boot.

    ``config`` names the config section that configures the autostarted service: its
    ``autostart = false`` keeps the service stopped, and its keys that are parameters of the kind
    become the parameters it is started with. ``reports_usage`` lets its jobs send the kernel
    measured usage (``UsageReport``), which the kernel publishes, exports and enforces."""

    autostart: bool = False
    config: str | None = None
    reports_usage: bool = False


__all__ = ["RESOURCE_KEYS", "JobKind", "Resources", "Runner", "ServiceKind", "hookimpl", "resolve_runner"]
