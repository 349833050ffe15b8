"""C kernels for quantized linear layers in single-token CPU decode: int8 and int4 weight-only,
and w8a8 (int8 weights, int8 activations quantized per token at run time).

Decode at batch 1 reads every weight once per token, so a layer's speed is the bytes it reads:
one per weight for int8, half for int4, against four for float32. Torch's own packed ops reach
that on some CPUs and are several times slower than float32 on others, so this module compiles
its own kernels for each instruction set, all into one library (one build works on any x86 CPU:
each variant carries its own ``__attribute__((target))``), and :func:`kernels` lists those the
CPU can run. The caller (:mod:`~llmos.plugins.compress.qlinear`) times them and keeps the fastest.

Every kernel is an ``llmos_linear`` fn (see :class:`~llmos.plugins.lm.kernels.LinearDesc`): it
computes one thread's block of output rows, starts no threads and meets no barrier, so the same
function runs from :func:`~llmos.plugins.lm.kernels.linear_call` and inside the ``lm`` plugin's
whole-model decode step. Weight rows are split between threads in blocks of 4. Layouts:

- ``int8`` (weight-only): ``data`` int8 [N, K] row-major, ``scales`` float32 [N];
  W[n, k] = scales[n] * q[n, k]. Each 16 weights are widened to float32 in registers and FMA'd
  with float32 activations; the scale is applied once per output. Any K (a masked or scalar tail).
- ``int4`` (weight-only, groups of ``group`` = G along K): ``data`` uint8 [N, K/2]; within a
  row, the 32 weights of block b (k0 = 32 b) are the 16 bytes at byte k0/2, byte j holding
  u[k0 + j] in its low nibble and u[k0 + 16 + j] in its high nibble, u = q + 8 in 0..15.
  ``scales`` and ``zeros`` float32 [N, K/G]: scales s and offsets o, W[n, k] = s * u - o for the
  group of k (symmetric: o = 8 s; zero point z: o = s (8 + z)). So one 16-byte load unpacks with
  an AND and a shift into two runs of 16 consecutive k, which line up with 16 floats of x each:
  no shuffles. K % 32 == 0, G % 32 == 0 and K % G == 0 (else :func:`int4_desc` gives None).
  The weights are dequantized in registers (one fused multiply-subtract per 16, shared by up to
  4 input rows) rather than folding s and o in per group as s dot(u, x) - o sum(x) with
  per-call group sums of x: that form saves the multiply-subtracts but needs a second set of
  accumulators, so only 2 input rows fit a pass. Measured (2 threads, 3072x768, G=128): 4 % faster
  at one row, 1.45x slower at four. At one row int4 is bound by unpacking and dequantizing (9
  vector operations per 32 weights), not by memory: it runs as fast with its weights in cache.
- ``w8a8``: ``data`` int8 [N, K], ``scales`` float32 [N] (the weights'), ``extra`` int32 [N]
  (the row sums of q, for the VNNI offset). Each call quantizes each row of x symmetrically,
  sx = max|x| / 127 (1 when x is all zeros), xq = round-half-even(x / sx) clamped to +-127 (as
  :func:`~llmos.plugins.compress.qlinear.quantize_tokens` does it, so results match torch's to
  the bit before the residual), then y = add + float(dot(xq, q)) * (sx * scales[n]). VNNI
  (``dpbusd``: unsigned x signed bytes) takes u = xq + 128 and subtracts 128 * extra[n]; without
  VNNI, ``maddubs`` takes |q| as the unsigned side and xq with q's sign as the signed one, so no
  pair sum can saturate int16 (|q| <= 128, |xq| <= 127), then ``madd`` by ones widens to int32.
  Each thread quantizes x itself, 16 rows at a time (fewer when K > 8192) into a stack buffer of
  at most 128 KB, so no thread waits for another. Any K (masked or scalar tails).

Variants, by name (:attr:`NativeKernel.name`): ``int8.avx512``, ``int8.avx2``, ``int8.scalar``,
``int4.avx512``, ``int4.avx2``, ``int4.scalar``, ``w8a8.vnni512``, ``w8a8.avx512``,
``w8a8.avxvnni``, ``w8a8.avx2``, ``w8a8.scalar``. The AVX-512 ones need F+BW+VL (and VNNI for
vnni512), the AVX2 ones AVX2+FMA (and AVX-VNNI for avxvnni). Each reuses a loaded (and widened)
weight vector for up to 4 input rows (2 on AVX2) and prefetches 8 KB ahead in its weight rows, as
the float kernels of ``lm`` do 4 KB ahead. Float results equal float64 math on the dequantized
weights to float32 rounding (summation order differs).

The library is compiled on first use with :func:`~llmos.plugins.lm.kernels.build_library` (a few
seconds once per machine; cached by a hash of the source, compiler and flags) and loaded once per
process. Without a compiler :func:`kernels` is empty and :func:`status` says why.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from llmos.plugins.lm.kernels import LinearDesc, build_library, c_source

log = structlog.get_logger(__name__)

__all__ = ["NativeKernel", "int4_desc", "int8_desc", "kernels", "pack_int4", "status", "unpack_int4", "w8a8_desc"]

_SOURCE = c_source(Path(__file__).with_name("csrc") / "llmos_compress.c")

#: Bits of ``llmos_q_cpu_flags``, by name.
_FLAG_BITS = {"avx2": 1, "fma": 2, "avx512f": 4, "avx512bw": 8, "avx512vl": 16, "avx512vnni": 32, "avxvnni": 64, "avx512dq": 128}
_AVX2 = ("avx2", "fma")
_AVX512 = ("avx512f", "avx512bw", "avx512vl", "fma")

#: (scheme, isa, C symbol, CPU features it needs), fastest first where one can tell in advance.
_VARIANTS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("int8", "avx512", "llmos_q_int8_avx512", _AVX512),
    ("int8", "avx2", "llmos_q_int8_avx2", _AVX2),
    ("int8", "scalar", "llmos_q_int8_scalar", ()),
    ("int4", "avx512", "llmos_q_int4_avx512", _AVX512),
    ("int4", "avx2", "llmos_q_int4_avx2", _AVX2),
    ("int4", "scalar", "llmos_q_int4_scalar", ()),
    ("w8a8", "vnni512", "llmos_q_w8a8_vnni512", (*_AVX512, "avx512vnni")),
    ("w8a8", "avx512", "llmos_q_w8a8_avx512", _AVX512),
    ("w8a8", "avxvnni", "llmos_q_w8a8_avxvnni", (*_AVX2, "avxvnni")),
    ("w8a8", "avx2", "llmos_q_w8a8_avx2", _AVX2),
    ("w8a8", "scalar", "llmos_q_w8a8_scalar", ()),
)

#: LinearDesc.isa per variant isa (informational: each fn is one instruction set already).
_ISA_CODES = {"scalar": 0, "avx2": 1, "avx512": 2, "vnni512": 3, "avxvnni": 4}

_SCHEMES = ("int8", "int4", "w8a8")


@dataclass(frozen=True)
class NativeKernel:
    """One compiled variant of one scheme's kernel: ``fn`` is its address, for ``LinearDesc.fn``."""

    name: str  # "<scheme>.<isa>", e.g. "int4.avx512"
    scheme: str  # "int8" | "int4" | "w8a8"
    isa: str  # "avx512", "vnni512", "avx2", "avxvnni", "scalar"
    fn: int


