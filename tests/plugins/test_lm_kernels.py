"""The weight-only bfloat16 linear: the C kernel on every ISA this CPU has, and the torch fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from llmos.plugins.lm import kernels  # noqa: E402
from llmos.plugins.lm.config import config_from_preset  # noqa: E402
from llmos.plugins.lm.kernels import BF16Linear, bf16_linear, kernel_status, use_bf16_weights  # noqa: E402
from llmos.plugins.lm.model import Llama  # noqa: E402

TOL = 1e-5  # relative L2 error against float32 math on bf16-rounded weights (measured: ~1e-7)


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache directory for the session: the kernel compiles once (about a second)."""
    return tmp_path_factory.mktemp("kernels")


def _paths() -> list[str]:
    """The paths to check here: every ISA the CPU supports, and torch."""
    from llmos.plugins.lm.kernels import _ISAS

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    have = {"scalar", "torch"}
    if " avx2 " in flags and " fma " in flags:
        have.add("avx2")
    if " avx512f " in flags:
        have.add("avx512")
    return [p for p in ("avx512", "avx2", "scalar", "torch") if p in have and (p == "torch" or p in _ISAS)]


@pytest.fixture(params=_paths())
def path(request: pytest.FixtureRequest, kernel_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Force one path (``LLMOS_BF16_KERNEL``) for the test, and choose afresh after it."""
    monkeypatch.setenv("LLMOS_KERNEL_CACHE", str(kernel_cache))
    monkeypatch.setenv("LLMOS_BF16_KERNEL", request.param)
    kernels._reset()
    status = kernel_status()
    if request.param != "torch" and status.path != "native":
        pytest.skip(f"no C kernel here: {status.reason}")
    yield request.param
    kernels._reset()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@pytest.mark.parametrize(
    ("m", "n", "k"),
    [(1, 768, 768), (1, 256, 768), (1, 768, 2048), (1, 1000, 768), (2, 37, 77), (3, 33, 100), (4, 64, 48), (5, 7, 3), (16, 130, 257), (17, 40, 64), (32, 9, 31), (33, 300, 96)],
)
def test_matches_float32_math_on_rounded_weights(path: str, m: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    want = F.linear(x.double(), w.double()).float()
    assert bf16_linear(x, w).shape == (m, n)
    assert rel_err(bf16_linear(x, w), want) < TOL


def test_bias_residual_and_leading_dims(path: str) -> None:
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(2, 3, 50, generator=g), torch.randn(21, 50, generator=g).to(torch.bfloat16)
    bias, residual = torch.randn(21, generator=g), torch.randn(2, 3, 21, generator=g)
    base = F.linear(x.double(), w.double())
    assert rel_err(bf16_linear(x, w, bias), (base + bias.double()).float()) < TOL
    assert rel_err(bf16_linear(x, w, residual=residual), (base + residual.double()).float()) < TOL
    got = bf16_linear(x, w, bias, residual=residual)
    assert got.shape == (2, 3, 21) and got.dtype == torch.float32
    assert rel_err(got, (base + bias.double() + residual.double()).float()) < TOL


def test_strided_inputs_and_weight_views(path: str) -> None:
    """Transposed inputs and a weight that is a row slice of a bigger matrix (a fused [q; k; v])."""
    g = torch.Generator().manual_seed(3)
    fused = torch.randn(96, 40, generator=g).to(torch.bfloat16)
    x = torch.randn(40, 2, generator=g).t()
    for w in (fused[32:64], fused[:, :40]):
        assert rel_err(bf16_linear(x, w), F.linear(x.double(), w.double()).float()) < TOL
    assert bf16_linear(torch.empty(0, 40), fused).shape == (0, 96)


def test_autograd_through_x(path: str) -> None:
    w = torch.randn(8, 16).to(torch.bfloat16)
    x = torch.randn(2, 16, requires_grad=True)
    bf16_linear(x, w).sum().backward()
    assert torch.allclose(x.grad, w.float().sum(0).expand(2, 16))


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="bfloat16"):
        bf16_linear(torch.randn(1, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="features"):
        bf16_linear(torch.randn(1, 5), torch.randn(3, 4).to(torch.bfloat16))


def test_module_from_linear_keeps_names_and_rounds_once() -> None:
    lin = nn.Linear(24, 10)
    mod = BF16Linear.from_linear(lin)
    assert mod.weight.dtype == torch.bfloat16 and mod.bias.dtype == torch.float32
    assert set(mod.state_dict()) == set(lin.state_dict())
    assert torch.equal(mod.weight, lin.weight.detach().to(torch.bfloat16))
    x = torch.randn(3, 24)
    want = F.linear(x.double(), mod.weight.double(), lin.bias.double()).float()
    with torch.no_grad():
        assert rel_err(mod(x), want) < TOL
    assert "in_features=24, out_features=10, bias=True" in repr(mod)
    mod.float()  # a cast back to float32 still computes
    with torch.no_grad():
        assert rel_err(mod(x), want) < TOL


@pytest.mark.parametrize("tie", [False, True])
def test_whole_llama_matches_float32_math_on_rounded_weights(path: str, tie: bool) -> None:
    config = config_from_preset("nano", 300, tie_word_embeddings=tie)
    model = Llama(config)
    model.init_weights(seed=4)
    model.eval()
    reference = Llama(config)
    reference.load_state_dict(model.state_dict())
    reference.eval()
    for module in reference.modules():
        if isinstance(module, nn.Linear):  # a new parameter: a tied embedding keeps float32, as in the model
            module.weight = nn.Parameter(module.weight.detach().to(torch.bfloat16).float())
    assert use_bf16_weights(model) is model
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert not linears and sum(isinstance(m, BF16Linear) for m in model.modules()) == 7 * config.num_hidden_layers + 1
    assert model.model.embed_tokens.weight.dtype == torch.float32  # lookups stay float32
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(model(ids), reference(ids)) < TOL
        assert rel_err(model(ids[:1, :1]), reference(ids[:1, :1])) < TOL  # one token: the decode shape


def test_shared_linear_stays_shared() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    use_bf16_weights(model)
    assert model[0] is model[2] and isinstance(model[0], BF16Linear)
    with pytest.raises(TypeError):
        use_bf16_weights(nn.Linear(2, 2))


def test_status_names_the_forced_fallback(kernel_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOS_KERNEL_CACHE", str(kernel_cache))
    try:
        monkeypatch.setenv("LLMOS_BF16_KERNEL", "torch")
        kernels._reset()
        assert kernel_status().path == "torch" and "LLMOS_BF16_KERNEL=torch" in kernel_status().reason
        monkeypatch.setenv("LLMOS_BF16_KERNEL", "auto")
        monkeypatch.setenv("CC", "/nonexistent/cc")
        monkeypatch.setenv("PATH", "/nonexistent")
        kernels._reset()
        status = kernel_status()
        assert status.path == "torch" and "compiler" in status.reason
        monkeypatch.setenv("LLMOS_BF16_KERNEL", "sse9")
        kernels._reset()
        with pytest.raises(ValueError, match="LLMOS_BF16_KERNEL"):
            kernel_status()
    finally:
        kernels._reset()


def test_two_processes_compile_into_one_cache_at_once(tmp_path: Path) -> None:
    """Each process compiles to a private name and renames it into place: both load a whole library."""
    if kernels._compiler() is None:
        pytest.skip("no C compiler")
    code = "from llmos.plugins.lm.kernels import kernel_status; s = kernel_status(); print(s.path, s.library)"
    env = dict(os.environ, LLMOS_KERNEL_CACHE=str(tmp_path), LLMOS_BF16_KERNEL="auto")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    libraries = {out.strip().splitlines()[-1].split()[1] for out, _ in outs}  # the last line: logs may precede it
    assert len(libraries) == 1 and [p.name for p in tmp_path.iterdir()] == [Path(next(iter(libraries))).name]


@pytest.mark.parametrize(("m", "n", "k"), [(1, 768, 768), (3, 33, 100), (5, 7, 3), (6, 130, 257)])
def test_float32_kernel_matches_float32_math(path: str, m: int, n: int, k: int) -> None:
    """The float32-weight kernel the decode step uses, with a residual added in place (y is add)."""
    if path == "torch":
        pytest.skip("the float32 kernel has no torch path (the decoder uses torch's own products)")
    native = kernels._load_native()
    assert native is not None
    g = torch.Generator().manual_seed(m + n + k)
    x, w, y = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(m, n, generator=g)
    want = (F.linear(x.double(), w.double()) + y.double()).float()
    native.f32(x.data_ptr(), w.data_ptr(), y.data_ptr(), y.data_ptr(), n, m, k, n, native.isa, torch.get_num_threads())
    assert rel_err(y, want) < TOL
