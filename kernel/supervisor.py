"""Starting, watching and stopping worker processes (the kernel's side of kernel/worker.py): the
launcher (zygote or spawn), the pool the kernel keeps, and the stages of stopping a job."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import zmq

from llmos.errors import ProtocolError
from llmos.protocol import WorkerAssign, WorkerExit, WorkerHeartbeat, WorkerReady

if TYPE_CHECKING:
    from llmos.kernel.bus import Bus
    from llmos.kernel.store import JobRecord

log = structlog.get_logger(__name__)

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux), so forked-from-zygote workers are our children to reap."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def signal_name(sig: int) -> str:
    """``SIGKILL`` for 9, ``signal 40`` for real-time signals Python has no name for."""
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def describe_status(status: int) -> tuple[str, int]:
    """(reason, exit_code) for a waitpid status; signals give negative codes like subprocess."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal_name(sig)
        return f"worker killed by {'signal ' if name.startswith('SIG') else ''}{name}", -sig
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1
    if code == 0:
        return "worker exited without reporting a result", 0
    return f"worker exited with code {code}", code


@dataclass
class WorkerProc:
    """One worker process as the kernel tracks it."""

    id: str
    log_path: Path
    spawned_at: float
    pid: int | None = None
    ready: bool = False
    job_id: int | None = None
    assigned: bool = False
    last_seen: float = 0.0
    exited: int | None = None  # waitpid status once reaped
    exited_at: float | None = None
    done_at: float | None = None  # when its job_done arrived
    lost: bool = False  # killed for missing heartbeats
    generation: int = 0  # the plugin set it was started with (see Kernel.reload_plugins)
    services: set[str] = field(default_factory=set)  # the services it answers for
    rusage: Any = None  # os.wait4's resource usage, once reaped
    attempt: tuple[int, int, float] | None = None  # (job id, attempt, start) of the try it ran, until accounted
    node: str | None = None  # the cluster node it runs on (started by Ray); None: a child of this kernel
    signaller: Callable[[int], None] | None = None  # how to signal a remote worker's process group
    end_reason: str | None = None  # why it ended, when its exit status cannot say ("node <id> lost")

    @property
    def alive(self) -> bool:
        return self.exited is None

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the worker's process group (its job's whole tree)."""
        if self.exited is not None:
            return
        if self.signaller is not None:
            self.signaller(sig)
            return
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


class Launcher:
    """Starts worker processes: forked from a zygote when possible, else spawned fresh."""

    def __init__(self, *, method: str, control: str, ingest: str, heartbeat: float, log_level: str, worker_dir: Path) -> None:
        self.method = method
        self.worker_dir = worker_dir
        self.common = [
            "--control", control,
            "--ingest", ingest,
            "--kernel-pid", str(os.getpid()),
            "--heartbeat", str(heartbeat),
            "--log-level", log_level,
        ]
        # Workers find the state dir (plugins.json, caches) through the environment.
        self.env = dict(os.environ, LLMOS_STATE_DIR=str(worker_dir.parent))
        # A fresh worker's glibc hands freed tensor memory back and faults it in again every step;
        # these keep it (about 1 % of a training step here). The user's own settings win.
        self.env.setdefault("MALLOC_TRIM_THRESHOLD_", str(64 << 20))
        self.env.setdefault("MALLOC_MMAP_THRESHOLD_", str(32 << 20))
        self.zygote: subprocess.Popen[bytes] | None = None
        self.zygote_ready = False
        self._buf = b""
        self._counter = 0
        if method == "zygote":
            self._start_zygote()

    def _start_zygote(self) -> None:
        self.zygote = subprocess.Popen(
            [sys.executable, "-m", "llmos.kernel.worker", "--zygote", *self.common],
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.worker_dir / "zygote.log", "ab"),  # noqa: SIM115 - the child keeps it
            close_fds=True,
        )
        assert self.zygote.stdout is not None
        os.set_blocking(self.zygote.stdout.fileno(), False)
        self.zygote_ready = False
        self._buf = b""

    @property
    def zygote_fd(self) -> int | None:
        return self.zygote.stdout.fileno() if self.zygote and self.zygote.stdout else None

    def read_zygote(self) -> list[tuple[str, int]]:
        """New (worker id, pid) pairs the zygote reported; restarts a dead zygote."""
        if self.zygote is None or self.zygote.stdout is None:
            return []
        try:
            chunk = os.read(self.zygote.stdout.fileno(), 65536)
        except BlockingIOError:
            return []
        except OSError:
            chunk = b""
        out = []
        if not chunk and self.zygote.poll() is not None:
            log.warning("zygote_exited", returncode=self.zygote.returncode)
            self.zygote = None
            self.method = "spawn"  # fall back; the kernel stays useful
            return out
        self._buf += chunk
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            text = line.decode(errors="replace").strip()
            if text == "ready":
                self.zygote_ready = True
                continue
            parts = text.split()
            if len(parts) == 2 and parts[1].isdigit():
                out.append((parts[0], int(parts[1])))
        return out

    def can_start(self) -> bool:
        return self.method == "spawn" or self.zygote is not None

    def start(self) -> WorkerProc:
        """Begin starting a worker; its pid may arrive later (zygote)."""
        self._counter += 1
        worker_id = f"w{os.getpid()}-{self._counter}"
        log_path = self.worker_dir / f"{worker_id}.log"
        proc = WorkerProc(id=worker_id, log_path=log_path, spawned_at=time.monotonic(), last_seen=time.monotonic())
        if self.method == "zygote" and self.zygote is not None and self.zygote.stdin is not None:
            try:
                self.zygote.stdin.write(f"spawn {worker_id} {log_path}\n".encode())
                self.zygote.stdin.flush()
                return proc
            except (BrokenPipeError, OSError):
                log.warning("zygote_unavailable_spawning")
                self.method = "spawn"
        with open(log_path, "ab") as out:
            child = subprocess.Popen(
                [sys.executable, "-m", "llmos.kernel.worker", "--worker-id", worker_id, *self.common],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                close_fds=True,
            )
        proc.pid = child.pid
        # We reap with os.waitpid ourselves; keep Popen from doing it too.
        child.returncode = 0
        return proc

    def restart_zygote(self) -> None:
        """A fresh zygote (after a plugin reload: the old one holds the old plugin set)."""
        self.close()
        if self.method == "zygote":
            self._start_zygote()

    def close(self) -> None:
        if self.zygote is not None:
            try:
                if self.zygote.stdin:
                    self.zygote.stdin.close()
            except OSError:
                pass
            try:
                self.zygote.wait(2)
            except subprocess.TimeoutExpired:
                self.zygote.kill()
            self.zygote = None


class StopStage(IntEnum):
    """How far the kernel has gone in stopping a running job (``JobRecord.stop_stage``)."""

    NONE = 0  # not being stopped
    ASKED = 1  # WorkerCancel sent: the runner has ``cancel_grace`` seconds to wind down
    TERMINATED = 2  # SIGTERM to its process group: ``kill_grace`` seconds more
    KILLED = 3  # SIGKILL sent: the reap ends the job

    def next(self) -> StopStage:
        return StopStage(min(self + 1, StopStage.KILLED))


#: The signal each stage sends when the previous one's grace runs out.
STAGE_SIGNAL = {StopStage.TERMINATED: signal.SIGTERM, StopStage.KILLED: signal.SIGKILL}


class Pool:
    """The kernel's workers: starting them (a few at once), keeping spares ready, telling them
    apart by plugin generation, reaping them, and noticing the ones that stop answering."""

    def __init__(self, launcher: Launcher, settings: Mapping[str, Any], bus: Bus, on_ready: Callable[[WorkerProc], None]) -> None:
        self.launcher = launcher
        self.bus = bus
        self.on_ready = on_ready
        self.pool_size = int(settings["pool_size"])
        self.max_starting = int(settings["max_starting"])
        self.max_workers = int(settings["max_workers"])
        self.kill_grace = float(settings["kill_grace"])
        self.heartbeat_timeout = float(settings["heartbeat_timeout"])
        self.workers: dict[str, WorkerProc] = {}
        self.by_pid: dict[int, WorkerProc] = {}
        self.generation = 0  # bumped by a plugin reload
        self._zygote_fd = launcher.zygote_fd
        if self._zygote_fd is not None:
            bus.poller.register(self._zygote_fd, zmq.POLLIN)

    def handlers(self) -> dict[type, Any]:
        return {WorkerReady: self._on_ready, WorkerHeartbeat: self._on_heartbeat}

    # -- starting --

    def spawn(self) -> WorkerProc:
        proc = self.launcher.start()
        proc.generation = self.generation
        self.workers[proc.id] = proc
        if proc.pid is not None:
            self.by_pid[proc.pid] = proc
        return proc

    def keep(self, extra: int = 0) -> None:
        """Keep ``pool_size`` spare workers, plus ``extra`` (one for each job that fits but has no
        worker), with at most ``max_starting`` starting at once: a burst of jobs must not
        fork-bomb the machine."""
        spare = starting = alive = 0
        for w in self.workers.values():
            if w.alive:
                alive += 1
                if not w.ready:
                    starting += 1
                if w.job_id is None and not w.assigned and w.generation == self.generation:
                    spare += 1
        want = self.pool_size + extra
        while spare < want and starting < self.max_starting and alive < self.max_workers and self.launcher.can_start():
            self.spawn()
            spare += 1
            starting += 1
            alive += 1

    def idle(self) -> list[WorkerProc]:
        """Workers ready for a job now (of the current plugin set)."""
        gen = self.generation
        return [w for w in self.workers.values() if w.alive and w.ready and w.job_id is None and not w.assigned and w.generation == gen]

    def counts(self) -> dict[str, int]:
        alive = [w for w in self.workers.values() if w.alive]
        return {
            "alive": len(alive),
            "idle": sum(1 for w in alive if w.ready and w.job_id is None and not w.assigned),
            "busy": sum(1 for w in alive if w.job_id is not None),
        }

    def new_generation(self) -> None:
        """Plugins were reloaded: retire the idle workers (they hold the old plugins) and fork new
        ones from a fresh zygote."""
        self.generation += 1
        for worker in self.workers.values():
            if worker.alive and worker.job_id is None and not worker.assigned and worker.ready:
                self.bus.send(worker.id.encode(), WorkerExit())
                worker.assigned = True  # never hand it a job
        self.launcher.restart_zygote()
        self._watch_zygote()

    def _watch_zygote(self) -> None:
        fd = self.launcher.zygote_fd
        if fd != self._zygote_fd:
            if self._zygote_fd is not None:
                self.bus.poller.unregister(self._zygote_fd)
            if fd is not None:
                self.bus.poller.register(fd, zmq.POLLIN)
            self._zygote_fd = fd

    @property
    def zygote_fd(self) -> int | None:
        return self._zygote_fd

    def read_zygote(self) -> None:
        """The zygote's reports of the pids it forked."""
        for worker_id, pid in self.launcher.read_zygote():
            proc = self.workers.get(worker_id)
            if proc is not None:
                proc.pid = pid
                self.by_pid[pid] = proc
        self._watch_zygote()

    # -- messages from workers --

    def _on_ready(self, req: Any) -> None:
        msg: WorkerReady = req.msg
        proc = self.workers.get(msg.worker_id)
        if proc is None or req.identity != msg.worker_id.encode():
            # Unknown (from a previous kernel, or a stranger): tell it to leave.
            self.bus.send(req.identity, WorkerExit())
            return
        proc.ready = True
        proc.last_seen = time.monotonic()
        if proc.pid is None:
            proc.pid = msg.pid
            if proc.node is None:  # a remote worker's pid is its node's, never reaped here
                self.by_pid[msg.pid] = proc
        if proc.generation != self.generation and proc.job_id is None:
            proc.assigned = True  # started before a plugin reload: let it go
            self.bus.send(req.identity, WorkerExit())
        self.on_ready(proc)

    def _on_heartbeat(self, req: Any) -> None:
        msg: WorkerHeartbeat = req.msg
        proc = self.workers.get(msg.worker_id)
        if proc is None or req.identity != msg.worker_id.encode():
            raise ProtocolError(f"heartbeat from {msg.worker_id!r}, which is not a worker of this kernel")
        proc.last_seen = time.monotonic()

    # -- ends --

    def exited(self, pid: int, status: int) -> WorkerProc | None:
        """A reaped pid: the worker it was (now marked exited, its process group killed), or None
        for an adopted grandchild of some worker."""
        worker = self.by_pid.pop(pid, None)
        if worker is None:
            return None
        worker.exited = status
        worker.exited_at = time.monotonic()
        kill_group(pid)
        return worker

    def check(self, now: float, backlog: Callable[[], bool]) -> list[WorkerProc]:
        """Timers: kill workers that outstay their job or stop sending heartbeats, forget the long
        dead. Returns the reaped workers whose job must now end (once ``backlog()`` says their last
        events are read, or after 30 s)."""
        dead: list[WorkerProc] = []
        for worker in list(self.workers.values()):
            if worker.exited is not None:
                if worker.job_id is not None:
                    # Reaped while running its job. Its last frames (its job_done among them) may
                    # still be queued on the ingest socket: end the job only once that is drained.
                    waited = now - (worker.exited_at or now)
                    if (waited >= 0.2 and not backlog()) or waited >= 30:
                        dead.append(worker)
                elif worker.exited_at is not None and now - worker.exited_at > 1.0:
                    del self.workers[worker.id]
                continue
            if worker.done_at is not None and worker.job_id is None and now - worker.done_at > self.kill_grace:
                worker.signal_group(signal.SIGKILL)  # its job is over and it has not left
                worker.done_at = now
            if worker.pid is not None and now - worker.last_seen > self.heartbeat_timeout and worker.done_at is None:
                log.warning("worker_heartbeat_lost", worker=worker.id, pid=worker.pid, job_id=worker.job_id)
                worker.signal_group(signal.SIGKILL)
                worker.last_seen = now  # signal once; the reap finishes the story
                worker.lost = True
            if worker.pid is None and now - worker.spawned_at > 30:
                log.warning("worker_never_started", worker=worker.id)
                worker.exited = -1
                worker.exited_at = now
        return dead

    def stop_all(self, grace: float = 3.0) -> None:
        """At shutdown: SIGTERM every worker's group, wait up to ``grace`` s, SIGKILL the rest."""
        for worker in self.workers.values():
            if worker.alive and worker.pid is not None:
                worker.signal_group(signal.SIGTERM)
        self.launcher.close()
        deadline = time.monotonic() + grace
        while any(w.alive and w.pid and w.node is None for w in self.workers.values()) and time.monotonic() < deadline:
            self.reap_quietly()
            time.sleep(0.01)
        for worker in self.workers.values():
            if worker.alive and worker.pid is not None:
                worker.signal_group(signal.SIGKILL)
        self.reap_quietly()

    def reap_quietly(self) -> None:
        """Collect exited children, only noting the workers' ends (at shutdown)."""
        for pid, status, _usage in reap():
            worker = self.by_pid.pop(pid, None)
            if worker is not None:
                worker.exited = status
                kill_group(pid)


