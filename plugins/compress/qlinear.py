"""Quantized linear layers, each running the fastest of several kernels that are correct here.

Which kernel is fastest changes from one CPU to the next (and with the batch size): torch's
packed int8/int4 ops are fast on one machine and 5-10x slower than a float32 linear on another,
a kernel tuned for AVX-512 loses on AVX2. So a layer offers every candidate it has for its scheme:

- this plugin's C kernels (:mod:`~llmos.plugins.compress.native`), one per instruction set
  the CPU has; these also run inside the whole-model decode step of the ``lm`` plugin;
- torch's ops: ``aten._weight_int8pack_mm`` (float32 or bfloat16 activations),
  ``aten._weight_int4pack_mm_for_cpu`` (bfloat16), ``torch._int_mm`` (int8 x int8);
- dequantize-then-matmul, always correct, the reference the others are checked against.

At load (:func:`prepare`) each (scheme, shape, batch bucket) is settled once: the candidates
that agree with the fallback on a random input are timed on a set of random weights of that
shape larger than the last-level cache (at batch 1 a layer's weights come from memory, not from
cache: timing one small matrix over and over measures the wrong thing), and the fastest is kept.
The choices are cached in ``<state dir or ~/.cache/llmos>/cache/compress`` per CPU model, flags,
thread count, torch version and kernel source; :func:`choices` reports them and why.
``LLMOS_COMPRESS_KERNEL=NAME`` forces a candidate wherever it applies (tests, debugging).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
import torch.nn.functional as F

from llmos.plugins.compress import native, quant
from llmos.plugins.lm.kernels import LinearDesc, PackedLinear, linear_call

log = structlog.get_logger(__name__)

#: Input rows a choice is made for: decode at batch 1, small batches, larger batches, prefill.
BUCKETS = (1, 4, 16, 128)

#: Bytes of weights timed round-robin: past this machine's last-level cache (see :func:`_llc_bytes`).
_MIN_SET_BYTES = 64 << 20

Fn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

#: How far a candidate that rounds activations to bfloat16 may stray from the reference (max error
#: over the output's range). Rounding activations is not part of any scheme here: it moves logits
#: by ~0.3 % (relative L2), as much as int8 weights do, so by default such candidates are refused
#: (``llmos kernels`` shows why); ``LLMOS_COMPRESS_BF16_ACTIVATIONS=1`` admits them where they win.
BF16_TOLERANCE = 1e-2 if os.environ.get("LLMOS_COMPRESS_BF16_ACTIVATIONS") == "1" else 1e-4

#: torch's own ops offered as candidates (where the scheme and device allow).
TORCH_CANDIDATES = ("torch.int8pack_mm", "torch.int8pack_mm.bf16", "torch.int_mm", "torch.int4pack_mm")


def bucket(rows: int) -> int:
    for b in BUCKETS:
        if rows <= b:
            return b
    return BUCKETS[-1]


@dataclass
class Candidate:
    """A way to run a layer: ``fn(x [M, K] float32, residual [M, N] | None) -> [M, N]``, and its
    native descriptor when it is one of this plugin's C kernels."""

    name: str
    fn: Fn
    desc: LinearDesc | None = None
    keep: Any = None  # tensors the descriptor points into
    tolerance: float = 1e-4  # allowed max |error| / max |reference| against the fallback
    note: str = ""


