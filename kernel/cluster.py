"""More than one machine: the device table of a Ray cluster, and the link to the cluster.

With ``[cluster] backend = "ray"`` (``llmos boot --ray ADDRESS``) the kernel keeps everything it
keeps on one machine — the job table, the journal, placement by bytes, accounting — and Ray only
starts processes where the kernel placed them:

* :class:`ClusterTable` is the device table: one :class:`~llmos.kernel.devices.DeviceTable` per
  Ray node (its CPUs, memory and GPUs, probed on that node; fake GPUs from the node's
  ``llmos_fake_gpus`` resource), with the same interface the scheduler uses on one machine.
  Placement is best fit by bytes across every node's devices; the placement names its node.
* :class:`Cluster` runs the kernel's Ray driver, ``python -m llmos.kernel.ray_agent``, a child that
  speaks JSON lines (the kernel never imports Ray), launches a worker for each job on its node (a
  placement group with the job's bundle there and an actor pinned to it that runs the llmos worker,
  which reaches the kernel's bus over CurveZMQ TCP), follows nodes joining and leaving, and turns
  a lost node into the end of its workers ("node <id> lost").
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import structlog

from llmos.errors import ResourceError
from llmos.kernel.devices import Device, DeviceTable
from llmos.kernel.supervisor import Pool, WorkerProc
from llmos.keys import ClientKey
from llmos.plugin import Resources
from llmos.protocol import ClusterChanged, NodeChanged
from llmos.units import format_size

log = structlog.get_logger("llmos.kernel")

__all__ = ["Cluster", "ClusterTable", "RankHost", "ray_host"]


def ray_host(address: str) -> str:
    """The host the kernel listens on for a cluster at ``address``: the GCS's host, or for
    "auto" the host of the cluster ``ray start`` made on this machine (its address file)."""
    if address and address != "auto":
        host = address.rpartition(":")[0] if ":" in address else address
        return host.removeprefix("ray://") or "127.0.0.1"
    try:
        text = Path("/tmp/ray/ray_current_cluster").read_text().strip()
        return text.rpartition(":")[0] or "127.0.0.1"
    except OSError:
        return "127.0.0.1"


class ClusterTable:
    """The devices of every node of the cluster, and placement across them (the interface of
    :class:`DeviceTable`, which the scheduler and the kernel use unchanged)."""

    def __init__(self) -> None:
        self.nodes: dict[str, DeviceTable] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.connected = False  # the first node list has arrived
        #: Nodes where a worker's actor died while Ray still lists them: nothing is placed there
        #: until Ray declares them dead (they leave) or the agent trusts them again.
        self.suspect: set[str] = set()
        self.probe_source: str | None = "ray"
        self._monitor_cpu = Device(id="cpu", kind="cpu", name="cpu", memory_total=0, capacity=0.0)
        # The placement index: nodes by their count of wholly free GPUs, the nodes with a shared
        # GPU, and which node each job holds (so a release touches one node, not all).
        self._buckets: list[dict[str, None]] = []
        self._free_whole: dict[str, int] = {}
        self._partial: dict[str, None] = {}
        self._held: dict[int, list[str]] = {}
        self._cpu_buckets: list[dict[str, None]] = []
        self._cpu_free: dict[str, int] = {}

    # -- nodes --

    def update(self, nodes: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
        """The agent's node list: add the nodes that joined, drop the ones that left (or died).
        Returns (joined, left)."""
        self.connected = True
        alive = {n["id"]: n for n in nodes if n.get("alive")}
        joined = [nid for nid in alive if nid not in self.nodes]
        left = [nid for nid in self.nodes if nid not in alive]
        for nid in left:
            del self.nodes[nid]
            self.info.pop(nid, None)
            self.suspect.discard(nid)
            self._index(nid)
            self._held = {j: [n for n in ns if n != nid] for j, ns in self._held.items()}
        for nid in joined:
            n = alive[nid]
            table = DeviceTable(float(n["cpus"]), int(n["memory"]), list(n.get("fake_gpus") or []), node=nid)
            table.probing = True  # until the probe on that node answers
            self.nodes[nid] = table
            self.info[nid] = {"ray_id": n["ray_id"], "address": n.get("address", "")}
            self._index(nid)
        return joined, left

    def probed(self, node: str, gpus: list[dict[str, Any]], source: str) -> None:
        table = self.nodes.get(node)
        if table is not None:
            table.add_probed([g for g in gpus if isinstance(g, dict) and isinstance(g.get("index"), int)], source)
            self._index(node)

    def forget_all(self) -> list[str]:
        """The cluster went away: every node is gone until it is back."""
        left = list(self.nodes)
        self.nodes.clear()
        self.info.clear()
        self.connected = False
        self._buckets, self._free_whole, self._partial, self._held = [], {}, {}, {}
        self._cpu_buckets, self._cpu_free = [], {}
        return left

    # -- the DeviceTable interface --

    @property
    def probing(self) -> bool:
        return not self.connected or any(t.probing for t in self.nodes.values())

    @property
    def devices(self) -> list[Device]:
        return [d for t in self.nodes.values() for d in t.devices]

    @property
    def gpus(self) -> list[Device]:
        return [g for t in self.nodes.values() for g in t.gpus]

    @property
    def cpu(self) -> Device:
        """The monitor's node samples (kept apart: one monitor cannot speak for every node)."""
        return self._monitor_cpu

    def to_list(self) -> list[dict[str, Any]]:
        return [d for t in self.nodes.values() for d in t.to_list()]

    def needs_probe(self, res: Resources) -> bool:
        if res.gpus <= 0 or not self.probing:
            return False
        return all(t.probing or t.never_fits(res) is not None for t in self.nodes.values())

    def never_fits(self, res: Resources, ranks: int = 1) -> str | None:
        if not self.nodes:
            return None  # no node yet (or the cluster is away): the job waits for one
        reasons = [t.never_fits(res) for t in self.nodes.values()]
        if any(r is None for r in reasons):
            return None
        if ranks > 1:
            per = Resources(cpus=res.cpus / ranks, memory=res.memory // ranks, gpus=res.gpus / ranks if res.gpus else 0.0, gpu_memory=res.gpu_memory)
            room = sum(self._ranks_room(t, per) for t in self.nodes.values())
            if room >= ranks:
                return None  # spread over the nodes, a rank each share
            return (f"its {ranks} ranks ({per.cpus:g} cores, {format_size(per.memory)} RAM and {per.gpus:g} GPUs each) do not fit on one node "
                    f"and the cluster's {len(self.nodes)} nodes hold {room} such ranks at most")
        return f"no node of the cluster ({len(self.nodes)}) can hold it: " + "; ".join(str(r) for r in reasons[:4])

    def why_waiting(self, res: Resources) -> str:
        if not self.nodes:
            return "waiting for the cluster's nodes (none has joined, or the cluster is unavailable)"
        usable = [t for nid, t in self.nodes.items() if nid not in self.suspect]
        if not usable:
            return "waiting for a node that is not suspect (the others are gone)"
        best = max(usable, key=lambda t: (t.cpu.share_free, t.cpu.memory_free))
        return f"no node of {len(self.nodes)} has room now; the freest: {best.why_waiting(res)}"

    @staticmethod
    def _ranks_room(table: DeviceTable, per: Resources) -> int:
        """How many ranks of ``per`` the node holds when idle."""
        if table.never_fits(per) is not None:
            return 0
        counts = [10**6]
        if per.cpus > 0:
            counts.append(int(table.cpu.capacity / per.cpus + 1e-9))
        if per.memory > 0:
            counts.append(table.cpu.memory_total // per.memory)
        if per.gpus >= 1:
            counts.append(len(table.gpus) // int(per.gpus))
        return min(counts)

    def check(self, res: Resources, ranks: int = 1) -> None:
        why = self.never_fits(res, ranks)
        if why:
            raise ResourceError(f"the request can never fit: {why}", requested=res.to_dict(), available=self.to_list())

    def place(self, res: Resources, ranks: int = 1) -> dict[str, Any] | None:
        """Best fit across the nodes, found through an index rather than a scan of every node (a
        pass over 10,000 jobs on 1,000 nodes must stay fast: docs/scale.md):

        * whole GPUs (``gpus >= 1``): the nodes with the fewest wholly free GPUs that still hold
          the request, first (packing whole nodes free for the big gangs), then by bytes;
        * a GPU share: a node whose GPUs are already shared, best fit by bytes, else as above;
        * CPU only: the nodes with the fewest whole free cores that hold it, then by bytes.

        The placement names its node. A gang of ``ranks`` goes on one node when it fits there,
        else each rank (an equal share of the request) where it fits best, the ranks packed on as
        few nodes as that allows: the placement then has ``ranks`` (each rank's node, cores and
        GPUs) and ``parts`` (what it holds on each node)."""
        if res.gpus >= 1:
            found = self._place_in_buckets(res, int(res.gpus))
        elif res.gpus > 0:
            found = self._best_of(self._partial, res) or self._place_in_buckets(res, 1)
        else:
            found = self._place_cpu(res)
        if found is None and ranks > 1:
            return self._spread(res, ranks)
        return found

    def _spread(self, res: Resources, n: int) -> dict[str, Any] | None:
        per = Resources(cpus=res.cpus / n, memory=res.memory // n, gpus=res.gpus / n if res.gpus else 0.0, gpu_memory=res.gpu_memory)
        ranks: list[dict[str, Any]] = []
        held: list[int] = []
        try:
            for r in range(n):
                p = self.place(per)
                if p is None:
                    return None
                held.append(-(10**12) - r)  # held for the rest of this search only
                self.reserve(held[-1], p)
                ranks.append({"node": p["node"], "cpu": p["cpu"], "gpus": p["gpus"]})
        finally:
            for tid in held:
                self.release(tid)
        parts: dict[str, dict[str, Any]] = {}
        for rank in ranks:
            part = parts.setdefault(rank["node"], {"cpu": {"cores": 0.0, "memory": 0}, "gpus": []})
            part["cpu"]["cores"] += rank["cpu"]["cores"]
            part["cpu"]["memory"] += rank["cpu"]["memory"]
            part["gpus"].extend(rank["gpus"])
        return {"node": ranks[0]["node"], "cpu": {"cores": res.cpus, "memory": res.memory}, "gpus": [g for r in ranks for g in r["gpus"]],
                "ranks": ranks, "parts": parts}

    def _place_cpu(self, res: Resources) -> dict[str, Any] | None:
        """The tightest nodes first (fewest whole free cores that still hold the request)."""
        return self._scan(self._cpu_buckets, math.floor(res.cpus + 1e-9), res)

    def _best_of(self, nodes: Any, res: Resources) -> dict[str, Any] | None:
        best: tuple[tuple[Any, ...], str, dict[str, Any]] | None = None
        for nid in nodes:
            table = self.nodes[nid]
            cpu = table.cpu
            if nid in self.suspect or cpu.capacity - cpu.share_reserved + 1e-9 < res.cpus or cpu.memory_total - cpu.memory_reserved < res.memory:
                continue
            placement = table.place(res)
            if placement is None:
                continue
            by_id = {g.id: g for g in table.gpus} if placement["gpus"] else {}
            key = (
                any(g["fake"] for g in placement["gpus"]),
                sum(by_id[g["id"]].memory_free - g["memory"] for g in placement["gpus"]),
                cpu.memory_free - res.memory,
                cpu.share_free - res.cpus,
                nid,
            )
            if best is None or key < best[0]:
                best = (key, nid, placement)
        return None if best is None else {**best[2], "node": best[1]}

    def _place_in_buckets(self, res: Resources, want: int) -> dict[str, Any] | None:
        return self._scan(self._buckets, want, res)

    def _scan(self, buckets: list[dict[str, None]], start: int, res: Resources) -> dict[str, Any] | None:
        """The best fit by bytes among the first few nodes of the tightest bucket from ``start``
        up that has one that fits (all of that bucket when those few do not)."""
        for bucket in buckets[start:]:
            if not bucket:
                continue
            found = self._best_of(itertools.islice(bucket, 8), res)
            if found is None and len(bucket) > 8:
                found = self._best_of(itertools.islice(bucket, 8, None), res)
            if found is not None:
                return found
        return None

    def _index(self, nid: str) -> None:
        """Re-file a node under its whole free cores, its wholly free GPUs, and as shared or not."""
        table = self.nodes.get(nid)
        cores = max(0, int(table.cpu.share_free + 1e-9)) if table is not None else None
        whole = sum(1 for g in table.gpus if g.share_reserved <= 1e-9) if table is not None and table.gpus else None
        _refile(self._cpu_buckets, self._cpu_free, nid, cores)
        _refile(self._buckets, self._free_whole, nid, whole)
        self._partial.pop(nid, None)
        if table is not None and any(1e-9 < g.share_reserved < 1 - 1e-9 for g in table.gpus):
            self._partial[nid] = None

    def reserve(self, job_id: int, placement: dict[str, Any]) -> None:
        parts = placement.get("parts") or {placement.get("node", ""): placement}
        for nid, part in parts.items():
            table = self.nodes.get(nid)
            if table is not None:
                table.reserve(job_id, part)
                self._held.setdefault(job_id, []).append(nid)
                self._index(nid)

    def release(self, job_id: int) -> None:
        for nid in self._held.pop(job_id, ()):
            table = self.nodes.get(nid)
            if table is not None:
                table.release(job_id)
                self._index(nid)


def _refile(buckets: list[dict[str, None]], filed: dict[str, int], nid: str, count: int | None) -> None:
    """Move ``nid`` to bucket ``count`` (out of the index when None)."""
    old = filed.pop(nid, None)
    if old is not None:
        buckets[old].pop(nid, None)
    if count is None:
        return
    while len(buckets) <= count:
        buckets.append({})
    buckets[count][nid] = None
    filed[nid] = count


@dataclass(slots=True)
class RankHost:
    """A rank of a gang job started on another node than its worker's (by the kernel, for it)."""

    id: str
    job_id: int
    rank: int
    node: str
    worker: str  # the job's worker (rank 0), told when the rank ends


class Cluster:
    """The kernel's side of the Ray agent: start it (again, after a backoff, if it dies), send it
    launches and signals, and turn its reports into changes of the device table and the pool."""

    def __init__(
        self, address: str, table: ClusterTable, pool: Pool, *, control: str, ingest: str, key: ClientKey, heartbeat: float,
        log_level: str, state_dir: Path, emit: Callable[[str, Any], None],
        changed: Callable[[], None], exited: Callable[[WorkerProc], None], rank_exited: Callable[[RankHost, int | None, str | None], None],
    ) -> None:
        self.address = address
        self.table = table
        self.pool = pool
        self.emit = emit
        self.changed = changed  # something placement depends on changed: schedule again
        self.on_exit = exited  # a worker's exit is known (its try can be accounted)
        self.on_rank_exit = rank_exited  # a gang's rank started on another node ended
        self.rank_hosts: dict[str, RankHost] = {}
        self.state_dir = state_dir
        self.worker_dir = state_dir / "workers"
        self.args = ["--control", control, "--ingest", ingest, "--heartbeat", str(heartbeat), "--log-level", log_level]
        self.env = {
            "LLMOS_STATE_DIR": str(state_dir), "LLMOS_WORKER_KEY": json.dumps(key.to_dict()),
            "MALLOC_TRIM_THRESHOLD_": str(64 << 20), "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.state = "connecting"  # connecting | connected | unavailable
        self.error: str | None = None
        self._buf = b""
        self._counter = 0
        self._restart_at = 0.0
        self._backoff = 1.0
        self.detected: dict[str, float] = {}  # node -> seconds from its loss to the kernel knowing (for the record)
        self._start_agent()

    # -- the agent process --

    def _start_agent(self) -> None:
        env = dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmos.kernel.ray_agent", "--address", self.address], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(self.state_dir / "ray-agent.log", "ab"), env=env, close_fds=True,  # noqa: SIM115 - the child keeps it
        )
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._buf = b""
        log.info("ray_agent_started", pid=self.proc.pid, address=self.address)

    @property
    def fd(self) -> int | None:
        return self.proc.stdout.fileno() if self.proc is not None and self.proc.stdout is not None else None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _send(self, cmd: dict[str, Any]) -> bool:
        if self.proc is None or self.proc.stdin is None:
            return False
        try:
            self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def reaped(self, status: int) -> None:
        """The kernel's reap found the agent's exit."""
        if self.proc is not None:
            self.proc.returncode = os.waitstatus_to_exitcode(status)

    def read(self) -> None:
        """Act on what the agent reported."""
        if self.proc is None or self.proc.stdout is None:
            return
        try:
            chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
        except BlockingIOError:
            chunk = None
        except OSError:
            chunk = b""
        if chunk:
            self._buf += chunk
            *lines, self._buf = self._buf.split(b"\n")
            for line in lines:
                try:
                    self._on_report(json.loads(line))
                except Exception:
                    log.exception("ray_agent_report_failed", line=line[:300].decode(errors="replace"))
        elif chunk == b"":
            self._agent_gone()

    def _agent_gone(self) -> None:
        code = self.proc.returncode if self.proc is not None else None
        if self.proc is not None:
            for pipe in (self.proc.stdout, self.proc.stdin):
                try:
                    if pipe is not None:
                        pipe.close()
                except OSError:
                    pass
        self.proc = None
        self._set_state("unavailable", f"the Ray agent exited (code {code}); see {self.state_dir / 'ray-agent.log'}")
        self._restart_at = time.monotonic() + self._backoff
        self._backoff = min(30.0, self._backoff * 2)
        self._lose_nodes(self.table.forget_all(), "the Ray cluster is unavailable")
        for worker in self.pool.workers.values():
            if worker.node is not None and worker.alive:
                self._exited(worker, None, f"node {worker.node} lost (the Ray cluster is unavailable)")
        for host in list(self.rank_hosts.values()):
            self._rank_ended(host, None, f"node {host.node} lost (the Ray cluster is unavailable)")

    def timers(self, now: float) -> None:
        if self.proc is None and now >= self._restart_at:
            self._start_agent()

    # -- reports --

    def _set_state(self, state: str, error: str | None = None) -> None:
        if state == self.state and error == self.error:
            return
        self.state, self.error = state, error
        log.log(30 if state == "unavailable" else 20, "cluster_state", state=state, error=error, address=self.address)
        self.emit("kernel.cluster", ClusterChanged(state=state, error=error, address=self.address, nodes=sorted(self.table.nodes)))

    def _on_report(self, report: dict[str, Any]) -> None:
        ev = report.get("ev")
        if ev == "connected":
            self._backoff = 1.0
            self._set_state("connected")
        elif ev in ("unavailable", "fatal"):
            self._set_state("unavailable", str(report.get("error")))
        elif ev == "nodes":
            joined, left = self.table.update(report["nodes"])
            for nid in joined:
                info = next(n for n in report["nodes"] if n["id"] == nid)
                log.info("node_joined", node=nid, cpus=info["cpus"], memory=info["memory"], fake_gpus=len(info.get("fake_gpus") or []))
                self.emit("kernel.node", NodeChanged(node=nid, state="joined", cpus=float(info["cpus"]), memory=int(info["memory"])))
            self._lose_nodes(left, "it left the cluster")
            self.changed()
        elif ev == "probed":
            self.table.probed(report["node"], report.get("gpus") or [], str(report.get("source")))
            self.changed()
        elif ev == "started":
            worker = self.pool.workers.get(report["worker"])
            if worker is not None and worker.pid is None:
                worker.pid = int(report["pid"])
        elif ev == "exited" and report["worker"] in self.rank_hosts:
            self._rank_ended(self.rank_hosts[report["worker"]], report.get("code"), report.get("reason"))
        elif ev == "exited":
            worker = self.pool.workers.get(report["worker"])
            if worker is not None and worker.alive:
                self._exited(worker, report.get("code"), report.get("reason"), report.get("usage"))
        elif ev == "suspect":
            log.warning("node_suspect", node=report["node"], why=report.get("why"))
            self.table.suspect.add(report["node"])
        elif ev == "trusted":
            self.table.suspect.discard(report["node"])
            self.changed()
        elif ev == "error":
            log.warning("ray_agent_error", error=report.get("error"))

    def _lose_nodes(self, nodes: list[str], why: str) -> None:
        for nid in nodes:
            lost = [w for w in self.pool.workers.values() if w.node == nid and w.alive]
            log.warning("node_lost", node=nid, why=why, workers=len(lost))
            self.emit("kernel.node", NodeChanged(node=nid, state="lost", why=why))
            for worker in lost:
                self._exited(worker, None, f"node {nid} lost")
            for host in [h for h in self.rank_hosts.values() if h.node == nid]:
                self._rank_ended(host, None, f"node {nid} lost")

    def _exited(self, worker: WorkerProc, code: int | None, reason: str | None, usage: dict[str, float] | None = None) -> None:
        """A remote worker ended: as a reaped local one would (a waitpid-style status)."""
        if code is None:
            worker.exited = 9  # as if killed: its host or its node is gone
        else:
            worker.exited = -code if code < 0 else code << 8
        worker.exited_at = time.monotonic()
        if reason and worker.end_reason is None:
            worker.end_reason = reason
        if usage:
            worker.rusage = SimpleNamespace(ru_utime=float(usage["utime"]), ru_stime=float(usage["stime"]), ru_maxrss=int(usage["maxrss"]))
        self.on_exit(worker)
        self.changed()

    # -- commands --

    def launch(self, placement: dict[str, Any], cpus: float, memory: int, ranks: int = 1) -> WorkerProc:
        """A worker for a job placed on ``placement["node"]`` (started there by Ray), in the
        job's placement group: a bundle per rank on the rank's node (the worker is rank 0)."""
        self._counter += 1
        node = placement["node"]
        proc = WorkerProc(
            id=f"r{os.getpid()}-{self._counter}", log_path=self.worker_dir / f"r{os.getpid()}-{self._counter}.log", spawned_at=time.monotonic(),
            last_seen=time.monotonic(), node=node,
        )
        proc.generation = self.pool.generation
        proc.signaller = lambda sig, wid=proc.id: self._send({"op": "signal", "worker": wid, "sig": int(sig)})
        self.pool.workers[proc.id] = proc
        info = self.table.info.get(node, {})
        cmd = {
            "op": "launch", "worker": proc.id, "node": node, "ray_id": info.get("ray_id", ""), "log": str(proc.log_path),
            "argv": ["-m", "llmos.kernel.worker", "--worker-id", proc.id, *self.args], "env": self.env,
            "bundles": self._bundles(placement, cpus, memory, ranks),
        }
        if not self._send(cmd):
            self._exited(proc, None, f"node {node} lost (the Ray agent is not running)")
        log.info("worker_launching", worker=proc.id, node=node, cpus=cpus, memory=format_size(memory))
        return proc

    def _bundles(self, placement: dict[str, Any], cpus: float, memory: int, ranks: int) -> list[dict[str, Any]]:
        def ray_id(node: str) -> str:
            return str(self.table.info.get(node, {}).get("ray_id", ""))

        if placement.get("ranks"):  # spread over nodes: each rank's share where it was placed
            return [{"resources": {"CPU": float(r["cpu"]["cores"]), "memory": float(r["cpu"]["memory"])}, "ray_id": ray_id(r["node"])}
                    for r in placement["ranks"]]
        n = max(1, ranks)
        return [{"resources": {"CPU": float(cpus) / n, "memory": float(memory // n)}, "ray_id": ray_id(placement["node"])} for _ in range(n)]

    def launch_rank(self, worker: WorkerProc, job_id: int, rank: int, plan: dict[str, Any], argv: list[str], env: dict[str, str], log_path: str) -> None:
        """Start rank ``rank`` of a gang on the node its rank plan gave it (for its worker, who
        hears of its end as RankExited)."""
        entry = plan["ranks"][rank]
        node = entry["node"]
        host = RankHost(id=f"{worker.id}-rank{rank}", job_id=job_id, rank=rank, node=node, worker=worker.id)
        self.rank_hosts[host.id] = host
        gpus = ",".join(str(i) for i in entry.get("gpus", []))
        full_env = {**env, "LLMOS_STATE_DIR": str(self.state_dir), "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": gpus}
        if float(entry.get("cpus", 0)) >= 1:
            full_env["OMP_NUM_THREADS"] = str(int(entry["cpus"]))
        cmd = {
            "op": "launch", "worker": host.id, "node": node, "ray_id": self.table.info.get(node, {}).get("ray_id", ""), "log": log_path, "argv": argv,
            "env": full_env, "rank": True, "group": worker.id, "bundle_index": rank,  # its bundle in the job's placement group
        }
        log.info("rank_launching", job_id=job_id, rank=rank, node=node)
        if not self._send(cmd):
            self._rank_ended(host, None, f"node {node} lost (the Ray agent is not running)")

    def stop_ranks(self, job_id: int, rank: int | None = None) -> None:
        for host in self.rank_hosts.values():
            if host.job_id == job_id and (rank is None or host.rank == rank):
                self._send({"op": "signal", "worker": host.id, "sig": 9})

    def _rank_ended(self, host: RankHost, code: int | None, reason: str | None) -> None:
        self.rank_hosts.pop(host.id, None)
        self.on_rank_exit(host, code, reason)

    def starting(self) -> int:
        return sum(1 for w in self.pool.workers.values() if w.node is not None and w.alive and not w.ready)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": "ray", "address": self.address, "state": self.state, "error": self.error, "nodes": sorted(self.table.nodes)}

    def close(self) -> None:
        if self.proc is None:
            return
        self._send({"op": "quit"})
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.proc = None
