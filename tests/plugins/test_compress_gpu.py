"""Quantized models on a real GPU (the device machine): the layers choose among the kernels that
exist there (torch's, and dequantize-then-matmul) and match the CPU's results; the engine decodes
with them in float32 and bfloat16. Skipped where CUDA is absent."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]

from llmos.plugins.compress import qlinear  # noqa: E402
from llmos.plugins.compress.quantize import quantize_model  # noqa: E402
from llmos.plugins.lm.engine import Engine, Sampling  # noqa: E402
from llmos.plugins.lm.text import bytes_tokenizer  # noqa: E402
from tests.plugins.test_compress_quant import ids, rel, tiny  # noqa: E402


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
def test_quantized_model_on_gpu_matches_cpu(scheme: str) -> None:
    model = quantize_model(tiny(), scheme, group=32)
    x = ids()
    with torch.no_grad():
        cpu = model(x)
        gpu = model.to("cuda")(x.cuda()).cpu()
    assert rel(gpu, cpu) < 1e-3
    layer = next(m for m in model.modules() if isinstance(m, qlinear.QuantLinear))
    assert layer.choice and all(name in layer.candidate_names() for name in layer.choice.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_decodes_quantized_models_on_gpu(dtype: str) -> None:
    model = quantize_model(tiny(), "int4", group=32)
    engine = Engine(model, bytes_tokenizer(), dtype=dtype, device="cuda")
    out = engine.generate([[1, 2, 3], [4, 5]], Sampling(max_new_tokens=6, temperature=0))
    assert all(len(c.tokens) == 6 for c in out)