@dataclass
class _Library:
    lib: ctypes.CDLL | None
    path: str | None
    reason: str
    flags: list[str]
    seconds: float | None
    kernels: dict[str, list[NativeKernel]]


_lock = threading.Lock()
_library: _Library | None = None


def _load() -> _Library:
    """Build (or find in the cache) and load the library, once per process; never raises."""
    global _library
    if _library is not None:
        return _library
    with _lock:
        if _library is None:
            _library = _open()
            if _library.lib is not None:
                log.info("compress_kernels_ready", library=_library.path, compile_seconds=_library.seconds, cpu_flags=_library.flags,
                         variants=[k.name for ks in _library.kernels.values() for k in ks])
            else:
                log.warning("compress_kernels_unavailable", reason=_library.reason)
        return _library


def _open() -> _Library:
    empty: dict[str, list[NativeKernel]] = {s: [] for s in _SCHEMES}
    try:
        path, seconds = build_library(_SOURCE, "llmos_compress")
        lib = ctypes.CDLL(str(path))
    except Exception as e:  # no compiler, a failed build, an unloadable file: run without, and say why
        return _Library(None, None, f"the C kernels did not build: {e}", [], None, empty)
    lib.llmos_q_cpu_flags.restype = ctypes.c_int
    lib.llmos_q_cpu_flags.argtypes = []
    bits = lib.llmos_q_cpu_flags()
    flags = [name for name, bit in _FLAG_BITS.items() if bits & bit]
    found: dict[str, list[NativeKernel]] = {s: [] for s in _SCHEMES}
    for scheme, isa, symbol, needs in _VARIANTS:
        if not all(f in flags for f in needs):
            continue
        try:
            fn = ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value
        except AttributeError:  # not compiled on this architecture (the SIMD ones off x86)
            continue
        if fn:
            found[scheme].append(NativeKernel(f"{scheme}.{isa}", scheme, isa, fn))
    simd = [k.name for ks in found.values() for k in ks if k.isa != "scalar"]
    reason = "loaded" + ("" if simd else " (no SIMD variant runs on this CPU: scalar only)")
    return _Library(lib, str(path), reason, flags, seconds, found)


def kernels(scheme: str) -> list[NativeKernel]:
    """The variants of ``scheme``'s kernel this CPU can run (empty without a compiler)."""
    if scheme not in _SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {', '.join(_SCHEMES)}")
    return list(_load().kernels[scheme])


