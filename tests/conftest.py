"""Shared fixtures: real kernels in temporary state directories, driven through the real CLI and SDK."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import llmos

LLMOS = [sys.executable, "-m", "llmos.kernel.cli"]


def cli(*args: str, state_dir: Path | None = None, check: bool = True, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``llmos`` command line; returns the finished process (text output)."""
    argv = [*LLMOS, *args]
    if state_dir is not None:
        argv[len(LLMOS) + 1 : len(LLMOS) + 1] = ["--state-dir", str(state_dir)]
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"llmos {' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def cli_json(*args: str, state_dir: Path | None = None) -> object:
    return json.loads(cli(*args, "--json", state_dir=state_dir).stdout)


class KernelHandle:
    """A kernel booted with ``llmos boot --detach`` in its own state directory."""

    def __init__(self, state_dir: Path, *boot_args: str, env: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self.boot_args = boot_args
        self.env = env
        self.pid: int | None = None

    def boot(self) -> KernelHandle:
        info = json.loads(cli("boot", "--detach", *self.boot_args, "--json", state_dir=self.state_dir, env=self.env).stdout)
        self.pid = info["pid"]
        return self

    def client(self) -> llmos.Client:
        return llmos.connect(self.state_dir)

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return cli(*args, state_dir=self.state_dir, check=check, timeout=timeout)

    def cli_json(self, *args: str) -> object:
        return cli_json(*args, state_dir=self.state_dir)

    def shutdown(self) -> None:
        if self.pid is None:
            return
        try:
            with self.client() as c:
                c.shutdown()
        except llmos.KernelUnavailable:
            pass
        finally:
            _wait_gone(self.pid)
            self.pid = None

    def kill(self) -> None:
        """SIGKILL the kernel, as a crash would."""
        assert self.pid is not None
        os.kill(self.pid, 9)
        _wait_gone(self.pid)
        self.pid = None


def _wait_gone(pid: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    os.kill(pid, 9)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory (ipc socket paths must stay under ~100 bytes)."""
    with tempfile.TemporaryDirectory(prefix="llmos-t-") as d:
        yield Path(d)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def fresh_kernel(state_dir: Path) -> Iterator[KernelHandle]:
    """A kernel of this test alone, with two fake 24 GiB GPUs."""
    handle = KernelHandle(state_dir, "--fake-gpus", "2x24GiB").boot()
    try:
        yield handle
    finally:
        handle.shutdown()


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelHandle]:
    """A kernel shared by the tests of one module, with two fake 24 GiB GPUs."""
    handle = KernelHandle(tmp_path_factory.mktemp("k") / "state", "--fake-gpus", "2x24GiB").boot()
    try:
        yield handle
    finally:
        handle.shutdown()


@pytest.fixture
def client(kernel: KernelHandle) -> Iterator[llmos.Client]:
    with kernel.client() as c:
        yield c
