"""Where a kernel keeps its state, and how clients find it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmos.errors import KernelUnavailable

KERNEL_FILE = "kernel.json"


def default_state_dir() -> Path:
    """``$LLMOS_STATE_DIR``, else ``$XDG_STATE_HOME/llmos``, else ``~/.local/state/llmos``."""
    env = os.environ.get("LLMOS_STATE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return base / "llmos"


def resolve_state_dir(state_dir: str | os.PathLike[str] | None) -> Path:
    """The absolute state directory for an explicit value or the default."""
    return (Path(state_dir).expanduser() if state_dir else default_state_dir()).absolute()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (and is not a zombie we could see)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def read_kernel_info(state_dir: Path) -> dict[str, Any]:
    """The running kernel's ``kernel.json``; KernelUnavailable if there is no live kernel."""
    path = state_dir / KERNEL_FILE
    hint = f"start one with: llmos boot --state-dir {state_dir}"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise KernelUnavailable(f"no kernel is running for state dir {state_dir} ({hint})", state_dir=str(state_dir), endpoint=None) from None
    except (OSError, ValueError) as exc:
        raise KernelUnavailable(f"cannot read {path}: {exc} ({hint})", state_dir=str(state_dir), endpoint=None) from None
    pid = info.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        raise KernelUnavailable(
            f"the kernel for state dir {state_dir} is not running (pid {pid} is gone; {hint})",
            state_dir=str(state_dir),
            endpoint=info.get("control"),
        )
    return info


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it; a rendezvous, an exporter)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


__all__ = ["KERNEL_FILE", "default_state_dir", "free_port", "pid_alive", "read_kernel_info", "resolve_state_dir"]
