"""The state directory: the lock that makes one kernel its owner, the runtime directory of its
sockets, and ``kernel.json``, through which clients find the kernel.

Layout: ``<state>/llmos.db`` (the store), ``kernel.lock`` (flock, holding the owner's pid),
``kernel.json`` (pid, version, endpoints; present only while a kernel runs), ``workers/`` and
``jobs/`` (per-worker and per-job folders), and ``run/`` (ipc sockets, unless its path would be
too long for a socket name: then a private per-user directory, see :func:`runtime_dir_for`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from llmos.errors import LlmosError
from llmos.paths import KERNEL_FILE, pid_alive

__all__ = ["KernelLocked", "StateDir", "holder_pid", "make_private_dir", "runtime_dir_for"]

SOCKET_NAME_MAX = 100  # ipc:// paths longer than ~107 bytes cannot be bound


class KernelLocked(LlmosError):
    """Another kernel holds the state directory."""

    code = 220


def runtime_dir_for(state_dir: Path, configured: str) -> Path:
    """Where the ipc sockets live: configured, else <state>/run if short enough, else per-user."""
    if configured:
        return Path(configured).expanduser().absolute()
    candidate = state_dir / "run"
    if len(str(candidate / "control")) <= SOCKET_NAME_MAX:
        return candidate
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/llmos-{os.getuid()}"
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]
    return Path(base) / f"llmos-{digest}"


def make_private_dir(path: Path) -> None:
    """A directory this user owns and only this user can enter. The shared fallback /tmp/llmos-UID
    is made private first: another local user could otherwise create it and reach the sockets."""
    shared = Path(f"/tmp/llmos-{os.getuid()}")
    for d in ((shared, path) if path.parent == shared else (path,)):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        owner = d.stat().st_uid
        if owner != os.getuid():
            raise PermissionError(f"{d} belongs to another user (uid {owner}): the kernel's sockets cannot live there; set [kernel] runtime_dir or XDG_RUNTIME_DIR")
        os.chmod(d, 0o700)


def holder_pid(state_dir: Path) -> int | None:
    """The pid of a live kernel on ``state_dir``, from its kernel.json, or None."""
    try:
        pid = int(json.loads((state_dir / KERNEL_FILE).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if pid_alive(pid) else None


class StateDir:
    """One kernel's hold on its state directory: :meth:`take` at boot, :meth:`release` at exit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None

    def take(self) -> None:
        """Create the directory and its folders and take the lock (KernelLocked if held)."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path / "kernel.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise KernelLocked(
                f"another kernel (pid {holder}) is running on state dir {self.path}; stop it with: llmos shutdown --state-dir {self.path}",
                pid=holder,
                state_dir=str(self.path),
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        (self.path / "workers").mkdir(exist_ok=True)
        (self.path / "jobs").mkdir(exist_ok=True)

    def write_kernel_file(self, info: dict[str, Any]) -> None:
        """Publish ``kernel.json`` atomically (clients read it to find the kernel)."""
        tmp = self.path / (KERNEL_FILE + ".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, self.path / KERNEL_FILE)

    def remove_kernel_file(self) -> None:
        """Clients stop finding this kernel (first thing at shutdown)."""
        with contextlib.suppress(FileNotFoundError):
            (self.path / KERNEL_FILE).unlink()

    def release(self) -> None:
        """Remove ``kernel.json`` and let go of the lock, last (idempotent)."""
        self.remove_kernel_file()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
