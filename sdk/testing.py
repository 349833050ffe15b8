"""pytest fixtures for plugin authors (registered under the ``pytest11`` entry point).

Install llmos with your plugin and these fixtures are there in your tests::

    def test_my_kind(llmos_client):
        job = llmos_client.submit("mykind", params={"n": 3})
        assert job.result(timeout=60) == {"counted": 3}

``llmos_kernel`` is a real kernel process in a temporary state directory, with every installed
plugin loaded, plus the modules named by the ``llmos_plugins`` ini option or the
``@pytest.mark.llmos(plugins=["name=module"], fake_gpus="2x24GiB")`` marker (for a plugin that is
not installed yet). ``llmos_client`` is a :class:`llmos.Client` connected to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from llmos.client import Client, connect
from llmos.errors import KernelUnavailable
from llmos.paths import pid_alive


class KernelProcess:
    """A kernel booted for a test: its state dir, pid, a client factory and the CLI."""

    def __init__(
        self,
        state_dir: Path,
        *,
        plugins: Sequence[str] = (),
        fake_gpus: str | None = None,
        env: dict[str, str] | None = None,
        boot_args: Sequence[str] = (),
    ) -> None:
        self.state_dir = Path(state_dir)
        # No monitor service by default: a plugin's tests see only their own jobs.
        self.env = {"LLMOS_MONITOR_AUTOSTART": "0", **os.environ, **(env or {})}
        if plugins:
            extra = ",".join(plugins)
            current = self.env.get("LLMOS_PLUGIN_MODULES")
            self.env["LLMOS_PLUGIN_MODULES"] = f"{current},{extra}" if current else extra
        self.fake_gpus = fake_gpus
        self.boot_args = tuple(boot_args)
        self.pid: int | None = None

    def boot(self) -> KernelProcess:
        """Start the kernel (``llmos boot --detach``) and wait until it answers."""
        args = ["boot", "--detach", "--json", *self.boot_args]
        if self.fake_gpus:
            args += ["--fake-gpus", self.fake_gpus]
        proc = self.cli(*args)
        self.pid = int(json.loads(proc.stdout)["pid"])
        return self

    def client(self) -> Client:
        """A new client of this kernel (close it, or use it in a ``with`` block)."""
        return connect(self.state_dir)

    def cli(self, *args: str, check: bool = True, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``llmos ARGS --state-dir <this kernel's>`` (``env`` added to the kernel's environment);
        raises AssertionError on failure when ``check``."""
        argv = [sys.executable, "-m", "llmos.kernel.cli", args[0], "--state-dir", str(self.state_dir), *args[1:]]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**self.env, **(env or {})} if env else self.env)
        if check and proc.returncode != 0:
            raise AssertionError(f"llmos {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def shutdown(self) -> None:
        """Stop the kernel and wait for its process to go."""
        if self.pid is None:
            return
        try:
            with self.client() as c:
                c.shutdown()
        except KernelUnavailable:
            pass
        deadline = time.monotonic() + 15
        while pid_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if pid_alive(self.pid):
            os.kill(self.pid, 9)
        self.pid = None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("llmos_plugins", "plugin modules ('name=module' or 'module') to load into test kernels", type="args", default=[])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "llmos(plugins=[...], fake_gpus=None): how the llmos_kernel fixture boots its kernel")


@pytest.fixture
def llmos_kernel(request: pytest.FixtureRequest) -> Iterator[KernelProcess]:
    """A real llmos kernel in a temporary state directory, shut down after the test."""
    marker = request.node.get_closest_marker("llmos")
    plugins = list(request.config.getini("llmos_plugins"))
    fake_gpus = None
    if marker is not None:
        plugins += list(marker.kwargs.get("plugins", []))
        fake_gpus = marker.kwargs.get("fake_gpus")
    # A short path: ipc socket names must stay under about 100 bytes.
    with tempfile.TemporaryDirectory(prefix="llmos-") as tmp:
        kernel = KernelProcess(Path(tmp) / "state", plugins=plugins, fake_gpus=fake_gpus).boot()
        try:
            yield kernel
        finally:
            kernel.shutdown()


@pytest.fixture
def llmos_client(llmos_kernel: KernelProcess) -> Iterator[Client]:
    """A client connected to ``llmos_kernel``."""
    with llmos_kernel.client() as client:
        yield client


__all__ = ["KernelProcess", "llmos_client", "llmos_kernel"]