def assignment(job: JobRecord, state_dir: Path, inputs: dict[str, Any] | None = None) -> WorkerAssign:
    """The message that hands ``job`` (running, placed) to its worker, with the environment its
    devices and rank plan call for."""
    placement = job.placement or {}
    # A gang spread over a cluster's nodes: this worker is rank 0, with rank 0's devices.
    here = placement["ranks"][0] if placement.get("ranks") else placement
    gpus = here.get("gpus", [])
    cpus = float(here["cpu"]["cores"]) if placement.get("ranks") else float(job.resources.get("cpus", 0))
    env = {
        # The probe numbered the GPUs in PCI bus order (NVML's); CUDA's default order is
        # fastest first, which on a machine of mixed GPUs would hand the job another GPU.
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(str(g["index"]) for g in gpus if not g.get("fake")),
        "LLMOS_JOB_ID": str(job.id),
        "LLMOS_ATTEMPT": str(job.attempts),
        "LLMOS_GPUS": ",".join(g["id"] for g in gpus),
        "LLMOS_STATE_DIR": str(state_dir),
    }
    if gpus:
        env["LLMOS_GPU_MEMORY"] = str(min(int(g["memory"]) for g in gpus))
    plan = (job.placement or {}).get("distributed")
    if plan:
        # torch.distributed's own names: rank 0 is this worker; it starts the other ranks.
        n = str(plan["world_size"])
        env.update(MASTER_ADDR=plan["master_addr"], MASTER_PORT=str(plan["master_port"]), WORLD_SIZE=n, LOCAL_WORLD_SIZE=n, RANK="0", LOCAL_RANK="0")
    if cpus >= 1:
        env["OMP_NUM_THREADS"] = str(int(cpus))
    return WorkerAssign(
        job_id=job.id, kind=job.kind, params=job.params, attempt=job.attempts, resources=job.resources, placement=job.placement or {},
        workdir=str(state_dir / "jobs" / str(job.id)), env=env, inputs=inputs or {},
    )


def kill_orphan(job: JobRecord) -> None:
    """Kill the process group of a job a previous kernel left running (unless its pid now
    belongs to another process)."""
    if not job.worker_pid:
        return
    try:
        import psutil

        proc = psutil.Process(job.worker_pid)
        if job.worker_create_time and abs(proc.create_time() - job.worker_create_time) > 1:
            return  # the pid was reused by an unrelated process
        os.killpg(job.worker_pid, signal.SIGKILL)
        log.info("orphan_killed", job_id=job.id, pid=job.worker_pid)
    except (psutil.Error, ProcessLookupError, PermissionError):
        pass


def reap() -> Iterator[tuple[int, int, Any]]:
    """Every exited child: (pid, waitpid status, resource usage)."""
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status, usage


def kill_group(pid: int) -> None:
    """SIGKILL a reaped worker's process group: whatever its job left behind goes with it."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


__all__ = [
    "STAGE_SIGNAL", "Launcher", "Pool", "StopStage", "WorkerProc", "assignment", "become_subreaper", "describe_status", "kill_group", "kill_orphan",
    "reap", "signal_name",
]
