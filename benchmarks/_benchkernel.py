"""What the benchmark scripts share: a real kernel booted in a temporary state directory.

Run as ``python benchmarks/<script>.py``, which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

import llmos
from llmos.paths import pid_alive, read_kernel_info
from llmos.protocol import ShutdownRequest


def llmos_cmd() -> list[str]:
    """The ``llmos`` script beside this interpreter (not a version manager's shim, which costs a
    shell and ~100 ms a command), else the one on PATH, else ``python -m``."""
    beside = Path(sys.executable).parent / "llmos"
    exe = str(beside) if beside.is_file() else shutil.which("llmos")
    return [exe] if exe else [sys.executable, "-m", "llmos.kernel.cli"]


class Kernel:
    """A kernel booted with ``llmos boot --detach`` in a temporary state dir; stopped on exit."""

    def __init__(self, prefix: str = "llmos-bench-", args: tuple[str, ...] = ()) -> None:
        self.args = args  # more `llmos boot` options (--ray ADDRESS)
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.pid: int | None = None
        self.client: llmos.Client | None = None
        self.boot_s = 0.0
        self.ready_s = 0.0

    def __enter__(self) -> Kernel:
        try:
            t0 = time.perf_counter()
            proc = subprocess.run([*llmos_cmd(), "boot", "--detach", "--state-dir", str(self.dir), *self.args], capture_output=True, text=True, timeout=60)
            self.boot_s = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"llmos boot failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
            self.client = llmos.connect(self.dir)
            self.pid = int(self.client.status()["pid"])
            self.ready_s = time.perf_counter() - t0
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Shut the kernel down: politely, else SIGTERM, else SIGKILL; then remove the state dir."""
        pid = self.pid
        if pid is None:
            with contextlib.suppress(Exception):
                pid = int(read_kernel_info(self.dir)["pid"])
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.request(ShutdownRequest(), timeout=10)
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None
        if pid is not None:
            for sig, wait in ((None, 20.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                deadline = time.monotonic() + wait
                while pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
                if not pid_alive(pid):
                    break
            self.pid = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def rss(self) -> int:
        assert self.pid is not None
        return psutil.Process(self.pid).memory_info().rss
