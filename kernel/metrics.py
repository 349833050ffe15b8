"""The Prometheus exporter: the kernel's state, read at scrape time (in the exporter's thread).

The collector only reads in-memory structures the kernel thread owns; it copies before it
iterates, and a scrape that races a change just tries again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from llmos.errors import ConfigError
from llmos.protocol import JOB_STATES

if TYPE_CHECKING:
    from llmos.kernel.server import Kernel


class KernelCollector:
    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    def collect(self) -> Iterator[Metric]:
        for _ in range(5):
            try:
                yield from self._collect()
                return
            except RuntimeError:  # a dict changed size under us: read again
                continue

    def _collect(self) -> list[Metric]:
        k = self.kernel
        out: list[Metric] = []
        jobs = GaugeMetricFamily("llmos_jobs", "Jobs by state.", labels=["state"])
        counts = dict.fromkeys(JOB_STATES, 0)
        counts.update(dict(k._ended_counts))
        active = list(k.jobs.values())
        for job in active:
            counts[job.state] = counts.get(job.state, 0) + 1
        for state, n in counts.items():
            jobs.add_metric([state], n)
        out.append(jobs)
        out.append(GaugeMetricFamily("llmos_queue_depth", "Jobs waiting to run.", value=sum(1 for j in active if j.state == "pending")))
        out.append(CounterMetricFamily("llmos_events_journaled", "Events journaled since the kernel started.", value=k.stats["events_journaled"]))
        out.append(GaugeMetricFamily("llmos_workers", "Worker processes alive.", value=sum(1 for w in list(k.workers.values()) if w.alive)))
        mem = GaugeMetricFamily("llmos_device_memory_bytes", "Device memory: total, reserved by jobs, and used (measured).", labels=["device", "kind"])
        share = GaugeMetricFamily("llmos_device_share_reserved", "Cores (CPU) or fraction (GPU) reserved by jobs.", labels=["device"])
        util = GaugeMetricFamily("llmos_gpu_utilization_ratio", "GPU utilization, 0 to 1 (measured).", labels=["device"])
        cpu_pct = GaugeMetricFamily("llmos_node_cpu_ratio", "Node CPU utilization, 0 to 1 (measured).")
        for dev in list(k.devices.devices):
            mem.add_metric([dev.id, "total"], dev.memory_total)
            mem.add_metric([dev.id, "reserved"], dev.memory_reserved)
            used = dict(dev.used)
            if "memory_used" in used:
                mem.add_metric([dev.id, "used"], used["memory_used"])
            share.add_metric([dev.id], dev.share_reserved)
            if dev.kind == "gpu" and "utilization" in used:
                util.add_metric([dev.id], used["utilization"])
            if dev.kind == "cpu" and "cpu_percent" in used:
                cpu_pct.add_metric([], used["cpu_percent"] / 100.0)
        out += [mem, share, util, cpu_pct]
        job_cpu = GaugeMetricFamily("llmos_job_cpu_ratio", "A running job's CPU use in cores (measured).", labels=["job", "kind"])
        job_rss = GaugeMetricFamily("llmos_job_resident_memory_bytes", "A running job's resident memory (measured).", labels=["job", "kind"])
        job_gpu = GaugeMetricFamily("llmos_job_gpu_memory_bytes", "A running job's GPU memory (measured).", labels=["job", "kind"])
        for job in active:
            usage = job.usage
            if not usage or job.state != "running":
                continue
            labels = [str(job.id), job.kind]
            job_cpu.add_metric(labels, usage.get("cpu_percent", 0.0) / 100.0)
            job_rss.add_metric(labels, usage.get("rss", 0))
            if usage.get("gpu_memory") is not None:
                job_gpu.add_metric(labels, usage["gpu_memory"])
        out += [job_cpu, job_rss, job_gpu]
        return out


class Exporter:
    """The registry, the duration histogram the kernel feeds, and the HTTP server."""

    def __init__(self, kernel: Kernel) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(KernelCollector(kernel))  # type: ignore[arg-type]
        self.durations = Histogram(
            "llmos_job_duration_seconds", "Wall time of finished jobs, from first start to end.", ["kind", "state"],
            registry=self.registry, buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800, 3600, 21600, 86400),
        )
        self.server: Any = None
        self.url: str | None = None

    def start(self, address: str) -> str:
        from prometheus_client import start_http_server

        host, _, port_text = address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"monitor.exporter must be host:port, got {address!r}") from None
        try:
            self.server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot start the Prometheus exporter on {host}:{port}: {exc.strerror or exc}", address=address) from None
        bound = self.server.server_address[1]
        self.url = f"http://{host}:{bound}/metrics"
        return self.url

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
