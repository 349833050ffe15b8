"""Meta-tests: the public surface, and what importing llmos (and running the kernel) loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import llmos
from llmos import client, errors, params, plugin, protocol, units
from tests.conftest import KernelHandle


def test_all_is_sorted_and_exported() -> None:
    for module in (llmos, client, errors, params, plugin, protocol, units):
        names = module.__all__
        assert len(names) == len(set(names)), module  # the order is ruff's (RUF022)
        for name in names:
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_import_llmos_loads_neither_torch_nor_kernel() -> None:
    code = "import sys, llmos; llmos.connect; print(sorted(m for m in ('torch', 'llmos.kernel', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_kernel_modules_do_not_import_torch() -> None:
    code = (
        "import sys; import llmos.kernel.server, llmos.kernel.cli, llmos.kernel.worker, llmos.kernel.plugins;"
        "llmos.kernel.plugins.load_plugins(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_running_kernel_process_has_no_torch(fresh_kernel: KernelHandle) -> None:
    with fresh_kernel.client() as c:
        c.submit("diag.echo").wait(timeout=30)
    maps = Path(f"/proc/{fresh_kernel.pid}/maps").read_text()
    assert "libtorch" not in maps and "/torch/" not in maps


def test_contract_files_document_public_functions() -> None:
    for module in (client, errors, protocol):
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj) and not name.isupper():
                assert obj.__doc__, f"{module.__name__}.{name} has no docstring"