def _add(y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    return y if residual is None else y.add_(residual)


class QuantLinear(PackedLinear):
    """A bias-free linear layer with quantized weights (see subclasses); ``choice`` maps each
    batch bucket to the candidate it runs."""

    scheme = ""

    def __init__(self) -> None:
        super().__init__()
        self.choice: dict[int, str] = {}
        self._made: dict[str, Candidate] = {}

    # Subclasses: the names of their candidates here, and how to make one.
    def candidate_names(self) -> list[str]:
        raise NotImplementedError

    def make(self, name: str) -> Candidate | None:
        raise NotImplementedError

    def fallback(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def key(self) -> str:
        """What a choice depends on besides the batch bucket: scheme and shape."""
        return f"{self.scheme}:{self.out_features}x{self.in_features}"

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def candidate(self, name: str) -> Candidate | None:
        if name not in self._made:
            made = self.make(name) if name != "dequant" else Candidate("dequant", self.fallback)
            if made is None:
                return None
            self._made[name] = made
        return self._made[name]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        rows = x2.shape[0]
        name = self.choice.get(bucket(rows))
        if name is None:
            prepare([self])
            name = self.choice.get(bucket(rows), "dequant")
        dtype = x2.dtype
        if x2.device.type == "cpu" and dtype != torch.float32:
            x2 = x2.float()
        x2 = x2.contiguous()
        r2 = None if residual is None else residual.reshape(rows, self.out_features).to(x2.dtype).contiguous()
        cand = self.candidate(name) or self.candidate("dequant")
        assert cand is not None
        y = cand.fn(x2, r2)
        return y.to(dtype).view(*shape[:-1], self.out_features)

    def prepare(self) -> None:
        prepare([self])

    def descriptor(self, rows: int) -> LinearDesc | None:
        name = self.choice.get(bucket(rows))
        if name is None:
            prepare([self])
            name = self.choice.get(bucket(rows))
        cand = self.candidate(name) if name else None
        return cand.desc if cand is not None else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, choice={self.choice}"


def _native_candidate(name: str, desc_and_keep: tuple[LinearDesc, Any] | None, note: str) -> Candidate | None:
    if desc_and_keep is None:
        return None
    desc, keep = desc_and_keep

    def fn(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return linear_call(desc, x, residual=residual)

    return Candidate(name, fn, desc=desc, keep=keep, note=note)


class Int8Linear(QuantLinear):
    """int8 weights per output channel (``qweight`` [N, K], ``scale`` [N]); float32 activations,
    or with ``act_int8`` (the w8a8 scheme) activations quantized to int8 per token at run time."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, act_int8: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.float().reshape(-1).contiguous())
        self.act_int8 = act_int8
        self.scheme = "w8a8" if act_int8 else "int8"

    @classmethod
    def stack(cls, parts: list[PackedLinear]) -> tuple[Int8Linear, list[PackedLinear]]:
        fused = cls(torch.cat([p.qweight for p in parts]), torch.cat([p.scale for p in parts]), parts[0].act_int8)  # type: ignore[union-attr]
        views, row = [], 0
        for p in parts:
            n = p.out_features
            views.append(cls(fused.qweight[row : row + n], fused.scale[row : row + n], fused.act_int8))
            row += n
        return fused, views

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scale.to(dtype)[:, None]

    #: How the layer is stored (compressed-tensors formats): int8 values as they are, or 4 to an int32.
    ct_format = "int-quantized"

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        # compressed-tensors' names, so the state dict is the checkpoint (see ctformat.py).
        if self.ct_format == "pack-quantized":
            destination[prefix + "weight_packed"] = quant.pack_int32(self.qweight, 8)
            destination[prefix + "weight_shape"] = torch.tensor([self.out_features, self.in_features])
        else:
            destination[prefix + "weight"] = self.qweight
        destination[prefix + "weight_scale"] = self.scale[:, None]

    def fallback(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if self.act_int8:
            xq, sx = quantize_tokens(x)
            y = F.linear(xq.to(x.dtype), self.qweight.to(x.dtype)) * (sx[:, None] * self.scale.to(x.dtype)[None, :])
            return _add(y, residual)
        return _add(F.linear(x, self.dequantized(x.dtype)), residual)

    def candidate_names(self) -> list[str]:
        names = ["dequant"]
        if self.act_int8:
            names += [k.name for k in native.kernels("w8a8")] + ["torch.int_mm"]
        else:
            names += [k.name for k in native.kernels("int8")] + ["torch.int8pack_mm", "torch.int8pack_mm.bf16"]
        return names

    def make(self, name: str) -> Candidate | None:
        q, s = self.qweight, self.scale
        cpu = q.device.type == "cpu"
        if name.startswith("torch.") and q.data_ptr() % 64:
            q = q.clone()  # torch's packed kernels assume aligned rows (a misaligned view crashes them)
        for k in native.kernels(self.scheme) if cpu else ():
            if k.name == name:
                built = native.w8a8_desc(k, q, s) if self.act_int8 else native.int8_desc(k, q, s)
                return _native_candidate(name, built, f"llmos C kernel, {k.isa}")
        if name == "torch.int8pack_mm":

            def fn(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
                return _add(torch._weight_int8pack_mm(x, q, s.to(x.dtype)), residual)

            return Candidate(name, fn, note="aten._weight_int8pack_mm, float32 activations")
        if name == "torch.int8pack_mm.bf16":
            if q.shape[1] % 32:
                return None  # aten's bf16 path reads past the row when K is not a multiple of 32 (a segfault at K=91)
            sb = s.to(torch.bfloat16)

            def fn(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
                return _add(torch._weight_int8pack_mm(x.to(torch.bfloat16), q, sb).float(), residual)

            return Candidate(name, fn, tolerance=BF16_TOLERANCE, note="aten._weight_int8pack_mm, activations rounded to bfloat16")
        if name == "torch.int_mm":
            qt = q.t()

            def fn(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
                xq, sx = quantize_tokens(x)
                y = torch._int_mm(xq, qt).float().mul_(sx[:, None]).mul_(s)  # in place: ~10x faster than one broadcast product
                return y.add_(residual) if residual is not None else y

            return Candidate(name, fn, note="torch._int_mm on per-token int8 activations")
        return None


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of ``x`` [M, K]: (q int8, scale [M]) with x ~ q * scale, |q| <= 127."""
    amax = torch.maximum(x.amax(dim=1), -x.amin(dim=1)).float()
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.div(x.float(), scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale.to(x.dtype)


class Int4Linear(QuantLinear):
    """int4 weights in groups of ``group`` inputs: ``packed`` uint8 [N, K/2] (the layout of
    :func:`~llmos.plugins.compress.native.pack_int4`), ``scale`` [N, K/group], ``zero`` int8
    [N, K/group] (asymmetric) or absent; ``offset`` = scale * (8 + zero) is what kernels read
    (w = scale * (q + 8) - offset)."""

    scheme = "int4"

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int, in_features: int) -> None:
        super().__init__()
        self.out_features, self.in_features, self.group = packed.shape[0], in_features, group
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero", None if zero is None else zero.to(torch.int8).contiguous())
        z = 0.0 if zero is None else self.zero.float()
        self.register_buffer("offset", (self.scale * (8.0 + z)).contiguous())

    def key(self) -> str:
        return f"int4:{self.out_features}x{self.in_features}:g{self.group}"

    @classmethod
    def stack(cls, parts: list[PackedLinear]) -> tuple[Int4Linear, list[PackedLinear]]:
        p0: Any = parts[0]
        zero = torch.cat([p.zero for p in parts]) if p0.zero is not None else None  # type: ignore[union-attr]
        fused = cls(torch.cat([p.packed for p in parts]), torch.cat([p.scale for p in parts]), zero, p0.group, p0.in_features)  # type: ignore[union-attr]
        views, row = [], 0
        for p in parts:
            n = p.out_features
            z = fused.zero[row : row + n] if fused.zero is not None else None
            views.append(cls(fused.packed[row : row + n], fused.scale[row : row + n], z, fused.group, fused.in_features))
            row += n
        return fused, views

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight_packed"] = quant.pack_int32(self.int_weights(), 4)
        destination[prefix + "weight_shape"] = torch.tensor([self.out_features, self.in_features])
        destination[prefix + "weight_scale"] = self.scale
        if self.zero is not None:
            destination[prefix + "weight_zero_point"] = quant.pack_int32(self.zero, 4, dim=0)

    def int_weights(self) -> torch.Tensor:
        return native.unpack_int4(self.packed, self.in_features)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k, g = self.out_features, self.in_features, self.group
        u = (self.int_weights().to(dtype) + 8).view(n, k // g, g)
        return (u * self.scale.to(dtype)[:, :, None] - self.offset.to(dtype)[:, :, None]).view(n, k)

    def fallback(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return _add(F.linear(x, self.dequantized(x.dtype)), residual)

    def candidate_names(self) -> list[str]:
        return ["dequant", *(k.name for k in native.kernels("int4")), "torch.int4pack_mm"]

    def make(self, name: str) -> Candidate | None:
        cpu = self.packed.device.type == "cpu"
        for k in native.kernels("int4") if cpu else ():
            if k.name == name:
                return _native_candidate(name, native.int4_desc(k, self.packed, self.scale, self.offset, self.group, self.in_features), f"llmos C kernel, {k.isa}")
        if name == "torch.int4pack_mm" and cpu:
            try:
                u = (self.int_weights().to(torch.int32) + 8).contiguous()
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 2)
                # tinygemm's form: w = (u - 8) * scale + zero, so zero = 8 * scale - offset.
                sz = torch.stack([self.scale.t(), (8 * self.scale - self.offset).t()], -1).to(torch.bfloat16).contiguous()
            except (RuntimeError, AttributeError):
                return None
            group = self.group

            def fn(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, group, sz).float()
                return _add(y, residual)

            return Candidate(name, fn, tolerance=BF16_TOLERANCE, note="aten._weight_int4pack_mm_for_cpu, bfloat16 activations and scales")
        return None


# -- choosing ------------------------------------------------------------------------------------

_lock = threading.Lock()
_memo: dict[str, dict[str, Any]] | None = None  # the cache file's choices, in memory


#: Bump when a candidate's Python side changes speed (the C kernels are covered by their library's hash).
CANDIDATES_VERSION = "2"


def cache_key() -> str:
    """What the choices depend on: CPU model and flags, threads, torch, the kernels' source."""
    cpu = _cpu_model()
    flags = " ".join(sorted(native.status().get("cpu_flags", [])))
    parts = [CANDIDATES_VERSION, cpu, flags, platform.machine(), torch.__version__, str(torch.get_num_threads()), str(BF16_TOLERANCE), str(native.status().get("library"))]  # the library name hashes its source
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_file() -> Path:
    from llmos.plugins.lm.kernels import machine_cache

    return machine_cache("compress") / f"choices-{cache_key()}.json"


def _load_cache() -> dict[str, dict[str, Any]]:
    global _memo
    if _memo is None:
        try:
            _memo = json.loads(_cache_file().read_text())
            if not isinstance(_memo, dict):
                _memo = {}
        except (OSError, ValueError):
            _memo = {}
    return _memo


def _save_cache() -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(_memo, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache costs a re-measure next time, nothing else
        log.warning("compress_choice_cache_unwritable", path=str(path), error=str(exc))


def choices() -> dict[str, Any]:
    """Every choice made on this machine so far (from the cache and this process), with timings."""
    with _lock:
        return {"cache": str(_cache_file()), "key": cache_key(), "choices": dict(_load_cache())}


def forget() -> None:
    """Drop the in-memory choices (tests change the environment)."""
    global _memo
    with _lock:
        _memo = None


def prepare(layers: list[PackedLinear], buckets: tuple[int, ...] = BUCKETS) -> None:
    """Settle every layer's kernel for each batch bucket (measuring where the cache has no answer)."""
    forced = os.environ.get("LLMOS_COMPRESS_KERNEL", "").strip()
    if forced:
        known = {"dequant", *TORCH_CANDIDATES, *(k.name for scheme in ("int8", "int4", "w8a8") for k in native.kernels(scheme))}
        if forced not in known:
            raise ValueError(f"LLMOS_COMPRESS_KERNEL={forced!r} is not a candidate kernel here; candidates: {', '.join(sorted(known))}")
    with _lock:
        cache = _load_cache()
        dirty = False
        for layer in layers:
            if not isinstance(layer, QuantLinear):
                continue
            names = layer.candidate_names()
            device = layer.packed.device if isinstance(layer, Int4Linear) else layer.qweight.device  # type: ignore[attr-defined]
            for b in buckets:
                if forced and forced in names:
                    if layer.candidate(forced) is None:
                        raise ValueError(f"LLMOS_COMPRESS_KERNEL={forced!r} cannot run {layer.key()} (unsupported shape)")
                    layer.choice[b] = forced
                    continue
                entry_key = f"{layer.key()}:{device.type}:b{b}"
                entry = cache.get(entry_key)
                if entry is None or entry.get("chosen") not in names or layer.candidate(entry["chosen"]) is None:
                    entry = _measure(layer, b)
                    cache[entry_key] = entry
                    dirty = True
                layer.choice[b] = entry["chosen"]
            # Candidates that lost hold their own copies of the weights (torch's packed layouts): drop them.
            for name in [n for n in layer._made if n not in layer.choice.values()]:
                del layer._made[name]
        if dirty:
            _save_cache()


def _check(layer: QuantLinear, cand: Candidate, x: torch.Tensor, ref: torch.Tensor) -> str | None:
    """Why ``cand`` is wrong for ``layer`` on ``x``, or None when it agrees with the fallback."""
    try:
        residual = torch.randn_like(ref)
        got = cand.fn(x.clone(), None)
        got_r = cand.fn(x.clone(), residual.clone())
    except Exception as exc:  # an op this build or shape does not support is not a candidate
        return f"failed: {type(exc).__name__}: {str(exc)[:120]}"
    scale = float(ref.abs().max()) or 1.0
    err = max(float((got - ref).abs().max()), float((got_r - (ref + residual)).abs().max()))
    if not err <= cand.tolerance * scale:
        return f"wrong: max error {err / scale:.2e} of the output's range (allowed {cand.tolerance:.0e})"
    return None


def _measure(layer: QuantLinear, rows: int) -> dict[str, Any]:
    """Check every candidate against the fallback, time the correct ones, keep the fastest."""
    gen = torch.Generator().manual_seed(0)
    device = layer.scale.device  # type: ignore[attr-defined]
    x = torch.randn(rows, layer.in_features, generator=gen).to(device)
    ref = layer.fallback(x, None)
    timings: dict[str, float] = {}
    rejected: dict[str, str] = {}
    notes: dict[str, str] = {}
    # Replicas of the layer with random weights, together past the last-level cache: decode
    # reads every weight from memory. Prefill is compute-bound: a few replicas do.
    per = max(1, layer.weight_bytes())
    replicas = max(1, min(256, -(-_llc_set_bytes() // per))) if rows <= 16 else 2
    pool = _Replicas(layer, replicas)
    for name in layer.candidate_names():
        cand = layer.candidate(name)
        if cand is None:
            rejected[name] = "does not support this shape"
            continue
        why = _check(layer, cand, x, ref)
        if why is not None:
            rejected[name] = why
            continue
        notes[name] = cand.note or ("dequantize, then a float matmul" if name == "dequant" else "")
        # One call on cached weights first: a candidate several times slower than the best so far
        # even then is not worth timing properly (its figure is marked as such).
        quick = _best_of(lambda cand=cand: cand.fn(x, None), 3)
        best = min(timings.values(), default=float("inf"))
        if quick > 4 * best:
            timings[name] = quick
            notes[name] = (notes[name] + "; " if notes[name] else "") + "timed on cached weights only (far slower)"
            continue
        timings[name] = _time(pool, name, x)
    chosen = min(timings, key=timings.__getitem__) if timings else "dequant"
    pool.clear()
    log.info("compress_kernel_chosen", layer=layer.key(), rows=rows, chosen=chosen, timings_us={k: round(v, 1) for k, v in timings.items()})
    return {"chosen": chosen, "timings_us": {k: round(v, 2) for k, v in timings.items()}, "rejected": rejected, "notes": notes, "replicas": replicas, "measured_at": time.time()}


def _best_of(fn: Callable[[], Any], n: int) -> float:
    best = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def _replica(layer: QuantLinear, seed: int) -> QuantLinear:
    """A layer of the same scheme and shape with random weights (timing only)."""
    gen = torch.Generator().manual_seed(seed)
    n, k = layer.out_features, layer.in_features
    if isinstance(layer, Int4Linear):
        q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
        zero = torch.zeros_like(layer.zero) if layer.zero is not None else None
        return Int4Linear(native.pack_int4(q), layer.scale.cpu(), zero.cpu() if zero is not None else None, layer.group, k).to(layer.scale.device)
    assert isinstance(layer, Int8Linear)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    return Int8Linear(q, layer.scale.cpu(), layer.act_int8).to(layer.scale.device)


class _Replicas:
    """The layer and up to ``count - 1`` random replicas, made as timing reaches them."""

    def __init__(self, layer: QuantLinear, count: int) -> None:
        self.layers = [layer]
        self.count = count

    def get(self, i: int) -> QuantLinear:
        while len(self.layers) <= i:
            self.layers.append(_replica(self.layers[0], len(self.layers)))
        return self.layers[i]

    def clear(self) -> None:
        del self.layers[1:]


def _time(pool: _Replicas, name: str, x: torch.Tensor, budget: float = 0.25) -> float:
    """Microseconds per call of candidate ``name``, round-robin over the pool's weight sets, for
    at least one pass over them (or until ``budget`` seconds have gone), best of up to 3 passes."""
    fns = []
    for i in range(pool.count):
        cand = pool.get(i).candidate(name)
        if cand is None:
            return float("inf")
        fns.append(cand.fn)
    for fn in fns[:2]:
        fn(x, None)  # warm up: first-call allocations, lazy initialisation
    best = float("inf")
    deadline = time.perf_counter() + budget
    for _ in range(3):
        start = time.perf_counter()
        for fn in fns:
            fn(x, None)
        best = min(best, (time.perf_counter() - start) / len(fns))
        if time.perf_counter() > deadline:
            break
    for lay in pool.layers[1:]:
        lay._made.clear()
    return best * 1e6


def _llc_set_bytes() -> int:
    return max(_MIN_SET_BYTES, 2 * _llc_bytes())


def _llc_bytes() -> int:
    """The largest CPU cache's size (sysfs), or 32 MiB when it cannot be read."""
    best = 0
    try:
        for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
            text = (idx / "size").read_text().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or 32 << 20
