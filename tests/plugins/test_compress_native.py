"""The compress plugin's C kernels: every variant this CPU runs, against float64 torch references."""

from __future__ import annotations

import ctypes

import pytest

torch = pytest.importorskip("torch")

from llmos.plugins.compress import native  # noqa: E402
from llmos.plugins.lm.kernels import LinearDesc, linear_call  # noqa: E402

MS = (1, 3, 4, 5, 16, 33)
N = 100  # not a multiple of 4 or 16: partial tiles and uneven thread shares
TOL = 1e-4  # relative max error against float64 math on the same (dequantized) weights

_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)


def _variants(scheme: str) -> list[native.NativeKernel]:
    ks = native.kernels(scheme)
    if not ks:
        pytest.skip(f"no native {scheme} kernels here: {native.status()['reason']}")
    return ks


def _run(desc: LinearDesc, x: torch.Tensor, residual: str, T: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Call desc.fn for every share t < T in turn (the shares must cover the rows exactly once);
    residual: "none", "separate" (a tensor of its own) or "alias" (added into y in place)."""
    m = x.shape[0]
    add = None if residual == "none" else torch.randn(m, desc.N)
    y = add.clone() if residual == "alias" else torch.full((m, desc.N), float("nan"))
    src = y if residual == "alias" else add
    fn = _FN(desc.fn)
    for t in range(T):
        fn(ctypes.addressof(desc), x.data_ptr(), y.data_ptr(), 0 if src is None else src.data_ptr(), desc.N if src is not None else 0, m, t, T)
    return y, add


def _check(y: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    err = (y.double() - ref).abs().max().item()
    scale = ref.abs().max().item() or 1.0
    assert err <= tol * scale, f"max error {err:.3g} vs output range {scale:.3g}"


def _reference(x: torch.Tensor, w: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
    ref = x.double() @ w.double().t()
    return ref if add is None else ref + add.double()


CASES = [(m, r, T) for m in MS for r, T in (("none", 1), ("separate", 3), ("alias", 2))]


@pytest.mark.parametrize("K", [96, 128, 256, 100, 113])
def test_int8(K: int) -> None:
    g = torch.Generator().manual_seed(K)
    q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    s = torch.rand(N, generator=g) * 0.02 + 0.001
    w = q.double() * s.double()[:, None]
    for k in _variants("int8"):
        desc, keep = native.int8_desc(k, q, s)
        assert keep[0].data_ptr() == q.data_ptr()  # the weights are used in place
        for m, residual, T in CASES:
            x = torch.randn(m, K, generator=g)
            y, add = _run(desc, x, residual, T)
            _check(y, _reference(x, w, add))


@pytest.mark.parametrize(("K", "group"), [(128, 32), (256, 64), (256, 128), (192, 96)])
def test_int4(K: int, group: int) -> None:
    g = torch.Generator().manual_seed(K + group)
    q = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    s = torch.rand(N, K // group, generator=g) * 0.1 + 0.01
    zp = torch.randint(-3, 4, (N, K // group), generator=g).float()
    off = s * (8 + zp)  # asymmetric: w = s * (q - zp)
    w = (q.double() - zp.double().repeat_interleave(group, 1)) * s.double().repeat_interleave(group, 1)
    packed = native.pack_int4(q)
    for k in _variants("int4"):
        desc, keep = native.int4_desc(k, packed, s, off, group, K)
        assert keep[0].data_ptr() == packed.data_ptr()
        for m, residual, T in CASES:
            x = torch.randn(m, K, generator=g)
            y, add = _run(desc, x, residual, T)
            _check(y, _reference(x, w, add))


def _quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = x.abs().amax(dim=1)
    sx = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(x / sx[:, None]).clamp(-127, 127), sx


@pytest.mark.parametrize("K", [96, 128, 256, 100, 70, 113])  # 113: a 17-wide tail after 32-wide steps
def test_w8a8(K: int) -> None:
    g = torch.Generator().manual_seed(K)
    q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    q[0] = -128  # the extremes: |w| = 128 must not saturate the non-VNNI path
    s = torch.rand(N, generator=g) * 0.02 + 0.001
    for k in _variants("w8a8"):
        desc, keep = native.w8a8_desc(k, q, s)
        assert keep[0].data_ptr() == q.data_ptr()
        for m, residual, T in CASES:
            x = torch.randn(m, K, generator=g)
            x[0, 0] = -x[0].abs().max() - 1  # a row whose max |x| is negative: xq = -127
            if m > 2:
                x[2] = 0  # an all-zero row: scale 1, zeros out
            y, add = _run(desc, x, residual, T)
            xq, sx = _quantize_tokens(x)
            dot = xq.double() @ q.double().t()
            ref = (dot.float() * (sx[:, None] * s[None, :])).double()  # float32 like the kernel
            _check(y, ref if add is None else ref + add.double(), 1e-6)


def test_linear_call_threads() -> None:
    """Through the lm plugin's OpenMP entry point on two threads (a layer big enough to split)."""
    if not native.kernels("int8"):
        pytest.skip(native.status()["reason"])
    n, K, group = 272, 512, 64
    g = torch.Generator().manual_seed(0)
    q8 = torch.randint(-127, 128, (n, K), generator=g, dtype=torch.int8)
    s8 = torch.rand(n, generator=g) * 0.01
    q4 = torch.randint(-8, 8, (n, K), generator=g, dtype=torch.int8)
    s4 = torch.rand(n, K // group, generator=g) * 0.1
    w4 = q4.double() * s4.double().repeat_interleave(group, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for m in (1, 5, 16):
            x = torch.randn(m, K, generator=g)
            res = torch.randn(m, n, generator=g)
            for k in native.kernels("int8"):
                desc, _ = native.int8_desc(k, q8, s8)
                _check(linear_call(desc, x, residual=res), _reference(x, q8.double() * s8.double()[:, None], res))
            for k in native.kernels("int4"):
                desc, _ = native.int4_desc(k, native.pack_int4(q4), s4, 8 * s4, group, K)
                y = res.clone()
                _check(linear_call(desc, x, out=y, residual=y), _reference(x, w4, res))
            xq, sx = _quantize_tokens(x)
            for k in native.kernels("w8a8"):
                desc, _ = native.w8a8_desc(k, q8, s8)
                ref = (xq.double() @ q8.double().t()).float() * (sx[:, None] * s8[None, :])
                _check(linear_call(desc, x), ref.double(), 1e-6)
    finally:
        torch.set_num_threads(threads)


def test_pack_roundtrip() -> None:
    q = torch.randint(-8, 8, (7, 96), dtype=torch.int8)
    packed = native.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 48)
    assert torch.equal(native.unpack_int4(packed, 96), q)
    # The documented layout: byte j of block b holds k0 + j (low) and k0 + 16 + j (high), plus 8.
    assert int(packed[3, 16 + 5]) == (int(q[3, 32 + 5]) + 8) | ((int(q[3, 48 + 5]) + 8) << 4)
    with pytest.raises(ValueError):
        native.pack_int4(torch.zeros(2, 40, dtype=torch.int8))
    with pytest.raises(ValueError):
        native.pack_int4(torch.full((2, 32), 8, dtype=torch.int8))


def test_unsupported_shapes() -> None:
    ks = native.kernels("int4")
    if not ks:
        pytest.skip(native.status()["reason"])
    packed = torch.zeros(4, 48, dtype=torch.uint8)
    s = torch.ones(4, 2)
    assert native.int4_desc(ks[0], packed, s, s, 48, 96) is None  # group not a multiple of 32
    assert native.int4_desc(ks[0], torch.zeros(4, 40, dtype=torch.uint8), torch.ones(4, 1), torch.ones(4, 1), 80, 80) is None
    with pytest.raises(ValueError):
        native.int8_desc(ks[0], torch.zeros(4, 32, dtype=torch.int8), torch.ones(4))


def test_status() -> None:
    st = native.status()
    assert set(st) == {"library", "reason", "cpu_flags", "compile_seconds"}
    names = [k.name for s in ("int8", "int4", "w8a8") for k in native.kernels(s)]
    assert len(names) == len(set(names))
    if st["library"] is not None:
        assert {"int8.scalar", "int4.scalar", "w8a8.scalar"} <= set(names)


def test_without_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """No compiler: empty variant lists and a reason, no exception."""

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no C compiler found (cc, gcc, clang; or set CC)")

    monkeypatch.setattr(native, "build_library", fail)
    monkeypatch.setattr(native, "_library", None)
    assert native.kernels("int4") == []
    st = native.status()
    assert st["library"] is None and "no C compiler" in st["reason"]
