"""The lm plugin's model, checkpoints, tokenizers and corpora, without a kernel."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmos.plugins.lm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from llmos.plugins.lm.config import PRESETS, LlamaConfig, config_from_dict, config_from_preset  # noqa: E402
from llmos.plugins.lm.model import Decoder, KVCache, Llama  # noqa: E402
from llmos.plugins.lm.text import bytes_tokenizer, corpus_files, tokenize_corpus, train_bpe  # noqa: E402


@pytest.mark.parametrize("tie", [False, True])
def test_llmos_checkpoint_loads_in_transformers_with_same_logits(tmp_path: Path, tie: bool) -> None:
    config = config_from_preset("nano", 300, tie_word_embeddings=tie)
    model = Llama(config)
    model.init_weights(seed=1)
    model.eval()
    save_checkpoint(tmp_path / "ck", model, bytes_tokenizer().to_json(), {"recipe": "test"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    ids = torch.randint(0, 300, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids), hf(ids).logits, atol=1e-4, rtol=0)
    manifest = json.loads((tmp_path / "ck" / "llmos.json").read_text())
    assert manifest["model_sha256"] and manifest["libraries"]["torch"] and manifest["recipe"] == "test"


def test_transformers_checkpoint_loads_in_llmos_with_same_logits(tmp_path: Path) -> None:
    hf_config = transformers.LlamaConfig(
        vocab_size=211, hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        max_position_embeddings=128, rope_theta=5000.0,
    )
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path / "hf")
    model, manifest = load_checkpoint(tmp_path / "hf")
    assert manifest == {}
    ids = torch.randint(0, 211, (3, 17))
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.fixture(params=["native", "torch"])
def step_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The decoder's single-token step through the C kernel (where it builds) or through torch."""
    from llmos.plugins.lm import kernels

    monkeypatch.setenv("LLMOS_BF16_KERNEL", "auto" if request.param == "native" else "torch")
    kernels._reset()
    if request.param == "native" and kernels.kernel_status().path != "native":
        pytest.skip(f"no C kernel here: {kernels.kernel_status().reason}")
    yield request.param
    kernels._reset()


def test_decoder_shares_the_weights_and_matches_the_model_over_its_cache(tmp_path: Path, step_path: str) -> None:
    model = Llama(config_from_preset("nano", 300))
    model.init_weights(seed=2)
    model.eval()
    ids = torch.randint(0, 300, (6, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids)
    names = list(model.state_dict())
    decoder = Decoder(model)
    assert (decoder.native is not None) == (step_path == "native")
    # Fused [q; k; v] and [gate; up]: the model's weights are views of them, names and outputs unchanged.
    assert list(model.state_dict()) == names
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == mlp.up_proj.weight.untyped_storage().data_ptr()
    with torch.no_grad():
        assert torch.equal(model(ids), expected)
    save_checkpoint(tmp_path / "ck", model, None, {})
    assert torch.equal(load_checkpoint(tmp_path / "ck")[0].model.layers[1].self_attn.k_proj.weight, attn.k_proj.weight)
    _check_decoder(decoder, model, ids, expected, atol=1e-5)


def _check_decoder(decoder: Decoder, model: Llama, ids: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    def check(slots: list[int], rows: list[int], prompt: list[int], steps: int) -> None:
        """Prefill ``rows`` of ``ids`` (prompt[i] tokens each) into ``slots``, then decode together."""
        cache = KVCache(model.config, slots=6, length=16, dtype=torch.float32)
        with torch.inference_mode():
            for row, n, slot in zip(rows, prompt, slots):
                logits = decoder(ids[row : row + 1, :n], [0], [slot], cache, last_only=False)
                assert torch.allclose(logits[0], expected[row, :n], atol=atol, rtol=0)
            at = list(prompt)
            for _ in range(steps):
                logits = decoder(torch.stack([ids[r, p] for r, p in zip(rows, at)])[:, None], at, slots, cache)
                for i, (r, p) in enumerate(zip(rows, at)):
                    assert torch.allclose(logits[i, 0], expected[r, p], atol=atol, rtol=0), (slots, r, p)
                at = [p + 1 for p in at]

    check([0], [0], [4], 6)  # one sequence: the buffered single-row step
    check([1, 2], [1, 2], [5, 5], 4)  # a range of slots at one position: cache views, no mask
    check([0, 1, 2], [0, 1, 2], [3, 7, 5], 4)  # a range at different positions: masked
    check([3, 0, 2], [2, 0, 1], [6, 2, 4], 4)  # slots in any order: gathered
    check([5, 0, 2, 1, 4, 3], [0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7], 3)  # more rows than the C kernel's tile of 4
    with torch.inference_mode(), pytest.raises(ValueError, match="past the cache"):
        decoder(ids[:1, :1], [16], [0], KVCache(model.config, slots=1, length=16, dtype=torch.float32))


def test_bf16_weights_decoder_drops_float32_and_matches_its_model(step_path: str) -> None:
    """bfloat16 weights, float32 activations: the model's linears become views of the decoder's
    fused bf16 matrices (no float32 copy left), and decoder and model agree."""
    from llmos.plugins.lm.kernels import BF16Linear

    for tie in (False, True):
        model = Llama(config_from_preset("nano", 300, tie_word_embeddings=tie))
        model.init_weights(seed=3)
        model.eval()
        ids = torch.randint(0, 300, (6, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            reference = model(ids)
        decoder = Decoder(model, bf16_weights=True)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear | BF16Linear)]
        assert linears and all(isinstance(m, BF16Linear) and m.weight.dtype == torch.bfloat16 for m in linears)
        assert model.model.embed_tokens.weight.dtype == torch.float32 and model.model.norm.weight.dtype == torch.float32
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
        with torch.no_grad():
            expected = model(ids)
        assert float((expected - reference).norm() / reference.norm()) < 1e-2
        _check_decoder(decoder, model, ids, expected, atol=1e-4)
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        Decoder(Llama(config_from_preset("nano", 300)).to(torch.bfloat16), bf16_weights=True)


def test_bad_checkpoints_say_what_is_wrong(tmp_path: Path) -> None:
    model = Llama(config_from_preset("nano", 300))
    save_checkpoint(tmp_path / "ck", model, None, {})
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=100)))
    with pytest.raises(CheckpointError, match=r"wrong shape.*mlp"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    with pytest.raises(CheckpointError, match=r"missing \d+ tensors \(first: model\.layers\.2"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"garbage")
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "ck")


