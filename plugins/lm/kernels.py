"""Weight-only bfloat16 linear layers for CPU decode: bf16 weights, float32 activations and sums.

Batch-1 decode is a chain of matrix-vector products that read every weight once per token, so its
speed is memory bandwidth: storing weights in bfloat16 halves the bytes. Torch's own bf16 matmul
on CPUs without native bf16 (no AVX512-BF16/AMX) is barely faster than float32, and full-bf16 math
loses accuracy, so :func:`bf16_linear` runs a small C kernel instead: it widens 16 weights at a
time to float32 in registers (a zero-extend and a shift) and accumulates in float32, reusing each
loaded weight vector for up to 4 input rows. Results equal float32 math on bf16-rounded weights up
to summation order.

The kernel is compiled on first use with the system C compiler (about a second; no torch headers,
so no torch ABI to match), cached machine-wide under ``~/.cache/llmos/cache/kernels`` (see
:func:`machine_cache`; override: ``LLMOS_KERNEL_CACHE``) by a hash of its source, flags and
compiler, and loaded with ctypes. It
uses OpenMP with torch's thread count, and resolves to the libgomp torch already loaded, so both
share one thread pool. Without a compiler, or on a CPU without AVX2+FMA, a pure-torch path
(weights upcast tile by tile) gives the same numbers, slower; :func:`kernel_status` says which path
is active and why. ``LLMOS_BF16_KERNEL`` = ``auto`` (default) | ``avx512`` | ``avx2`` | ``scalar``
| ``torch`` forces a path.

The same library holds a float32-weight variant of the kernel (as fast as MKL's ``sgemv`` at one
row on this kind of machine, and it adds a residual as it writes) and ``llmos_decode_step``: a
whole single-token step of a Llama (embedding, RMS norms, fused projections, rotary embedding,
KV-cache write and grouped-query attention, SwiGLU, ``lm_head``) in one call and one OpenMP
region, for float32 or bfloat16 weights; :class:`~llmos.plugins.lm.model.Decoder` drives it
through :class:`StepArgs`. Where the library is not in use (``LLMOS_BF16_KERNEL=torch`` too), the
decoder takes its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
import torch.nn.functional as F
from torch import nn

log = structlog.get_logger(__name__)

__all__ = ["CSRC", "BF16Linear", "DenseLinear", "KernelStatus", "LinearDesc", "PackedLinear", "StepArgs", "bf16_linear", "build_library", "c_source", "kernel_status", "linear_call", "use_bf16_weights"]

#: Above this many input rows (prefill), upcast weight tiles and let torch's GEMM do the math:
#: the kernel's 4-row reuse is built for decode batches, not for compute-bound matrix products
#: (measured on preset small: the kernel is 1.3x float32 GEMM at 16 rows, even at 32).
MAX_KERNEL_ROWS = 32

#: Rows of W widened to float32 at once on the torch path: 512 KB of float32, so a tile stays in L2.
_TILE_FLOATS = 1 << 17

_ISAS = {"avx512": 2, "avx2": 1, "scalar": 0}

#: The C sources, shipped as package data beside this module (``csrc/``).
CSRC = Path(__file__).with_name("csrc")


def c_source(path: Path) -> str:
    """A C file's text with ``#include "llmos_linear.h"`` expanded (the shared ABI header), so a
    library's cache key (its source's hash) covers the header too."""
    text = path.read_text()
    return text.replace('#include "llmos_linear.h"', (CSRC / "llmos_linear.h").read_text())


_SOURCE = c_source(CSRC / "llmos_bf16.c")

_CFLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp"]


@dataclass(frozen=True)
class KernelStatus:
    """Which path :func:`bf16_linear` takes on this machine, and why."""

    path: str  # "native" (the C kernel) or "torch"
    isa: str | None  # "avx512", "avx2" or "scalar" on the native path
    reason: str
    library: str | None = None
    compile_seconds: float | None = None  # None when the library came from the cache
    openmp: bool = False


class StepArgs(ctypes.Structure):
    """``llmos_step`` in the C source: one decode step's shapes, weights, cache and buffers."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("L", "B", "H", "nh", "nkv", "d", "inter", "V", "k_layer", "k_slot", "k_head")),
        *((name, ctypes.c_void_p) for name in ("layers", "norm", "head", "embed", "ids", "slots", "pos", "cos", "sin", "k", "v")),
        *((name, ctypes.c_void_p) for name in ("x", "h", "qkv", "att", "gu", "act", "logits")),
        ("eps", ctypes.c_float),
        ("isa", ctypes.c_int32),
        ("wt", ctypes.c_int32),
        ("threads", ctypes.c_int32),
    ]


