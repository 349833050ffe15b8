"""Quantization: the math, every kernel candidate against the fallback, quantized models against
their originals, the compressed-tensors format both ways (llmos <-> transformers)."""

from __future__ import annotations

import json

import pytest
import torch

from llmos.plugins.compress import ctformat, qlinear, quant
from llmos.plugins.compress.quantize import collect_hessians, quantize_model
from llmos.plugins.lm.checkpoint import load_checkpoint, save_checkpoint
from llmos.plugins.lm.config import LlamaConfig
from llmos.plugins.lm.engine import Engine, Sampling
from llmos.plugins.lm.model import Decoder, KVCache, Llama


def tiny(seed: int = 0, tie: bool = False) -> Llama:
    config = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=tie)
    model = Llama(config)
    model.init_weights(seed)
    return model.eval()


def ids(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 320, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- math -----------------------------------------------------------------------------------


def test_int8_round_trip_is_within_half_a_step() -> None:
    w = torch.randn(64, 96)
    q = quant.quantize_int8(w)
    assert q.q.dtype == torch.int8 and int(q.q.abs().max()) <= 127
    assert torch.all((q.dequantize() - w).abs() <= q.scale[:, None] / 2 + 1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_groups_are_within_range_and_close(symmetric: bool, group: int) -> None:
    w = torch.randn(48, 256)
    q = quant.quantize_int4(w, group, symmetric)
    assert q.scale.shape == (48, 256 // group)
    assert int(q.q.min()) >= -8 and int(q.q.max()) <= 7
    assert (q.zero is None) == symmetric
    assert rel(q.dequantize(), w) < 0.12


def test_int4_group_must_divide_width() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        quant.quantize_int4(torch.randn(4, 96), 64)


def test_gptq_beats_round_to_nearest_on_correlated_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(128, 128, generator=gen)
    x = torch.randn(4000, 128, generator=gen) @ mix  # correlated input columns, as real activations are
    w = torch.randn(64, 128, generator=gen)
    h = x.t() @ x
    err_gptq = ((x @ (quant.gptq(w, h, 32).dequantize() - w).t()) ** 2).mean()
    err_rtn = ((x @ (quant.quantize_int4(w, 32).dequantize() - w).t()) ** 2).mean()
    assert err_gptq < 0.8 * err_rtn


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_packing_matches_compressed_tensors(bits: int, dim: int) -> None:
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, (19, 72), dtype=torch.int8)
    ours = quant.pack_int32(q, bits, dim)
    assert torch.equal(ours, helpers.pack_to_int32(q, bits, packed_dim=dim))
    assert torch.equal(quant.unpack_int32(ours, bits, q.shape[dim], dim), q)


# -- kernel candidates ----------------------------------------------------------------------


def _layers() -> list[qlinear.QuantLinear]:
    w = torch.randn(72, 128)
    i8 = quant.quantize_int8(w)
    i4 = quant.quantize_int4(w, 32, True)
    i4z = quant.quantize_int4(w, 64, False)
    from llmos.plugins.compress import native

    return [
        qlinear.Int8Linear(i8.q, i8.scale),
        qlinear.Int8Linear(i8.q, i8.scale, act_int8=True),
        qlinear.Int4Linear(native.pack_int4(i4.q), i4.scale, None, 32, 128),
        qlinear.Int4Linear(native.pack_int4(i4z.q), i4z.scale, i4z.zero, 64, 128),
    ]


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
def test_every_candidate_agrees_with_the_fallback(index: int, rows: int) -> None:
    layer = _layers()[index]
    x = torch.randn(rows, 128)
    residual = torch.randn(rows, 72)
    ref = layer.fallback(x, residual.clone())
    tried = []
    for name in layer.candidate_names():
        cand = layer.candidate(name)
        if cand is None:
            continue
        why = qlinear._check(layer, cand, x, layer.fallback(x, None))
        if why is not None and (why.startswith("failed") or "bfloat16" in cand.note):
            continue  # an op this build lacks, or one that rounds activations to bfloat16: refused, never chosen
        assert why is None, f"{name}: {why}"
        got = cand.fn(x.clone(), residual.clone())
        assert float((got - ref).abs().max()) <= cand.tolerance * float(ref.abs().max()) * 1.01, name
        tried.append(name)
    assert "dequant" in tried and len(tried) >= 2  # the fallback and at least one kernel


def test_int4_dequantized_equals_the_quantized_values() -> None:
    w = torch.randn(40, 64)
    q = quant.quantize_int4(w, 32, False)
    from llmos.plugins.compress import native

    layer = qlinear.Int4Linear(native.pack_int4(q.q), q.scale, q.zero, 32, 64)
    assert torch.allclose(layer.dequantized(), q.dequantize(), atol=1e-6)


def test_choices_are_measured_cached_and_reported(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LLMOS_KERNEL_CACHE", str(tmp_path))
    qlinear.forget()
    layer = _layers()[2]
    qlinear.prepare([layer], buckets=(1, 16))
    assert set(layer.choice) == {1, 16}
    report = qlinear.choices()
    entry = report["choices"][f"{layer.key()}:cpu:b1"]
    assert entry["chosen"] in entry["timings_us"]
    assert list(tmp_path.glob("choices-*.json"))
    qlinear.forget()  # a new process reads the cache: no measuring
    again = _layers()[2]
    qlinear.prepare([again], buckets=(1,))
    assert again.choice[1] == entry["chosen"]
    qlinear.forget()


def test_forcing_an_unknown_kernel_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("LLMOS_COMPRESS_KERNEL", "nope")
    with pytest.raises(ValueError, match="not a candidate"):
        qlinear.prepare([_layers()[0]])


# -- models ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("scheme", "limit"), [("int8", 0.02), ("w8a8", 0.05), ("int4", 0.2)])
def test_quantized_logits_stay_close(scheme: str, limit: float) -> None:
    model = tiny()
    x = ids()
    with torch.no_grad():
        ref = model(x)
        quantize_model(model, scheme, group=32)
        got = model(x)
    assert rel(got, ref) < limit
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())  # the lm_head too


def test_gptq_model_is_closer_than_rtn_on_its_calibration_text() -> None:
    x = ids(4, 64)
    with torch.no_grad():
        ref = tiny()(x)
        rtn = quantize_model(tiny(), "int4", group=32)(x)
        model = tiny()
        gptq = quantize_model(model, "int4", group=32, hessians=collect_hessians(model, [x]))(x)
    assert rel(gptq, ref) < rel(rtn, ref)


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
def test_decoder_runs_quantized_models_as_their_forward(scheme: str) -> None:
    """The packed decoder (native step where chosen, torch step else) computes the model's own
    forward: greedy continuations match, prefill and decode logits match."""
    model = quantize_model(tiny(), scheme, group=32)
    prompt = ids(1, 8)
    with torch.no_grad():
        full = model(prompt)
    dec = Decoder(model)
    cache = KVCache(model.config, 2, 32, torch.float32)
    logits = dec(prompt[:, :7], [0], [0], cache)
    assert rel(logits[0, -1], full[0, 6]) < 1e-4
    step = dec(prompt[:, 7:8], [7], [0], cache)
    assert rel(step[0, -1], full[0, 7]) < 1e-4
    two = KVCache(model.config, 2, 32, torch.float32)  # a batch of two in the same step
    dec(torch.cat([prompt[:, :7], prompt[:, :7]]), [0, 0], [0, 1], two)
    both = dec(torch.cat([prompt[:, 7:8], prompt[:, 7:8]]), [7, 7], [0, 1], two)
    assert rel(both[1, -1], full[0, 7]) < 1e-4


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_engine_batches_quantized_models(scheme: str) -> None:
    from llmos.plugins.lm.text import bytes_tokenizer

    model = quantize_model(tiny(), scheme, group=32)
    engine = Engine(model, bytes_tokenizer(), dtype="float32")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    alone = [engine.generate([p], Sampling(max_new_tokens=6, temperature=0))[0].tokens for p in prompts]
    together = [c.tokens for c in engine.generate(prompts, Sampling(max_new_tokens=6, temperature=0))]
    assert alone == together


def test_engine_refuses_bfloat16_for_quantized_models() -> None:
    model = quantize_model(tiny(), "int8")
    with pytest.raises(ValueError, match="float32"):
        Engine(model, None, dtype="bfloat16")  # type: ignore[arg-type]


# -- the format -----------------------------------------------------------------------------


def _save(model: Llama, path, scheme: str, head: str = "quantize", symmetric: bool = True, group: int = 32):
    qc = ctformat.quantization_config(scheme, group, symmetric, head, "rtn")
    save_checkpoint(path, model, None, {}, config_extra={"quantization_config": qc})
    return path


@pytest.mark.parametrize(("scheme", "symmetric", "head"), [("int8", True, "quantize"), ("int4", True, "quantize"), ("int4", False, "keep"), ("w8a8", True, "quantize")])
def test_quantized_checkpoint_round_trips(tmp_path, scheme: str, symmetric: bool, head: str) -> None:
    float_model = tiny()
    save_checkpoint(tmp_path / "float", float_model, None, {})
    model = quantize_model(tiny(), scheme, group=32, symmetric=symmetric, head=head)
    _save(model, tmp_path / "q", scheme, head, symmetric)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["ignore"] == ([] if head == "quantize" else ["lm_head"])
    loaded, _ = ctformat.load_quantized(tmp_path / "q")
    x = ids()
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    fsize = (tmp_path / "float" / "model.safetensors").stat().st_size
    qsize = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert qsize < fsize * (0.5 if scheme == "int4" else 0.55)


def test_tied_embeddings_untie_when_the_head_is_quantized(tmp_path) -> None:
    model = quantize_model(tiny(tie=True), "int8")
    assert model.config.tie_word_embeddings is False
    _save(model, tmp_path / "q", "int8")
    loaded, _ = ctformat.load_quantized(tmp_path / "q")
    x = ids()
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_unsupported_schemes_fail_clearly(tmp_path) -> None:
    model = quantize_model(tiny(), "int8")
    _save(model, tmp_path / "q", "int8")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 3
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="3-bit"):
        ctformat.load_quantized(tmp_path / "q")
    config["quantization_config"]["quant_method"] = "gptq"
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="compressed-tensors only"):
        ctformat.load_quantized(tmp_path / "q")


