"""The C structs and their ctypes mirrors agree (the C sources are package data: plugins/*/csrc)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from llmos.plugins.compress import native
from llmos.plugins.lm import kernels


def test_the_sources_ship_as_files_and_share_one_header() -> None:
    for path in (kernels.CSRC / "llmos_bf16.c", kernels.CSRC / "llmos_linear.h", Path(native.__file__).with_name("csrc") / "llmos_compress.c"):
        assert path.is_file(), path
    assert "struct llmos_linear {" in kernels._SOURCE and "struct llmos_linear {" in native._SOURCE  # the header, expanded
    assert native._SOURCE.count("struct llmos_linear {") == 1


def test_struct_sizes_match_ctypes() -> None:
    lm = kernels._load_native()
    if lm is None:
        pytest.skip(f"the lm native library is not in use here: {kernels.kernel_status().reason}")
    assert lm.sizes == {"step": ctypes.sizeof(kernels.StepArgs), "linear": ctypes.sizeof(kernels.LinearDesc)}
    lib = native._load().lib
    if lib is None:
        pytest.skip(f"the compress library did not build: {native.status()['reason']}")
    fn = lib.llmos_q_sizeof_linear
    fn.restype, fn.argtypes = ctypes.c_int64, []
    assert fn() == ctypes.sizeof(kernels.LinearDesc)