class LinearDesc(ctypes.Structure):
    """``llmos_linear`` in the C source: a linear layer in any storage, as a native kernel reads it.

    ``fn`` is the address of a C function ``fn(desc, x, y, add, add_ld, M, t, T)`` computing thread
    t's share (of T) of the output rows (see the C source); the other fields are what ``fn`` reads.
    The object that made a descriptor keeps the tensors it points into alive."""

    _fields_ = [
        ("fn", ctypes.c_void_p),
        ("N", ctypes.c_int64),
        ("K", ctypes.c_int64),
        ("data", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("zeros", ctypes.c_void_p),
        ("extra", ctypes.c_void_p),
        ("group", ctypes.c_int64),
        ("isa", ctypes.c_int64),
        ("flags", ctypes.c_int64),
    ]


class _Native:
    def __init__(self, lib: ctypes.CDLL, isa: int) -> None:
        self.fn = lib.llmos_bf16_linear
        self.f32 = lib.llmos_f32_linear
        for fn in (self.fn, self.f32):
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int] * 2
        self.step = lib.llmos_decode_step
        self.step.restype = None
        self.step.argtypes = [ctypes.POINTER(StepArgs)]
        self.call = lib.llmos_linear_call
        self.call.restype = None
        self.call.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_int]
        self.dense_fn = ctypes.cast(lib.llmos_dense_linear_fn, ctypes.c_void_p).value
        self.isa = isa
        self.sizes: dict[str, int] = {}  # the C structs' sizes, to compare with their ctypes mirrors
        for name in ("step", "linear"):
            fn = getattr(lib, f"llmos_sizeof_{name}")
            fn.restype, fn.argtypes = ctypes.c_int64, []
            self.sizes[name] = int(fn())


_lock = threading.Lock()
_status: KernelStatus | None = None
_native: _Native | None = None


