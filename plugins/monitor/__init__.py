"""monitor: the service that measures what the machine and each job really use.

Every ``interval`` seconds it samples the node (CPU %, RAM), each running job's whole process
tree (CPU, resident memory) and, through NVML when there is one, each GPU (utilization, memory,
temperature, power, and memory per process, so per job). It reports to the kernel, which keeps
the figures beside the reservations in the device table, publishes ``device.<id>.metrics`` and
``job.<id>.usage`` events, and exports them to Prometheus.
"""

from __future__ import annotations

from dataclasses import dataclass

import llmos
from llmos import Resources, ServiceKind, param

LLMOS_API = ">=1,<2"


@dataclass(frozen=True)
class MonitorParams:
    interval: float = param(2.0, ge=0.05, le=3600, help="Seconds between samples.")


@llmos.hookimpl
def llmos_register_services(register) -> None:  # type: ignore[no-untyped-def]
    register(ServiceKind("monitor", runner="llmos.plugins.monitor.sampler:MonitorRunner", params=MonitorParams, resources=Resources(cpus=0), autostart=True, config="monitor", reports_usage=True,
                         help="Sample node, job and GPU usage; the kernel publishes and exports it."))


@llmos.hookimpl
def llmos_register_commands(register) -> None:  # type: ignore[no-untyped-def]
    from llmos.plugins.monitor.top import top_command

    register(top_command)
