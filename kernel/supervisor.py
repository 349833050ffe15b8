"""Starting, watching and stopping worker processes (the kernel's side of kernel/worker.py)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

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

    @property
    def alive(self) -> bool:
        return self.exited is None

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the worker's process group (its job's whole tree)."""
        if self.pid is None or self.exited is not None:
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


__all__ = ["Launcher", "WorkerProc", "become_subreaper", "describe_status", "signal_name"]