def test_compressed_tensors_decompresses_asymmetric_int4(tmp_path) -> None:
    """Asymmetric int4 as compressed-tensors' own compressor writes it (zero points packed along the
    output dimension). transformers 5.x cannot load such checkpoints at all, llm-compressor's own
    included (it allocates unpacked zero points: vllm-project/llm-compressor#1618), so the check
    is compressed-tensors' decompressor on our tensors."""
    base = pytest.importorskip("compressed_tensors.compressors.pack_quantized.base")
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    model = quantize_model(tiny(), "int4", group=32, symmetric=False)
    _save(model, tmp_path / "q", "int4", symmetric=False)
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    group = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
    prefix = "model.layers.0.mlp.down_proj."
    out = base.PackedQuantizationCompressor.decompress({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, scheme)
    assert torch.allclose(out["weight"].float(), model.model.layers[0].mlp.down_proj.dequantized(), atol=1e-6)


@pytest.mark.parametrize(("scheme", "symmetric"), [("int4", True), ("w8a8", True), ("int8", True)])
def test_transformers_loads_llmos_quantized_checkpoints(tmp_path, scheme: str, symmetric: bool) -> None:
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    model = quantize_model(tiny(), scheme, group=32, symmetric=symmetric)
    _save(model, tmp_path / "q", scheme, symmetric=symmetric)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), dtype=torch.float32, attn_implementation="eager").eval()
    x = ids()
    with torch.no_grad():
        ours = model(x)
        theirs = hf(x).logits
    # transformers runs w8a8 as fake-quantized activations with its own rounding: close, not equal.
    assert rel(theirs, ours) < (0.02 if scheme == "w8a8" else 1e-4)


def test_llmos_loads_transformers_quantized_checkpoints(tmp_path) -> None:
    """A checkpoint transformers saves (compressed again by compressed-tensors) loads in llmos
    with the same logits."""
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    model = quantize_model(tiny(), "int4", group=32)
    _save(model, tmp_path / "q", "int4")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), dtype=torch.float32, attn_implementation="eager").eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    loaded, _ = ctformat.load_quantized(tmp_path / "hf")
    x = ids()
    with torch.no_grad():
        assert rel(loaded(x), model(x)) < 1e-4


def test_float_checkpoint_still_loads_through_lm(tmp_path) -> None:
    save_checkpoint(tmp_path / "f", tiny(), None, {})
    model, _ = load_checkpoint(tmp_path / "f")
    assert isinstance(model.lm_head, torch.nn.Linear)
