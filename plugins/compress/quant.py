"""Quantization math: round-to-nearest and GPTQ for int8 (per output channel) and int4 (groups
along the input dimension), and the compressed-tensors bit packing.

The numbers follow compressed-tensors' conventions, so checkpoints written here load there and
theirs load here: an integer ``q`` of ``b`` bits lies in [-2^(b-1), 2^(b-1) - 1] and stands for
``(q - zero_point) * scale``. Symmetric int8 uses ±127 (not -128) so that the int8 dot-product
kernels may negate a weight without overflow; symmetric int4 uses the whole [-8, 7].

Round-to-nearest int4 picks each group's scale by a short search over clipping ratios (the
``mse`` observer of llm-compressor): the scale that maps a group's largest weight to the edge is
rarely the one that minimises the group's squared error. GPTQ (Frantar et al. 2022) quantizes one
input column at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse Hessian of the layer's calibration inputs, ``2 X^T X``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Clipping ratios tried for each int4 group's range (1.0 first: ties keep the plain max).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


@dataclass
class Quantized:
    """One weight matrix [N, K] as integers and their scales: ``w ~ (q - zero) * scale``
    per output row (int8: scale [N], group = K) or per row and group of ``group`` inputs
    (int4: scale [N, K / group])."""

    q: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N] (int8) or [N, K / group] (int4)
    zero: torch.Tensor | None  # int8 like scale, or None when symmetric
    bits: int
    group: int

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.zero, self.group)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int) -> torch.Tensor:
    """float32 [N, K] of integers ``q`` [N, K] and their per-row or per-group scales."""
    n, k = q.shape
    s = scale.float().reshape(n, -1)
    groups = s.shape[1]
    w = q.float().view(n, groups, k // groups)
    if zero is not None:
        w = w - zero.float().reshape(n, groups, 1)
    return (w * s.view(n, groups, 1)).view(n, k)


def quantize_int8(w: torch.Tensor) -> Quantized:
    """Symmetric int8 per output channel, rounded to nearest: scale = max|w| / 127."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Quantized(q, scale, None, 8, w.shape[1])


