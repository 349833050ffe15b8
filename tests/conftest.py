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
from llmos.testing import KernelProcess

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


class KernelHandle(KernelProcess):
    """A kernel booted with ``llmos boot --detach ARGS`` in its own state directory (the fixture
    llmos ships for plugin authors, plus what the project's own tests need)."""

    def __init__(self, state_dir: Path, *boot_args: str, env: dict[str, str] | None = None) -> None:
        # The monitor service journals samples every few seconds: tests that compare journals or
        # job lists run without it; the monitoring tests turn it on.
        super().__init__(state_dir, env={"LLMOS_MONITOR_AUTOSTART": "0", **(env or {})}, boot_args=boot_args)

    def cli_json(self, *args: str) -> object:
        return json.loads(self.cli(*args, "--json").stdout)

    def kill(self) -> None:
        """SIGKILL the kernel, as a crash would."""
        assert self.pid is not None
        os.kill(self.pid, 9)
        _wait_gone(self.pid)
        self.pid = None


def wait_for_gpu_probe(client: llmos.Client, timeout: float = 90) -> None:
    """Until the kernel's GPU probe (a subprocess at boot) has filled in the real GPUs."""
    deadline = time.monotonic() + timeout
    while client.status()["stats"]["gpus_probing"]:
        assert time.monotonic() < deadline, f"the GPU probe did not finish within {timeout}s"
        time.sleep(0.1)


def write_word_corpus(root: Path, docs: int) -> Path:
    """``docs`` small text files of rotating words: a corpus a nano model learns in a few steps."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
    for i in range(docs):
        lines = [" ".join(words[(i + j + k) % len(words)] for k in range(6)) + "." for j in range(40)]
        (root / f"doc{i:02}.txt").write_text("\n".join(lines))
    return root


def write_endless_nano(path: Path) -> Path:
    """A nano checkpoint with random weights whose end-of-sequence id is outside the vocabulary
    (it never ends a sequence by itself) and a long context: requests run as long as they ask."""
    from llmos.plugins.lm.checkpoint import save_checkpoint
    from llmos.plugins.lm.config import config_from_preset
    from llmos.plugins.lm.model import Llama
    from llmos.plugins.lm.text import bytes_tokenizer

    tok = bytes_tokenizer()
    model = Llama(config_from_preset("nano", tok.vocab_size, max_position_embeddings=32768, eos_token_id=tok.vocab_size + 1))
    model.init_weights(seed=7, std=0.5)
    save_checkpoint(path, model, tok.to_json(), {})
    return path


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