def test_config_validation_and_presets() -> None:
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must divide hidden_size \(30\)"):
        config_from_dict({"hidden_size": 30, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}, vocab_size=100)
    with pytest.raises(ValueError, match="unknown preset 'huge'; presets: nano"):
        config_from_preset("huge", 100)
    with pytest.raises(ValueError, match="unknown field 'hiden_size'"):
        config_from_dict({"hiden_size": 3}, vocab_size=100)
    assert config_from_preset("nano", 512).num_parameters() < 1_000_000
    assert 8e6 < config_from_preset("micro", 8192).num_parameters() < 13e6
    assert 110e6 < config_from_preset("small", 32000).num_parameters() < 140e6
    big = config_from_preset("llama-3.1-8b", 128256)
    assert 7.5e9 < big.num_parameters() < 8.5e9
    assert set(PRESETS) >= {"nano", "micro", "small"}
    roundtrip = LlamaConfig.from_hf_dict(config_from_preset("nano", 99).to_hf_dict())
    assert roundtrip == config_from_preset("nano", 99)


def test_tokenizers_and_corpus_cache(tmp_path: Path) -> None:
    raw = bytes_tokenizer()
    assert raw.vocab_size == 257 and raw.decode(raw.encode("héllo wörld")) == "héllo wörld"
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(30):
        (docs / f"{i:02}.txt").write_text(f"document {i} says the quick brown fox jumps over the lazy dog. " * 20)
    files = corpus_files(str(docs), "*.txt")
    tok = train_bpe(iter(p.read_text() for p in files), 300)
    assert tok.vocab_size == 300
    train, val, cached = tokenize_corpus(files, tok, tmp_path / "cache", max_bytes=10**9, val_fraction=0.2)
    assert not cached and len(train) > len(val) > 0
    train2, val2, cached2 = tokenize_corpus(files, tok, tmp_path / "cache", max_bytes=10**9, val_fraction=0.2)
    assert cached2 and (train2 == train).all() and (val2 == val).all()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        corpus_files(str(tmp_path / "missing"), "*.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files matching"):
        corpus_files(str(tmp_path / "empty"), "*.txt")
    (tmp_path / "blank.txt").write_text("   \n")
    with pytest.raises(ValueError, match="the corpus is empty"):
        tokenize_corpus([tmp_path / "blank.txt"], raw, tmp_path / "cache", max_bytes=10**9, val_fraction=0.1)
    assert len(corpus_files("stdlib", "*")) > 100


def test_json_lines_corpus(tmp_path: Path) -> None:
    from llmos.plugins.lm.text import documents

    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "first doc"}\n\n{"text": "second doc", "id": 2}\n')
    assert list(documents([data], "text", 10**9)) == ["first doc", "second doc"]
    data.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:1: expected a JSON object with a string field 'text'"):
        list(documents([data], "text", 10**9))
