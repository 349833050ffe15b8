"""The device table: what the machine has, what each job holds, and best-fit placement; and the
probe that finds the GPUs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from llmos.errors import ConfigError, ResourceError
from llmos.plugin import Resources
from llmos.units import format_size, parse_size

_EPS = 1e-9


@dataclass
class Device:
    """One device: the CPU (cores and RAM) or a GPU (a share of 1.0 and its memory)."""

    id: str
    kind: str  # "cpu" | "gpu"
    name: str
    memory_total: int
    capacity: float  # cores for the CPU, 1.0 for a GPU
    index: int | None = None
    fake: bool = False
    share_reserved: float = 0.0
    memory_reserved: int = 0
    holders: dict[int, tuple[float, int]] = field(default_factory=dict)
    used: dict[str, Any] = field(default_factory=dict)  # what the monitor measured last

    @property
    def share_free(self) -> float:
        return self.capacity - self.share_reserved

    @property
    def memory_free(self) -> int:
        return self.memory_total - self.memory_reserved

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            "index": self.index,
            "fake": self.fake,
            "capacity": self.capacity,
            "memory_total": self.memory_total,
            "memory_reserved": self.memory_reserved,
            "share_reserved": round(self.share_reserved, 9),
            "jobs": sorted(self.holders),
            "used": dict(self.used),
        }


def parse_fake_gpus(spec: str) -> list[int]:
    """``"2x24GiB"`` or ``"24GiB,16GiB"`` -> memory sizes in bytes."""
    spec = spec.strip()
    if not spec:
        return []
    sizes: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)\s*[xX]\s*(.+)", part)
        count, size_text = (int(match.group(1)), match.group(2)) if match else (1, part)
        try:
            size = parse_size(size_text)
        except ValueError:
            size = 0
        if count < 1 or count > 64 or size <= 0:
            raise ConfigError(f"fake GPUs {spec!r}: expected COUNTxSIZE (like 2x24GiB) or a comma list of sizes", value=spec)
        sizes.extend([size] * count)
    return sizes


class DeviceTable:
    """Capacity and reservations of every device, and placement of resource requests."""

    def __init__(self, cpu_cores: float, ram: int, fake_gpus: list[int] | None = None, *, node: str | None = None) -> None:
        #: The cluster node this table is one of (its devices' ids start with "<node>:"), or None on one machine.
        self.node = node
        self._prefix = f"{node}:" if node else ""
        self.cpu = Device(id=f"{self._prefix}cpu", kind="cpu", name="cpu", memory_total=int(ram), capacity=float(cpu_cores))
        self.gpus: list[Device] = []
        self.probing = False
        self.probe_source: str | None = None
        for size in fake_gpus or []:
            self._add_gpu(f"fake GPU {format_size(size)}", size, fake=True)

    def _add_gpu(self, name: str, memory: int, *, fake: bool, index: int | None = None) -> None:
        n = len(self.gpus)
        self.gpus.append(Device(id=f"{self._prefix}gpu{n}", kind="gpu", name=name, memory_total=int(memory), capacity=1.0, index=n if index is None else index, fake=fake))

    def add_probed(self, gpus: list[dict[str, Any]], source: str) -> None:
        """Put probed real GPUs first (their CUDA indices), fake ones after."""
        fakes = [g for g in self.gpus if g.fake]
        self.gpus = []
        for g in gpus:
            self._add_gpu(str(g.get("name", "gpu")), int(g.get("memory_total", 0)), fake=False, index=int(g["index"]))
        for g in fakes:
            self._add_gpu(g.name, g.memory_total, fake=True)
        self.probe_source = source
        self.probing = False

    @property
    def devices(self) -> list[Device]:
        return [self.cpu, *self.gpus]

    def to_list(self) -> list[dict[str, Any]]:
        if self.node is None:
            return [d.to_dict() for d in self.devices]
        return [{**d.to_dict(), "node": self.node} for d in self.devices]

    # -- requests --

    @staticmethod
    def _gpu_need(res: Resources, dev: Device) -> int:
        if res.gpu_memory:
            return res.gpu_memory
        if res.gpus < 1:
            return int(dev.memory_total * res.gpus)
        return dev.memory_total

    def needs_probe(self, res: Resources) -> bool:
        """Whether only the GPU probe, still running, can say if ``res`` ever fits."""
        if not self.probing or res.gpus <= 0:
            return False
        want = 1 if res.gpus < 1 else int(res.gpus)
        return sum(self._gpu_need(res, g) <= g.memory_total for g in self.gpus) < want

    def never_fits(self, res: Resources, ranks: int = 1) -> str | None:
        """Why ``res`` can never be placed here, or None if it could be (on an idle machine)."""
        have = f"{f'node {self.node}' if self.node else 'this machine'} has {self.cpu.capacity:g} CPU cores, {format_size(self.cpu.memory_total)} RAM"
        gpus_desc = ", ".join(f"{g.id} {format_size(g.memory_total)}{' (fake)' if g.fake else ''}" for g in self.gpus) or "no GPUs"
        have += f" and {gpus_desc}"
        if res.cpus > self.cpu.capacity + _EPS:
            if ranks > 1:
                return f"its {ranks} ranks ask for {res.cpus:g} CPU cores together ({res.cpus / ranks:g} each, a core of its own at least); {have}"
            return f"asked for {res.cpus:g} CPU cores; {have}"
        if res.memory > self.cpu.memory_total:
            return f"asked for {format_size(res.memory)} RAM; {have}"
        if res.gpus > 0:
            want = 1 if res.gpus < 1 else int(res.gpus)
            fitting = [g for g in self.gpus if self._gpu_need(res, g) <= g.memory_total]
            if len(fitting) < want:
                if self.probing:
                    return None  # real GPUs may still appear
                mem = f" with {format_size(res.gpu_memory)} each" if res.gpu_memory else ""
                return f"asked for {res.gpus:g} GPU(s){mem}; {have}"
        return None

    def why_waiting(self, res: Resources) -> str:
        """Why ``res`` does not fit now, and who holds what it waits for (for a pending job's reason)."""
        def holders(dev: Device) -> str:
            jobs = sorted(dev.holders)
            if not jobs:
                return ""
            return f", held by job{'s' if len(jobs) > 1 else ''} {', '.join(map(str, jobs[:5]))}{' ...' if len(jobs) > 5 else ''}"

        where = f" on node {self.node}" if self.node else ""
        cpu = self.cpu
        if res.cpus > cpu.share_free + _EPS:
            return f"waiting for {res.cpus:g} CPU core{'s' if res.cpus != 1 else ''}{where}: {max(0.0, cpu.share_free):g} free of {cpu.capacity:g}{holders(cpu)}"
        if res.memory > cpu.memory_free:
            return f"waiting for {format_size(res.memory)} RAM{where}: {format_size(max(0, cpu.memory_free))} free{holders(cpu)}"
        if res.gpus > 0:
            if self.probing:
                return "waiting for the GPU probe to finish"
            want = 1 if res.gpus < 1 else int(res.gpus)
            need = f" with {format_size(res.gpu_memory)} free" if res.gpu_memory else (" to itself" if res.gpus >= 1 else f" with a {res.gpus:g} share free")
            busy = [g for g in self.gpus if g.holders]
            held = sorted({j for g in busy for j in g.holders})
            return (f"waiting for {want} GPU{'s' if want > 1 else ''}{need}{where}: {len(self.gpus) - len(busy)} of {len(self.gpus)} idle"
                    + (f", the others held by job{'s' if len(held) > 1 else ''} {', '.join(map(str, held[:5]))}" if held else ""))
        return "waiting for room"

    def place(self, res: Resources, ranks: int = 1) -> dict[str, Any] | None:
        """A placement for ``res`` (all ``ranks`` of a gang on this machine) on what is free now, or None: real GPUs before fake ones (fake GPUs
        simulate placement; a job on a machine with real ones wants a real one), then best fit by bytes."""
        if res.cpus > self.cpu.share_free + _EPS or res.memory > self.cpu.memory_free:
            return None
        placement: dict[str, Any] = {"cpu": {"cores": res.cpus, "memory": res.memory}, "gpus": []}
        if res.gpus <= 0:
            return placement
        if self.probing:
            return None  # GPU jobs wait for the probe, which renumbers the GPUs (real ones first)
        if res.gpus < 1:
            best = None
            for dev in self.gpus:
                need = self._gpu_need(res, dev)
                if dev.share_free + _EPS >= res.gpus and dev.memory_free >= need:
                    key = (dev.fake, dev.memory_free - need)  # a real GPU before a fake one, then best fit
                    if best is None or key < best[0]:
                        best = (key, dev, need)
            if best is None:
                return None
            _, dev, need = best
            placement["gpus"] = [{"id": dev.id, "index": dev.index, "share": res.gpus, "memory": need, "fake": dev.fake}]
            return placement
        want = int(res.gpus)
        candidates = []
        for dev in self.gpus:
            need = self._gpu_need(res, dev)
            if dev.share_reserved <= _EPS and dev.memory_free >= need:
                candidates.append(((dev.fake, dev.memory_free - need, dev.index or 0), dev, need))
        if len(candidates) < want:
            return None
        candidates.sort(key=lambda c: c[0])  # real GPUs before fake ones, then best fit, then index
        placement["gpus"] = [{"id": d.id, "index": d.index, "share": 1.0, "memory": need, "fake": d.fake} for _, d, need in candidates[:want]]
        return placement

    def reserve(self, job_id: int, placement: dict[str, Any]) -> None:
        cpu = placement.get("cpu", {})
        self._hold(self.cpu, job_id, float(cpu.get("cores", 0)), int(cpu.get("memory", 0)))
        by_id = {g.id: g for g in self.gpus}
        for g in placement.get("gpus", []):
            dev = by_id.get(g["id"])
            if dev is not None:
                self._hold(dev, job_id, float(g["share"]), int(g["memory"]))

    def _hold(self, dev: Device, job_id: int, share: float, memory: int) -> None:
        if job_id in dev.holders:
            return
        dev.holders[job_id] = (share, memory)
        dev.share_reserved += share
        dev.memory_reserved += memory

    def release(self, job_id: int) -> None:
        """Give back everything ``job_id`` holds (safe to call twice)."""
        for dev in self.devices:
            held = dev.holders.pop(job_id, None)
            if held is not None:
                dev.share_reserved = max(0.0, dev.share_reserved - held[0])
                dev.memory_reserved = max(0, dev.memory_reserved - held[1])

    def check(self, res: Resources, ranks: int = 1) -> None:
        """ResourceError if ``res`` (all its ``ranks``) can never fit on this machine."""
        why = self.never_fits(res, ranks)
        if why:
            raise ResourceError(f"the request can never fit: {why}", requested=res.to_dict(), available=self.to_list())


__all__ = ["Device", "DeviceTable", "parse_fake_gpus"]


class GpuProbe:
    """The GPU probe: ``python -m llmos.kernel.probe`` in a child process (so the kernel never
    imports torch or NVML), read once it exits or after ``timeout`` seconds."""

    def __init__(self, timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmos.kernel.probe"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            # GPU indices in PCI bus order, NVML's order: the same numbers in CUDA_VISIBLE_DEVICES.
            env=dict(os.environ, CUDA_DEVICE_ORDER="PCI_BUS_ID"),
        )
        self.deadline = time.monotonic() + timeout

    @property
    def pid(self) -> int:
        return self.proc.pid

    def reaped(self, status: int) -> None:
        """The kernel reaped it (its SIGCHLD handling waits for every child)."""
        self.proc.returncode = os.waitstatus_to_exitcode(status)

    def result(self) -> tuple[list[dict[str, Any]], str] | None:
        """(gpus, source) once the probe is done (or given up on: no GPUs), else None."""
        proc = self.proc
        if proc.poll() is None and time.monotonic() < self.deadline:
            return None
        if proc.returncode is None:
            proc.kill()
        try:
            out = proc.stdout.read() if proc.stdout else b""
            result = json.loads(out or b"{}")
            gpus = [g for g in result.get("gpus", []) if isinstance(g, dict) and isinstance(g.get("index"), int)]
            source = result.get("source", "none")
        except Exception:
            gpus, source = [], "none"
        return gpus, source

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