def status() -> dict[str, Any]:
    """Where the library is (None when it did not build), why, the CPU's flags, the compile time."""
    lib = _load()
    return {"library": lib.path, "reason": lib.reason, "cpu_flags": list(lib.flags), "compile_seconds": lib.seconds}


def _check(kernel: NativeKernel, scheme: str) -> None:
    if kernel.scheme != scheme:
        raise ValueError(f"{kernel.name} is a {kernel.scheme} kernel, not {scheme}")


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` itself when it already is contiguous ``dtype`` (no copy of big weights), else a copy."""
    return t if t.dtype is dtype and t.is_contiguous() else t.to(dtype).contiguous()


def _desc(kernel: NativeKernel, n: int, k: int, data: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
          extra: torch.Tensor | None = None, group: int = 0) -> LinearDesc:
    return LinearDesc(fn=kernel.fn, N=n, K=k, data=data.data_ptr(), scales=scales.data_ptr(), zeros=None if zeros is None else zeros.data_ptr(),
                      extra=None if extra is None else extra.data_ptr(), group=group, isa=_ISA_CODES.get(kernel.isa, 0), flags=0)


def _int8_weights(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    if q.dim() != 2 or q.device.type != "cpu" or scales.device.type != "cpu" or q.is_floating_point() or q.shape[0] == 0 or q.shape[1] == 0:
        return None
    if scales.numel() != q.shape[0]:
        return None
    return _as(q, torch.int8), _as(scales.reshape(-1), torch.float32)


def int8_desc(kernel: NativeKernel, q: torch.Tensor, scales: torch.Tensor) -> tuple[LinearDesc, tuple] | None:
    """int8 weight-only: ``q`` int8 [N, K] (any K), ``scales`` [N]. (descriptor, tensors to keep alive)."""
    _check(kernel, "int8")
    w = _int8_weights(q, scales)
    if w is None:
        return None
    q, s = w
    return _desc(kernel, q.shape[0], q.shape[1], q, s), (q, s)


def w8a8_desc(kernel: NativeKernel, q: torch.Tensor, scales: torch.Tensor) -> tuple[LinearDesc, tuple] | None:
    """w8a8: ``q`` int8 [N, K] (any K), weight ``scales`` [N]; the row sums of ``q`` are computed here."""
    _check(kernel, "w8a8")
    w = _int8_weights(q, scales)
    if w is None:
        return None
    q, s = w
    sums = q.sum(dim=1, dtype=torch.int32).contiguous()
    return _desc(kernel, q.shape[0], q.shape[1], q, s, extra=sums), (q, s, sums)


def int4_desc(kernel: NativeKernel, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int, K: int) -> tuple[LinearDesc, tuple] | None:
    """int4 in groups of ``group`` along K: ``packed`` uint8 [N, K/2] (see :func:`pack_int4`),
    ``scales`` and ``offsets`` [N, K/group] (W = scales * u - offsets). None unless K % 32 == 0,
    group % 32 == 0 and K % group == 0."""
    _check(kernel, "int4")
    if K <= 0 or group <= 0 or K % 32 or group % 32 or K % group or packed.dim() != 2 or packed.shape[1] != K // 2 or packed.shape[0] == 0:
        return None
    if any(t.device.type != "cpu" for t in (packed, scales, offsets)) or packed.dtype not in (torch.uint8, torch.int8):
        return None
    n, groups = packed.shape[0], K // group
    if scales.numel() != n * groups or offsets.numel() != n * groups:
        return None
    p = packed if packed.is_contiguous() else packed.contiguous()  # int8 storage reads the same bytes
    s = _as(scales.reshape(n, groups), torch.float32)
    o = _as(offsets.reshape(n, groups), torch.float32)
    return _desc(kernel, n, K, p, s, zeros=o, group=group), (p, s, o)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] in [-8, 7] (K % 32 == 0) -> uint8 [N, K/2]: per block of 32 k, byte j holds
    k0 + j + 8 in its low nibble and k0 + 16 + j + 8 in its high nibble."""
    if q.dim() != 2 or q.shape[1] % 32:
        raise ValueError(f"pack_int4: need a 2-d [N, K] tensor with K % 32 == 0, got {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4: values must lie in [-8, 7]")
    n, k = q.shape
    u = (q.to(torch.int16) + 8).to(torch.uint8).view(n, k // 32, 2, 16)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor, K: int) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: uint8 [N, K/2] -> int8 [N, K] in [-8, 7], on packed's device."""
    if packed.dim() != 2 or K % 32 or packed.shape[1] != K // 2:
        raise ValueError(f"unpack_int4: need [N, K/2] with K % 32 == 0, got {tuple(packed.shape)} for K={K}")
    n = packed.shape[0]
    p = packed.view(torch.uint8).view(n, K // 32, 1, 16) if packed.dtype is torch.int8 else packed.reshape(n, K // 32, 1, 16)
    u = torch.cat([p & 15, p >> 4], dim=2).reshape(n, K)
    return u.to(torch.int8) - 8