def machine_cache(kind: str) -> Path:
    """Where what is built or measured for this machine is kept (``kind``: ``kernels``, or a
    plugin's own folder): ``LLMOS_KERNEL_CACHE`` when set, else ``$XDG_CACHE_HOME/llmos/cache/KIND``
    (``~/.cache/llmos/cache/KIND``), shared by every state dir on the machine, as torch's inductor
    and triton caches are: what is kept is named by a hash of what it depends on, so state dirs
    never disagree, and a second state dir (every test's kernel, a benchmark's) does not compile
    again. Where that folder cannot be made, the state dir's ``cache/KIND``."""
    explicit = os.environ.get("LLMOS_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmos" / "cache" / kind
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    state = os.environ.get("LLMOS_STATE_DIR")
    return (Path(state) / "cache" / kind) if state else home


def _cache_dir() -> Path:
    return machine_cache("kernels")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build_library(source: str, name: str, cc: str | None = None, flags: list[str] | None = None) -> tuple[Path, float | None]:
    """A shared library compiled from C ``source``, from the kernel cache or compiled into it
    (``name`` prefixes the file; the key hashes source, compiler, flags and machine). Returns the
    path and the compile time (None from the cache). Plugins build their own kernels with it.

    Process-safe without locks: each process compiles to its own temporary name and renames it into
    place atomically, so a reader sees either no library or a whole one. RuntimeError when there
    is no compiler or it fails.
    """
    cc = cc or _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc, clang; or set CC)")
    flags = list(_CFLAGS if flags is None else flags)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    key = hashlib.sha256("\0".join([source, cc, version, platform.machine(), *flags]).encode()).hexdigest()[:16]
    directory = _cache_dir()
    target = directory / f"{name}_{key}.so"
    if target.exists():
        return target, None
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as tmp:
        src = Path(tmp) / f"{name}.c"
        src.write_text(source)
        out = Path(tmp) / target.name
        proc = subprocess.run([cc, *flags, str(src), "-o", str(out)], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{Path(cc).name} exited {proc.returncode}: {' | '.join(tail)}")
        os.replace(out, target)
    return target, time.perf_counter() - start


def _build(cc: str) -> tuple[Path, float | None]:
    return build_library(_SOURCE, "llmos_bf16", cc)


def _load() -> KernelStatus:
    """Pick the path once per process (thread-safe); compiles on the first call on a machine."""
    global _status, _native
    if _status is not None:
        return _status
    with _lock:
        if _status is not None:
            return _status
        _status, _native = _choose()
        if _status.path == "native":
            log.info("bf16_kernel_ready", isa=_status.isa, library=_status.library, compile_seconds=_status.compile_seconds)
        else:
            log.warning("bf16_kernel_fallback", reason=_status.reason)
        return _status


def _choose() -> tuple[KernelStatus, _Native | None]:
    wanted = os.environ.get("LLMOS_BF16_KERNEL", "auto").strip().lower() or "auto"
    if wanted not in ("auto", "torch", *_ISAS):
        raise ValueError(f"LLMOS_BF16_KERNEL={wanted!r}; expected auto, avx512, avx2, scalar or torch")
    if wanted == "torch":
        return KernelStatus("torch", None, "LLMOS_BF16_KERNEL=torch"), None
    cc = _compiler()
    if cc is None:
        return KernelStatus("torch", None, "no C compiler found (cc, gcc, clang; or set CC)"), None
    try:
        library, seconds = _build(cc)
        lib = ctypes.CDLL(str(library))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return KernelStatus("torch", None, f"the C kernel did not build: {e}"), None
    supported = lib.llmos_bf16_isa()
    openmp = bool(lib.llmos_bf16_openmp())
    names = {v: k for k, v in _ISAS.items()}
    if wanted == "auto":
        if supported == 0:
            return KernelStatus("torch", None, "the CPU has neither AVX-512F nor AVX2+FMA", str(library), seconds, openmp), None
        isa, reason = supported, "auto"
    elif _ISAS[wanted] > supported:
        return KernelStatus("torch", None, f"LLMOS_BF16_KERNEL={wanted} but the CPU supports only {names[supported]}", str(library), seconds, openmp), None
    else:
        isa, reason = _ISAS[wanted], f"LLMOS_BF16_KERNEL={wanted}"
    return KernelStatus("native", names[isa], reason, str(library), seconds, openmp), _Native(lib, isa)


def _load_native() -> _Native | None:
    _load()
    return _native


def kernel_status() -> KernelStatus:
    """Which path :func:`bf16_linear` takes here, and why (compiles the kernel if not yet done)."""
    return _load()


def _reset() -> None:
    """Forget the chosen path, so the next call chooses again (tests change the environment)."""
    global _status, _native
    with _lock:
        _status, _native = None, None


def _torch_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Float32 math on bf16 weights, widened a tile of rows at a time (for prefill, and the fallback)."""
    n, k = weight.shape
    rows = max(1, _TILE_FLOATS // max(k, 1)) if x.shape[0] <= MAX_KERNEL_ROWS else max(256, (64 * _TILE_FLOATS) // max(k, 1))
    if rows >= n:
        return F.linear(x, weight.float())
    return torch.cat([F.linear(x, weight[i : i + rows].float()) for i in range(0, n, rows)], dim=-1)


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias + residual`` in float32 for a bfloat16 ``weight`` [out, in] (contiguous,
    or it is copied on every call); x [..., in] -> float32 [..., out].

    ``residual`` [..., out] is added as the outputs are written (a decoder's skip connection
    without another pass). Up to :data:`MAX_KERNEL_ROWS` rows go through the C kernel; more rows,
    other devices, autograd through ``x`` and the fallback go through torch, with the same math.
    """
    native = _native if _status is not None else _load_native()
    # The decode case first, in as few torch calls as possible: at ~1 us a call from Python, the
    # checks and the allocation cost as much as a small layer's weights take to read.
    if (
        native is not None
        and bias is None
        and x.dim() == 2
        and x.dtype is torch.float32
        and weight.dtype is torch.bfloat16
        and weight.dim() == 2
        and x.is_cpu
        and weight.is_cpu
        and x.is_contiguous()
        and weight.is_contiguous()
        and not (x.requires_grad and torch.is_grad_enabled())
    ):
        m, k = x.shape
        n, kw = weight.shape
        if k == kw and 0 < m <= MAX_KERNEL_ROWS:
            if residual is None:
                add, add_ld = None, 0
            elif residual.dtype is torch.float32 and residual.is_contiguous() and residual.shape == (m, n) and not (residual.requires_grad and torch.is_grad_enabled()):
                add, add_ld = residual.data_ptr(), n
            else:
                return _bf16_linear(x, weight, bias, residual, native)
            y = torch.empty(m, n) if torch.get_default_dtype() is torch.float32 else torch.empty(m, n, dtype=torch.float32)
            native.fn(x.data_ptr(), weight.data_ptr(), y.data_ptr(), add, add_ld, m, k, n, native.isa, torch.get_num_threads())
            return y
    return _bf16_linear(x, weight, bias, residual, native)


def _bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, native: _Native | None) -> torch.Tensor:
    """:func:`bf16_linear` for every case: checks, reshapes, casts, then the kernel or torch."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2:
        raise TypeError(f"bf16_linear: weight must be a 2-d bfloat16 tensor, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"bf16_linear: x has {x.shape[-1]} features, the weight expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).float()
    if (
        native is None
        or x2.shape[0] > MAX_KERNEL_ROWS
        or x2.device.type != "cpu"
        or weight.device.type != "cpu"
        or (torch.is_grad_enabled() and (x2.requires_grad or (residual is not None and residual.requires_grad)))
    ):
        y = _torch_linear(x2, weight)
        if bias is not None:
            y = y + bias.float()
        if residual is not None:
            y = y + residual.reshape(y.shape).float()
        return y.reshape(*lead, n)
    add, add_ld = None, 0
    if residual is not None:
        add = residual.reshape(x2.shape[0], n).float().contiguous()
        if bias is not None:
            add = add + bias.float()
        add_ld = n
    elif bias is not None:
        add = bias.float().contiguous()
    x2 = x2.contiguous()
    w = weight if weight.is_contiguous() else weight.contiguous()
    y = torch.empty((x2.shape[0], n), dtype=torch.float32)
    if x2.shape[0]:
        native.fn(x2.data_ptr(), w.data_ptr(), y.data_ptr(), None if add is None else add.data_ptr(), add_ld,
                  x2.shape[0], k, n, native.isa, torch.get_num_threads())
    return y.reshape(*lead, n)


class BF16Linear(nn.Module):
    """A linear layer holding its weight in bfloat16 and computing in float32 (see :func:`bf16_linear`).

    ``weight`` keeps the name and shape of :class:`torch.nn.Linear`'s, so state dicts line up. If
    something casts it back to another dtype (``module.float()``), forward falls back to ``F.linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.bfloat16, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BF16Linear:
        """A copy of ``linear`` with its weight rounded to bfloat16 (the bias stays float32)."""
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=linear.weight.device)
        with torch.no_grad():
            out.weight.copy_(linear.weight.detach())
            if linear.bias is not None:
                out.bias.copy_(linear.bias.detach().float())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != torch.bfloat16:
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return bf16_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def use_bf16_weights(model: nn.Module) -> nn.Module:
    """Swap every :class:`torch.nn.Linear` in ``model`` for a :class:`BF16Linear`, in place; returns ``model``.

    The rest of the model (embeddings, norms) stays as it is, so activations stay float32. A linear
    shared between two places stays shared. A tied ``lm_head`` gets its own bf16 copy: the embedding
    keeps its float32 table for lookups.
    """
    if isinstance(model, nn.Linear):
        raise TypeError("use_bf16_weights: pass the model that holds the linear, or use BF16Linear.from_linear")
    swapped: dict[int, BF16Linear] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):  # named_children() skips repeats of a shared child
            if isinstance(child, nn.Linear):
                if id(child) not in swapped:
                    swapped[id(child)] = BF16Linear.from_linear(child)
                setattr(parent, name, swapped[id(child)])
    return model


