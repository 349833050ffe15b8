"""An embedded kernel: ``llmos.connect(embedded=True)`` starts a kernel in a child process tied
to the caller's lifetime (for notebooks and scripts that want no daemon) and stops it when the
client closes or the caller exits."""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmos.errors import KernelUnavailable
from llmos.paths import KERNEL_FILE

__all__ = ["EmbeddedKernel"]

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass


class EmbeddedKernel:
    """A kernel process of this one: in ``state_dir``, or in a temporary directory removed when
    it stops. It gets SIGTERM if this process dies (Linux), and stops at exit."""

    def __init__(self, state_dir: str | os.PathLike[str] | None = None, *, boot_timeout: float = 60.0) -> None:
        self.temporary = state_dir is None
        # ipc socket paths must stay short: a temporary state dir lives directly under /tmp.
        self.state_dir = Path(tempfile.mkdtemp(prefix="llmos-embedded-")) if state_dir is None else Path(state_dir).absolute()
        self.boot_timeout = boot_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> EmbeddedKernel:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.state_dir / "kernel.out", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmos.kernel.cli", "boot", "--state-dir", str(self.state_dir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True, preexec_fn=_die_with_parent,
        )
        log.close()
        atexit.register(self.stop)
        deadline = time.monotonic() + self.boot_timeout
        info_path = self.state_dir / KERNEL_FILE
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.state_dir / "kernel.out").read_text(errors="replace").strip().splitlines()[-3:]
                raise KernelUnavailable(f"the embedded kernel exited during boot (code {self.proc.returncode}): {' | '.join(tail)}", state_dir=str(self.state_dir))
            try:
                if json.loads(info_path.read_text()).get("pid") == self.proc.pid:
                    return self
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        self.stop()
        raise KernelUnavailable(f"the embedded kernel did not become ready within {self.boot_timeout:g}s; see {self.state_dir / 'kernel.log'}", state_dir=str(self.state_dir))

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the kernel (as `llmos shutdown` does: SIGTERM) and wait; idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None:
            atexit.unregister(self.stop)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.temporary and self.state_dir.exists() and proc is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
