"""Usage: what each try of a job used (accounted when both its end and its worker's exit are
known), and the live measurements a ``reports_usage`` service (the monitor) sends each interval
(its RSS is handed on to the memory limits, kernel/limits.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import structlog

from llmos.errors import ProtocolError
from llmos.kernel.control import Request
from llmos.kernel.devices import DeviceTable
from llmos.kernel.plugins import Registry
from llmos.kernel.store import JobRecord, Store
from llmos.kernel.supervisor import WorkerProc
from llmos.protocol import (
    AcctReply,
    AcctRequest,
    DeviceMetrics,
    JobLog,
    JobUsage,
    UsageReport,
    encode_body,
)
from llmos.units import format_size

log = structlog.get_logger("llmos.kernel")

__all__ = ["Usage"]


class Usage:
    def __init__(
        self, store: Store, devices: DeviceTable, jobs: Mapping[int, JobRecord], workers: Mapping[str, WorkerProc],
        registry: Callable[[], Registry], emit: Callable[[str, Any], None], stop_job: Callable[[JobRecord, str, str], None], gpu_overuse_stop: float,
        on_usage: Callable[[JobRecord, JobUsage], None] | None = None,
    ) -> None:
        self.store, self.devices, self.jobs, self.workers = store, devices, jobs, workers
        self.registry, self.emit, self.stop_job = registry, emit, stop_job
        self.gpu_overuse_stop = gpu_overuse_stop
        self.on_usage = on_usage  # the memory limits' check of what a job was measured using

    def handlers(self) -> dict[type, Any]:
        return {AcctRequest: self._on_acct, UsageReport: self._on_report}

    def try_ended(self, worker: WorkerProc | None, job: JobRecord, ended: float) -> None:
        """Note what the try held (its CPU time and memory come when the worker is reaped)."""
        if worker is None or not worker.attempt or worker.attempt[0] != job.id:
            return
        gpus = (job.placement or {}).get("gpus", [])
        # Peak GPU memory: as measured by the monitor where it could (NVML), else what was reserved.
        gpu_memory = job.peak_gpu_memory if job.peak_gpu_memory is not None else max((g["memory"] for g in gpus), default=0)
        worker.attempt = (*worker.attempt[:3], ended, sum(g["share"] for g in gpus), gpu_memory)  # type: ignore[assignment]
        self.account(worker)

    def account(self, worker: WorkerProc | None) -> None:
        """Record a try's usage once both its end and its worker's exit are known."""
        if worker is None or worker.attempt is None or len(worker.attempt) < 6 or worker.rusage is None:
            return
        job_id, attempt, started, ended, gpu_share, gpu_memory = worker.attempt  # type: ignore[misc]
        usage = worker.rusage
        cpu = usage.ru_utime + usage.ru_stime
        self.store.record_attempt(job_id, attempt, started, ended, cpu, usage.ru_maxrss * 1024, gpu_share * max(0.0, ended - started), gpu_memory)
        worker.attempt = None

    def _on_acct(self, req: Request) -> AcctReply:
        msg: AcctRequest = req.msg
        kinds = self.registry().kinds
        rows = self.store.accounting(msg.since, max(1, min(msg.limit, 100_000)))
        for row in rows:
            entry = kinds.get(row["kind"])
            row["plugin"] = entry.plugin if entry else None
        return AcctReply(jobs=rows)

    def _on_report(self, req: Request) -> None:
        msg: UsageReport = req.msg
        worker = self.workers.get(req.sender)
        job = self.jobs.get(worker.job_id) if worker and worker.job_id is not None else None
        entry = self.registry().kinds.get(job.kind) if job is not None else None
        if entry is None or not getattr(entry.spec, "reports_usage", False):
            raise ProtocolError("usage reports come only from a service registered with reports_usage=True")
        self.devices.cpu.used = {k: v for k, v in msg.node.items() if isinstance(v, int | float)}
        self.emit("device.cpu.metrics", DeviceMetrics(used=self.devices.cpu.used))
        by_index = {g.index: g for g in self.devices.gpus if not g.fake}
        for sample in msg.gpus:
            dev = by_index.get(sample.get("index"))
            if dev is not None:
                dev.used = {k: v for k, v in sample.items() if k != "index" and isinstance(v, int | float)}
                self.emit(f"device.{dev.id}.metrics", DeviceMetrics(used=dev.used))
        for key, usage in msg.jobs.items():
            running = self.jobs.get(int(key)) if key.isdigit() else None
            if running is None or running.state != "running":
                continue  # it ended since the sample: skipped, not an error
            body = JobUsage(
                cpu_percent=float(usage.get("cpu_percent", 0.0)), rss=int(usage.get("rss", 0)),
                processes=int(usage.get("processes", 0)), gpu_memory=usage.get("gpu_memory"),
            )
            running.usage = encode_body(body)
            if body.gpu_memory is not None:
                running.peak_gpu_memory = max(running.peak_gpu_memory or 0, int(body.gpu_memory))
            self.emit(f"job.{running.id}.usage", body)
            self._check_gpu_overuse(running, body)
            if self.on_usage is not None:
                self.on_usage(running, body)

    def _check_gpu_overuse(self, job: JobRecord, usage: JobUsage) -> None:
        reserved = sum(g["memory"] for g in (job.placement or {}).get("gpus", []))
        if usage.gpu_memory is None or usage.gpu_memory <= reserved:
            return
        what = f"job {job.id} uses {format_size(usage.gpu_memory)} of GPU memory; it reserved {format_size(reserved)}"
        log.warning("gpu_memory_overuse", job_id=job.id, used=usage.gpu_memory, reserved=reserved)
        self.emit(f"job.{job.id}.log", JobLog(level="warning", event="gpu_memory_overuse", logger="llmos.kernel", fields={"used": usage.gpu_memory, "reserved": reserved}))
        factor = self.gpu_overuse_stop
        if factor > 0 and usage.gpu_memory > reserved * factor:
            self.stop_job(job, f"stopped: {what}", "failed")