def linear_call(desc: LinearDesc, x: torch.Tensor, out: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Run the native linear ``desc`` on float32 ``x`` [M, K] (contiguous): ``x @ W.T`` (+ residual),
    on torch's thread count. RuntimeError when the native library is not in use here."""
    native = _load_native()
    if native is None:
        raise RuntimeError(f"the native kernels are not in use here: {kernel_status().reason}")
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, desc.N, dtype=torch.float32)
    add = 0 if residual is None else residual.data_ptr()
    add_ld = 0 if residual is None else residual.stride(0)
    native.call(ctypes.addressof(desc), x.data_ptr(), out.data_ptr(), add, add_ld, m, torch.get_num_threads())
    return out


class PackedLinear(nn.Module):
    """A bias-free linear layer whose weight is stored in another form than a float matrix
    (quantized, packed): what :class:`~llmos.plugins.lm.model.Decoder` runs when a model holds
    such layers (the compress plugin's quantized layers are these).

    A subclass holds ``in_features`` and ``out_features`` and implements:

    - ``forward(x, residual=None)``: ``x @ W.T`` (+ ``residual``) for ``x`` [..., in_features];
    - ``stack(parts)`` (a classmethod): one layer of the parts' rows concatenated (q, k, v into
      qkv), and each part as a view of its rows, so the weights are held once;
    - ``descriptor(rows)``: the :class:`LinearDesc` of the native kernel this layer runs for that
      many input rows, or None when its fastest path for them is not a native kernel (the decoder
      then takes its torch path for that batch size);
    - optionally ``prepare()``: choose kernels up front (the decoder calls it once it has fused).
    """

    in_features: int
    out_features: int

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def stack(cls, parts: list[PackedLinear]) -> tuple[PackedLinear, list[PackedLinear]]:
        raise NotImplementedError

    def descriptor(self, rows: int) -> LinearDesc | None:
        return None

    def prepare(self) -> None:
        """Settle how this layer runs (choose its kernels) before the first call; optional."""