def _group_params(w: torch.Tensor, symmetric: bool, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) of each row of ``w`` [R, G] as an int4 group, its range clipped by ``clip``."""
    if symmetric:
        amax = w.abs().amax(dim=1) * clip
        return amax.clamp(min=1e-12) / 7.5, None  # compressed-tensors: max / ((qmax - qmin) / 2)
    lo = (w.amin(dim=1) * clip).clamp(max=0.0)
    hi = (w.amax(dim=1) * clip).clamp(min=0.0)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    zero = (-8 - torch.round(lo / scale)).clamp(-8, 7)
    return scale, zero


def _round_group(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    q = torch.round(w / scale[:, None])
    if zero is not None:
        q = q + zero[:, None]
    return q.clamp_(-8, 7)


def quantize_int4(w: torch.Tensor, group: int, symmetric: bool = True) -> Quantized:
    """int4 in groups of ``group`` inputs, rounded to nearest, each group's range clipped to the
    ratio of :data:`CLIP_RATIOS` with the least squared error."""
    w = w.detach().float()
    n, k = w.shape
    if k % group:
        raise ValueError(f"group size {group} does not divide the input width {k}")
    rows = w.reshape(-1, group)
    best_err = torch.full((rows.shape[0],), float("inf"))
    best_q = torch.zeros_like(rows)
    best_scale = torch.zeros(rows.shape[0])
    best_zero = torch.zeros(rows.shape[0]) if not symmetric else None
    for clip in CLIP_RATIOS:
        scale, zero = _group_params(rows, symmetric, clip)
        q = _round_group(rows, scale, zero)
        deq = (q - (zero[:, None] if zero is not None else 0)) * scale[:, None]
        err = (deq - rows).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_q[better] = q[better]
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    groups = k // group
    zero_out = best_zero.view(n, groups).to(torch.int8) if best_zero is not None else None
    return Quantized(best_q.view(n, k).to(torch.int8), best_scale.view(n, groups), zero_out, 4, group)


@torch.no_grad()
def gptq(w: torch.Tensor, hessian: torch.Tensor, group: int, symmetric: bool = True, damp: float = 0.01, block: int = 128) -> Quantized:
    """int4 in groups of ``group`` by GPTQ: columns in order, each column's rounding error
    compensated on the later columns through the Cholesky factor of the inverse Hessian
    ``hessian`` [K, K] (``sum x x^T`` of the layer's calibration inputs; its scale does not
    matter). Group scales are fitted when their group's first column comes up, on the weights
    as updated so far (as GPTQ and llm-compressor's GPTQModifier do)."""
    W = w.detach().float().clone()
    n, k = W.shape
    if k % group:
        raise ValueError(f"group size {group} does not divide the input width {k}")
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += torch.eye(k, dtype=H.dtype) * damp * torch.mean(torch.diag(H))
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
    except RuntimeError:  # not positive definite even after damping: round to nearest instead
        return quantize_int4(w, group, symmetric)
    block = max(group, (block // group) * group)
    Q = torch.zeros(n, k, dtype=torch.int8)
    groups = k // group
    scales = torch.zeros(n, groups)
    zeros = torch.zeros(n, groups) if not symmetric else None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hb = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:
                # The best clipping ratio for this group, on the weights as updated so far.
                g = col // group
                part = W1[:, i : i + group]
                best = None
                for clip in CLIP_RATIOS:
                    s, z = _group_params(part, symmetric, clip)
                    q = _round_group(part, s, z)
                    err = ((q - (z[:, None] if z is not None else 0)) * s[:, None] - part).pow(2).sum(dim=1)
                    if best is None:
                        best = (err, s, z)
                    else:
                        better = err < best[0]
                        best = (torch.where(better, err, best[0]), torch.where(better, s, best[1]), torch.where(better, z, best[2]) if z is not None else None)
                scales[:, g] = best[1]
                if zeros is not None:
                    zeros[:, g] = best[2]
                s_col, z_col = best[1], best[2]
            x = W1[:, i]
            q = torch.round(x / s_col) + (z_col if z_col is not None else 0)
            q.clamp_(-8, 7)
            deq = (q - (z_col if z_col is not None else 0)) * s_col
            Q[:, col] = q.to(torch.int8)
            e = (x - deq) / Hb[i, i]
            W1[:, i:] -= e[:, None] * Hb[i, i:][None, :]
            Err[:, i] = e
        if i2 < k:
            W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return Quantized(Q, scales, zeros.to(torch.int8) if zeros is not None else None, 4, group)


# -- compressed-tensors packing ---------------------------------------------------------------


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """compressed-tensors' ``pack_to_int32`` for 4 or 8 bits: ``q`` int8 [R, C] (values of
    ``bits`` bits, signed) offset to unsigned, element i at bit ``bits * i`` of the packed row
    (little-endian words, 32 / bits per int32); ``dim`` 0 packs along the rows instead."""
    if dim == 0:
        return pack_int32(q.t(), bits).t().contiguous()
    per = 32 // bits
    r, c = q.shape
    u = (q.to(torch.int32) + (1 << (bits - 1))) & ((1 << bits) - 1)
    cols = -(-c // per) * per
    if cols > c:
        u = torch.nn.functional.pad(u, (0, cols - c))
    u = u.view(r, cols // per, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    # Sum of disjoint bit fields; in int64 so the top field does not overflow, then wrapped.
    words = (u.to(torch.int64) << shifts.to(torch.int64)).sum(dim=2)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, cols: int, dim: int = 1) -> torch.Tensor:
    """The inverse of :func:`pack_int32`: int8 [R, cols] (``dim`` 0: [cols, R] packed along rows)."""
    if dim == 0:
        return unpack_int32(packed.t(), bits, cols).t().contiguous()
    per = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    u = (words[:, :, None] >> shifts) & ((1 << bits) - 1)
    return (u.reshape(packed.shape[0], -1)[:, :cols] - (1 << (bits - 1))).to(torch.int8).contiguous()
