"""The Prometheus exporter. The loop owns the kernel's state; the exporter's HTTP thread never
touches it. A scrape asks for a :class:`Snapshot` (through a pipe the loop polls), the loop builds
one at the end of its turn and hands it over, and the collector reads only that.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from llmos.errors import ConfigError

__all__ = ["DeviceView", "Exporter", "Snapshot"]


@dataclass(frozen=True, slots=True)
class DeviceView:
    id: str
    kind: str
    memory_total: int
    memory_reserved: int
    share_reserved: float
    used: dict[str, float]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the exporter shows, as the loop saw it at the end of a turn."""

    jobs: dict[str, int] = field(default_factory=dict)  # by state, ended ones included
    queue_depth: int = 0
    events_journaled: int = 0
    workers_alive: int = 0
    devices: tuple[DeviceView, ...] = ()
    running: tuple[tuple[int, str, dict[str, Any]], ...] = ()  # (job id, kind, measured usage)


class KernelCollector:
    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Metric]:
        s = self.exporter.fresh_snapshot()
        jobs = GaugeMetricFamily("llmos_jobs", "Jobs by state.", labels=["state"])
        for state, n in s.jobs.items():
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily("llmos_queue_depth", "Jobs waiting to run.", value=s.queue_depth)
        yield CounterMetricFamily("llmos_events_journaled", "Events journaled since the kernel started.", value=s.events_journaled)
        yield GaugeMetricFamily("llmos_workers", "Worker processes alive.", value=s.workers_alive)
        mem = GaugeMetricFamily("llmos_device_memory_bytes", "Device memory: total, reserved by jobs, and used (measured).", labels=["device", "kind"])
        share = GaugeMetricFamily("llmos_device_share_reserved", "Cores (CPU) or fraction (GPU) reserved by jobs.", labels=["device"])
        util = GaugeMetricFamily("llmos_gpu_utilization_ratio", "GPU utilization, 0 to 1 (measured).", labels=["device"])
        cpu_pct = GaugeMetricFamily("llmos_node_cpu_ratio", "Node CPU utilization, 0 to 1 (measured).")
        for dev in s.devices:
            mem.add_metric([dev.id, "total"], dev.memory_total)
            mem.add_metric([dev.id, "reserved"], dev.memory_reserved)
            if "memory_used" in dev.used:
                mem.add_metric([dev.id, "used"], dev.used["memory_used"])
            share.add_metric([dev.id], dev.share_reserved)
            if dev.kind == "gpu" and "utilization" in dev.used:
                util.add_metric([dev.id], dev.used["utilization"])
            if dev.kind == "cpu" and "cpu_percent" in dev.used:
                cpu_pct.add_metric([], dev.used["cpu_percent"] / 100.0)
        yield from (mem, share, util, cpu_pct)
        job_cpu = GaugeMetricFamily("llmos_job_cpu_ratio", "A running job's CPU use in cores (measured).", labels=["job", "kind"])
        job_rss = GaugeMetricFamily("llmos_job_resident_memory_bytes", "A running job's resident memory (measured).", labels=["job", "kind"])
        job_gpu = GaugeMetricFamily("llmos_job_gpu_memory_bytes", "A running job's GPU memory (measured).", labels=["job", "kind"])
        for job_id, kind, usage in s.running:
            labels = [str(job_id), kind]
            job_cpu.add_metric(labels, usage.get("cpu_percent", 0.0) / 100.0)
            job_rss.add_metric(labels, usage.get("rss", 0))
            if usage.get("gpu_memory") is not None:
                job_gpu.add_metric(labels, usage["gpu_memory"])
        yield from (job_cpu, job_rss, job_gpu)


class Exporter:
    """The registry, the duration histogram the kernel feeds, and the HTTP server."""

    def __init__(self, take_snapshot: Callable[[], Snapshot]) -> None:
        self.take_snapshot = take_snapshot  # called by the loop thread only
        self.snapshot = Snapshot()
        self._fresh = threading.Event()
        self._lock = threading.Lock()  # one scrape asks at a time
        self.wake_r, self._wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(KernelCollector(self))  # type: ignore[arg-type]
        self.durations = Histogram(
            "llmos_job_duration_seconds", "Wall time of finished jobs, from first start to end.", ["kind", "state"],
            registry=self.registry, buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800, 3600, 21600, 86400),
        )
        self.server: Any = None
        self.url: str | None = None

    def fresh_snapshot(self, wait: float = 1.0) -> Snapshot:
        """(In the HTTP thread.) Ask the loop for a snapshot and wait for it; the last one if the
        loop is busier than ``wait`` seconds."""
        with self._lock:
            self._fresh.clear()
            try:
                os.write(self._wake_w, b"s")
            except OSError:
                return self.snapshot
            self._fresh.wait(wait)
            return self.snapshot

    def serve_snapshot(self) -> None:
        """(In the loop thread, when ``wake_r`` is readable.) Publish a snapshot for the scrape."""
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self.snapshot = self.take_snapshot()
        self._fresh.set()

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
            self._fresh.set()
            self.server.shutdown()
            self.server.server_close()
        for fd in (self.wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