class DenseLinear(PackedLinear):
    """A float32 (or bfloat16-stored) weight [out, in] behind the :class:`PackedLinear` interface:
    the layers a compressed model keeps dense (an lm_head left as it was) run in the same step."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self._desc: LinearDesc | None = None

    @classmethod
    def stack(cls, parts: list[PackedLinear]) -> tuple[DenseLinear, list[PackedLinear]]:
        fused = cls(torch.cat([p.weight.detach() for p in parts]).contiguous())  # type: ignore[union-attr]
        views, row = [], 0
        for p in parts:
            views.append(cls(fused.weight.detach()[row : row + p.out_features]))
            row += p.out_features
        return fused, views

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight
        if w.dtype == torch.bfloat16 and x.dtype == torch.float32:
            return bf16_linear(x, w, residual=residual)
        if residual is None:
            return F.linear(x, w.to(x.dtype))
        return torch.addmm(residual.reshape(-1, w.shape[0]), x.reshape(-1, w.shape[1]), w.to(x.dtype).t()).view(*x.shape[:-1], w.shape[0])

    def descriptor(self, rows: int) -> LinearDesc | None:
        native = _load_native()
        w = self.weight
        if native is None or w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16) or not w.is_contiguous():
            return None
        if self._desc is None:
            self._desc = LinearDesc(fn=native.dense_fn, N=w.shape[0], K=w.shape[1], data=w.data_ptr(), isa=native.isa, flags=1 if w.dtype == torch.float32 else 0)
        return self._desc
