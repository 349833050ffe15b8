"""The monitor's sampling loop (runs in its worker)."""

from __future__ import annotations

import os
from typing import Any

import psutil

import llmos
from llmos.protocol import UsageReport


class _Nvml:
    """GPU figures through NVML, or nothing at all (absent fields, never zeros) without it."""

    def __init__(self) -> None:
        self.ok = False
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv = pynvml
            self.count = pynvml.nvmlDeviceGetCount()
            self.ok = True
        except Exception:
            self.count = 0

    def sample(self) -> tuple[list[dict[str, Any]], dict[int, int]]:
        """Per GPU (by index) figures, and GPU memory per pid."""
        if not self.ok:
            return [], {}
        nv, gpus, per_pid = self.nv, [], {}
        for i in range(self.count):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            entry: dict[str, Any] = {"index": i}
            for key, fn in (
                ("utilization", lambda h=h: nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0),
                ("memory_used", lambda h=h: int(nv.nvmlDeviceGetMemoryInfo(h).used)),
                ("temperature", lambda h=h: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))),
                ("power_watts", lambda h=h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
            ):
                try:
                    entry[key] = fn()
                except Exception:
                    pass  # a field this GPU cannot report stays absent
            try:
                for proc in nv.nvmlDeviceGetComputeRunningProcesses(h):
                    per_pid[int(proc.pid)] = per_pid.get(int(proc.pid), 0) + int(proc.usedGpuMemory or 0)
            except Exception:
                pass
            gpus.append(entry)
        return gpus, per_pid


class MonitorRunner(llmos.Runner):
    def run(self, ctx: llmos.JobContext) -> dict[str, Any]:
        interval = ctx.params.interval
        nvml = _Nvml()
        client = llmos.connect(os.environ.get("LLMOS_STATE_DIR"))
        procs: dict[int, psutil.Process] = {}  # kept between samples: cpu_percent needs a previous call
        psutil.cpu_percent(None)
        samples = 0
        try:
            while not ctx.wait_cancelled(interval):
                report = self.sample(client, nvml, procs)
                ctx.send_to_kernel(report)
                samples += 1
        finally:
            client.close()
        return {"samples": samples}

    def sample(self, client: llmos.Client, nvml: _Nvml, procs: dict[int, psutil.Process]) -> UsageReport:
        mem = psutil.virtual_memory()
        node = {"cpu_percent": psutil.cpu_percent(None), "memory_used": int(mem.total - mem.available), "memory_total": int(mem.total)}
        gpus, gpu_by_pid = nvml.sample()
        jobs: dict[str, dict[str, Any]] = {}
        seen: set[int] = set()
        for info in client.jobs(state="running"):
            if not info.worker_pid:
                continue
            cpu, rss, gpu_mem, n = 0.0, 0, 0, 0
            try:
                root = psutil.Process(info.worker_pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue  # the job's processes vanished between the listing and now
            for p in tree:
                proc = procs.setdefault(p.pid, p)
                seen.add(p.pid)
                try:
                    with proc.oneshot():
                        cpu += proc.cpu_percent(None)
                        rss += proc.memory_info().rss
                    n += 1
                except psutil.Error:
                    continue
                gpu_mem += gpu_by_pid.get(p.pid, 0)
            usage: dict[str, Any] = {"cpu_percent": cpu, "rss": rss, "processes": n}
            if nvml.ok:
                usage["gpu_memory"] = gpu_mem
            jobs[str(info.id)] = usage
        for pid in list(procs):
            if pid not in seen:
                del procs[pid]
        return UsageReport(node=node, gpus=gpus, jobs=jobs)
