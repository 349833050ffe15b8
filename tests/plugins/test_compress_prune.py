"""The compress plugin's pruning algorithms on tiny real models (no kernel)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from llmos.plugins.compress import prune  # noqa: E402
from llmos.plugins.lm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from llmos.plugins.lm.config import LlamaConfig, config_from_preset  # noqa: E402
from llmos.plugins.lm.model import Llama  # noqa: E402

VOCAB = 100
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _model(seed: int = 0, **overrides: object) -> Llama:
    model = Llama(LlamaConfig(**{**SHAPE, **overrides}))
    model.init_weights(seed=seed)
    return model.eval()


def _batches(seed: int = 0, n: int = 2, b: int = 2, t: int = 16) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (b, t), generator=gen) for _ in range(n)]


def _skewed(seed: int = 0) -> Llama:
    """A model whose hidden dimensions differ by up to 100x in scale (LLMs' outlier features),
    made so by the norms' weights: then |W| alone misjudges which weights matter."""
    model = _model(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            skew = 10 ** torch.linspace(-1, 1, SHAPE["hidden_size"])[torch.randperm(SHAPE["hidden_size"], generator=gen)]
            layer.input_layernorm.weight.copy_(skew)
            layer.post_attention_layernorm.weight.copy_(skew)
    return model


def _zeros(w: torch.Tensor) -> int:
    return int((w == 0).sum())


def test_prunable_linears_are_the_layers_projections() -> None:
    model = _model()
    linears = prune.prunable_linears(model)
    assert len(linears) == 7 * SHAPE["num_hidden_layers"]
    assert list(linears)[:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert linears["model.layers.1.mlp.down_proj"] is model.model.layers[1].mlp.down_proj
    assert not any("embed" in n or "lm_head" in n for n in linears)


def test_calibrate_collects_norms_and_importances_and_removes_its_hooks() -> None:
    model = _model()
    batches = _batches()
    seen: dict[str, list[torch.Tensor]] = {"q": [], "o": [], "down": []}
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    mine = [
        attn.q_proj.register_forward_hook(lambda m, a, o: seen["q"].append(a[0].reshape(-1, a[0].shape[-1]))),
        attn.o_proj.register_forward_hook(lambda m, a, o: seen["o"].append(a[0].reshape(-1, a[0].shape[-1]))),
        mlp.down_proj.register_forward_hook(lambda m, a, o: seen["down"].append(a[0].reshape(-1, a[0].shape[-1]))),
    ]
    calib = prune.calibrate(model, batches)
    for h in mine:
        h.remove()
    x_q, x_o, x_down = (torch.cat(seen[k]).double() for k in ("q", "o", "down"))
    assert calib.tokens == 2 * 2 * 16 == x_q.shape[0]
    assert calib.sq_norms["model.layers.1.self_attn.q_proj"].dtype == torch.float64
    assert torch.allclose(calib.act_norm("model.layers.1.self_attn.q_proj"), x_q.norm(dim=0), rtol=1e-5)
    d = model.config.head_dim
    assert torch.allclose(calib.head_importance[1], x_o.view(-1, 4, d).norm(dim=-1).mean(0), rtol=1e-5)
    assert torch.allclose(calib.channel_importance[1], x_down.abs().mean(0), rtol=1e-5)
    assert len(calib.head_importance) == 2 and calib.channel_importance[0].shape == (128,)
    assert all(not lin._forward_hooks for lin in prune.prunable_linears(model).values())
    # Also on error: a bad token id fails in the embedding, the hooks go anyway.
    with pytest.raises(IndexError):
        prune.calibrate(model, [torch.full((1, 4), VOCAB + 5)])
    assert all(not lin._forward_hooks for lin in prune.prunable_linears(model).values())
    with pytest.raises(ValueError, match="no calibration tokens"):
        prune.calibrate(model, [])
    with pytest.raises(ValueError, match=r"token id tensors \[B, T\]"):
        prune.calibrate(model, [torch.zeros(2, 3, 4, dtype=torch.long)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_per_layer_is_exact(dtype: torch.dtype) -> None:
    model = _model().to(dtype)
    before = {n: lin.weight.clone() for n, lin in prune.prunable_linears(model).items()}
    prune.magnitude(model, 0.37)
    for name, lin in prune.prunable_linears(model).items():
        w, old = lin.weight, before[name].float().abs()
        assert w.dtype == dtype
        assert _zeros(w) == round(0.37 * w.numel()), name
        assert old[w == 0].max() <= old[w != 0].min()  # the smallest went
    assert model.lm_head.weight.count_nonzero() == model.lm_head.weight.numel()
    assert model.model.embed_tokens.weight.count_nonzero() == model.model.embed_tokens.weight.numel()


def test_magnitude_global_is_one_threshold_and_exact() -> None:
    model = _model()
    with torch.no_grad():  # make the layers' scales differ, so one threshold prunes them unevenly
        model.model.layers[0].mlp.up_proj.weight.mul_(0.1)
    before = {n: lin.weight.abs().clone() for n, lin in prune.prunable_linears(model).items()}
    prune.magnitude(model, 0.5, scope="global")
    linears = prune.prunable_linears(model)
    total = sum(lin.weight.numel() for lin in linears.values())
    assert sum(_zeros(lin.weight) for lin in linears.values()) == round(0.5 * total)
    pruned = torch.cat([before[n][lin.weight == 0] for n, lin in linears.items()])
    kept = torch.cat([before[n][lin.weight != 0] for n, lin in linears.items()])
    assert pruned.max() <= kept.min()
    assert prune.sparsity_stats(model)["sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert _zeros(linears["model.layers.0.mlp.up_proj"].weight) > 0.9 * linears["model.layers.0.mlp.up_proj"].weight.numel()


def test_ties_are_broken_deterministically() -> None:
    model = _model()
    with torch.no_grad():
        for lin in prune.prunable_linears(model).values():
            lin.weight.fill_(0.5)
    prune.magnitude(model, 0.25)
    w = model.model.layers[0].self_attn.q_proj.weight.flatten()
    k = round(0.25 * w.numel())
    assert bool((w[:k] == 0).all()) and bool((w[k:] == 0.5).all())  # equal scores: the lower index goes first
    other = _model()
    with torch.no_grad():
        for lin in prune.prunable_linears(other).values():
            lin.weight.fill_(0.5)
    prune.magnitude(other, 0.25)
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(prune.prunable_linears(model).values(), prune.prunable_linears(other).values()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wanda_prunes_the_same_share_of_every_row(dtype: torch.dtype) -> None:
    model = _model().to(dtype)
    calib = prune.calibrate(model, _batches())
    prune.wanda(model, 0.5, calib)
    for name, lin in prune.prunable_linears(model).items():
        per_row = (lin.weight == 0).sum(1)
        assert bool((per_row == round(0.5 * lin.in_features)).all()), name
    assert prune.sparsity_stats(model)["sparsity"] == pytest.approx(0.5)


def test_wanda_keeps_weights_on_large_activations_and_errs_less_than_magnitude() -> None:
    dense = _skewed()
    batches = _batches(n=2, b=4)
    calib = prune.calibrate(dense, batches)
    by_magnitude, by_wanda = copy.deepcopy(dense), copy.deepcopy(dense)
    prune.magnitude(by_magnitude, 0.5)
    prune.wanda(by_wanda, 0.5, calib)
    name = "model.layers.0.self_attn.q_proj"
    w_mag, w_wanda = prune.prunable_linears(by_magnitude)[name].weight, prune.prunable_linears(by_wanda)[name].weight
    assert not torch.equal(w_mag == 0, w_wanda == 0)
    # Wanda keeps more of the weights that read the largest inputs.
    norm = calib.act_norm(name).float()
    big = norm >= norm.median()
    assert _zeros(w_wanda[:, big]) < _zeros(w_mag[:, big])
    # The first projection's input is the same in all three models: compare its outputs exactly.
    inputs: list[torch.Tensor] = []
    hook = dense.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: inputs.append(a[0]))
    with torch.no_grad():
        ref = torch.cat([dense(b) for b in batches])
        hook.remove()
        x = torch.cat(inputs)
        w = prune.prunable_linears(dense)[name].weight
        assert (x @ (w - w_wanda).T).pow(2).mean() < (x @ (w - w_mag).T).pow(2).mean()
        err_mag = (torch.cat([by_magnitude(b) for b in batches]) - ref).pow(2).mean()
        err_wanda = (torch.cat([by_wanda(b) for b in batches]) - ref).pow(2).mean()
    assert err_wanda < err_mag


@pytest.mark.parametrize("scores", ["magnitude", "wanda"])
def test_two_four_keeps_two_of_every_four(scores: str) -> None:
    model = _skewed()
    calib = prune.calibrate(model, _batches()) if scores == "wanda" else None
    before = {n: lin.weight.abs().clone() for n, lin in prune.prunable_linears(model).items()}
    prune.two_four(model, calib)
    for name, lin in prune.prunable_linears(model).items():
        w = lin.weight
        groups = (w == 0).view(w.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all()), name
        if calib is None:  # the kept two are the larger two of their four
            old = before[name].view(w.shape[0], -1, 4)
            kept = (w != 0).view_as(old)
            assert bool((old.masked_fill(~kept, float("inf")).amin(-1) >= old.masked_fill(kept, -float("inf")).amax(-1)).all())
    assert prune.sparsity_stats(model)["sparsity"] == 0.5
    if scores == "wanda":  # skewed activations: a different choice than magnitude's
        other = _skewed()
        prune.two_four(other)
        assert any(not torch.equal(a.weight == 0, b.weight == 0) for a, b in zip(prune.prunable_linears(model).values(), prune.prunable_linears(other).values()))


def test_bad_unstructured_requests_are_refused() -> None:
    model = _model()
    calib = prune.calibrate(model, _batches(n=1))
    for bad in (1.0, -0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"sparsity must be a share in \[0, 1\)"):
            prune.magnitude(model, bad)
        with pytest.raises(ValueError, match=r"sparsity must be a share in \[0, 1\)"):
            prune.wanda(model, bad, calib)
    with pytest.raises(ValueError, match="scope must be 'layer' or 'global'"):
        prune.magnitude(model, 0.5, scope="row")
    odd = _model(intermediate_size=130)
    before = [lin.weight.clone() for lin in prune.prunable_linears(odd).values()]
    with pytest.raises(ValueError, match=r"2:4 needs input widths divisible by 4; model\.layers\.0\.mlp\.down_proj has in_features 130"):
        prune.two_four(odd)
    assert all(torch.equal(a, lin.weight) for a, lin in zip(before, prune.prunable_linears(odd).values()))  # untouched
    other = _model(seed=1, intermediate_size=96)
    with pytest.raises(ValueError, match="calibrate this model"):
        prune.wanda(other, 0.5, calib)


def test_magnitude_zero_sparsity_changes_nothing() -> None:
    model = _model()
    before = copy.deepcopy(model.state_dict())
    prune.magnitude(model, 0.0, scope="global")
    prune.wanda(model, 0.0, prune.calibrate(model, _batches(n=1)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- structured ----------------------------------------------------------------------------


def _masked_original(model: Llama, pruned_groups: list[list[int]], pruned_channels: list[list[int]]) -> Llama:
    """The unpruned model with the removed groups' heads and the removed channels silenced:
    it computes what the structured-pruned model computes."""
    out = copy.deepcopy(model)
    g, d = model.config.num_attention_heads // model.config.num_key_value_heads, model.config.head_dim
    with torch.no_grad():
        for layer, groups, channels in zip(out.model.layers, pruned_groups, pruned_channels):
            for grp in groups:
                layer.self_attn.o_proj.weight[:, grp * g * d : (grp + 1) * g * d] = 0
            layer.mlp.down_proj.weight[:, channels] = 0
    return out


def test_structured_removes_the_least_important_groups_and_channels() -> None:
    model = _model(hidden_size=96, num_attention_heads=8, num_key_value_heads=4)  # head_dim 12, groups of 2 query heads
    calib = prune.calibrate(model, _batches())
    # Importances chosen by hand: per layer, which group and which channels are least important.
    calib.head_importance = [torch.tensor([5.0, 5, 1, 1, 9, 9, 3, 3]), torch.tensor([2.0, 9, 3, 3, 0.5, 0.5, 4, 0.1])]
    channel = torch.arange(128, dtype=torch.float64)
    calib.channel_importance = [channel.flip(0), channel]
    pruned = prune.structured(model, calib, heads=0.25, mlp=0.5)
    c = pruned.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size, c.hidden_size) == (6, 3, 12, 64, 96)
    assert model.config.num_attention_heads == 8  # the original is untouched
    attn = pruned.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (72, 96) and attn.k_proj.weight.shape == (36, 96) and attn.o_proj.weight.shape == (96, 72)
    # Layer 0 drops group 1 (heads 2, 3: 2 in all) and channels 64..127; layer 1 drops group 2
    # (heads 4, 5: 6 in all, though head 7 alone is the least important) and channels 0..63.
    old = model.model.layers[0].self_attn
    assert torch.equal(attn.k_proj.weight, torch.cat([old.k_proj.weight[:12], old.k_proj.weight[24:]]))
    assert torch.equal(attn.q_proj.weight, torch.cat([old.q_proj.weight[:24], old.q_proj.weight[48:]]))
    assert torch.equal(pruned.model.layers[0].mlp.gate_proj.weight, model.model.layers[0].mlp.gate_proj.weight[:64])
    assert torch.equal(pruned.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight[:, 64:])
    ids = _batches(seed=5)[0]
    with torch.no_grad():
        expected = _masked_original(model, [[1], [2]], [list(range(64, 128)), list(range(64))])(ids)
        assert torch.allclose(pruned(ids), expected, atol=1e-5, rtol=0)
    assert prune.sparsity_stats(pruned)["params"] == c.num_parameters()


@pytest.mark.parametrize("tie", [False, True])
def test_structured_removing_nothing_is_the_same_model(tie: bool) -> None:
    model = _model(tie_word_embeddings=tie)
    calib = prune.calibrate(model, _batches(n=1))
    same = prune.structured(model, calib, heads=0.0, mlp=0.0)
    assert same.config == model.config
    ids = _batches(seed=3)[0]
    with torch.no_grad():
        assert torch.equal(same(ids), model(ids))
    assert same.lm_head.weight is same.model.embed_tokens.weight if tie else same.lm_head.weight is not same.model.embed_tokens.weight
    assert same.model.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # a new model


def test_structured_sparsity_splits_between_attention_and_mlp() -> None:
    model = Llama(config_from_preset("nano", VOCAB))
    model.init_weights(seed=0)
    calib = prune.calibrate(model.eval(), _batches(n=1))
    before = prune.sparsity_stats(model)["prunable"]
    c = model.config
    # The share is of the parameters outside the embedding: an untied head counts, and is kept.
    base = before + (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)
    per_channel_share = 3 * c.hidden_size * c.num_hidden_layers / base
    for sparsity, groups in ((0.3, 0), (0.5, 1), (0.7, 1)):
        pruned = prune.structured(model, calib, sparsity=sparsity)
        assert pruned.lm_head.weight.shape == model.lm_head.weight.shape
        removed = (before - prune.sparsity_stats(pruned)["prunable"]) / base
        assert pruned.config.num_key_value_heads == c.num_key_value_heads - groups  # groups rounded down
        assert abs(removed - sparsity) <= per_channel_share / 2 + 1e-9  # the MLP makes up the rest, to the nearest channel
        assert pruned(_batches(seed=1)[0]).shape == (2, 16, VOCAB)
    only_mlp = prune.structured(model, calib, mlp=0.25)
    assert (only_mlp.config.num_key_value_heads, only_mlp.config.intermediate_size) == (2, 132)
    only_heads = prune.structured(model, calib, heads=0.5)
    assert (only_heads.config.num_attention_heads, only_heads.config.intermediate_size) == (2, 176)


def test_structured_keeps_head_counts_that_divide_hidden_size() -> None:
    # 8 heads of 8 in groups of 2: removing 1 group leaves 6 heads, which do not divide 64.
    model = _model(num_attention_heads=8, num_key_value_heads=4)
    calib = prune.calibrate(model, _batches(n=1))
    assert prune.structured(model, calib, sparsity=0.3).config.num_key_value_heads == 4  # 1 group rounds down to 0
    assert prune.structured(model, calib, sparsity=0.55).config.num_key_value_heads == 2
    assert prune.structured(model, calib, heads=0.5).config.num_attention_heads == 4
    message = r"heads=0.25 would leave 6 attention heads, which do not divide hidden_size 64 .* can go: 2 \(heads=0.5\), 3 \(heads=0.75\)"
    with pytest.raises(ValueError, match=message):
        prune.check_structured(model.config, None, 0.25, None)
    with pytest.raises(ValueError, match=message):
        prune.structured(model, calib, heads=0.25)


def test_structured_model_loads_in_transformers_and_back(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = _model(hidden_size=96, num_attention_heads=8, num_key_value_heads=4)
    calib = prune.calibrate(model, _batches())
    pruned = prune.structured(model, calib, heads=0.25, mlp=0.3)
    c = pruned.config
    assert c.num_attention_heads == 6 and c.hidden_size // c.num_attention_heads != c.head_dim == 12
    save_checkpoint(tmp_path / "ck", pruned, None, {"sparsity": prune.sparsity_pattern("structured", 0.0, None)})
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert (config["head_dim"], config["num_attention_heads"], config["intermediate_size"]) == (12, 6, 90)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32, attn_implementation="eager").eval()
    ids = _batches(seed=7)[0]
    with torch.no_grad():
        ours = pruned(ids)
        assert torch.allclose(ours, hf(ids).logits, atol=1e-4, rtol=0)
        back, manifest = load_checkpoint(tmp_path / "ck")
        assert back.config == c and manifest["sparsity"]["pattern"] == "structured"
        assert torch.equal(back.eval()(ids), ours)


def test_decoder_runs_a_structured_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inference path sizes attention by head_dim, not hidden_size / heads (torch step here;
    the C step is covered by the lm tests)."""
    from llmos.plugins.lm import kernels
    from llmos.plugins.lm.model import Decoder, KVCache

    monkeypatch.setenv("LLMOS_BF16_KERNEL", "torch")
    kernels._reset()
    try:
        model = _model(hidden_size=96, num_attention_heads=8, num_key_value_heads=4)
        ids = _batches()[0]
        pruned = prune.structured(model, prune.calibrate(model, [ids]), heads=0.25, mlp=0.3)
        with torch.no_grad():
            expected = pruned(ids)
            decoder = Decoder(pruned)
            cache = KVCache(pruned.config, 2, 32, torch.float32)
            prefill = decoder(ids[:, :-1].contiguous(), [0, 0], [0, 1], cache, last_only=False)
            step = decoder(ids[:, -1:].contiguous(), [15, 15], [0, 1], cache)
        assert torch.allclose(prefill, expected[:, :-1], atol=1e-5, rtol=0)
        assert torch.allclose(step[:, 0], expected[:, -1], atol=1e-5, rtol=0)
    finally:
        kernels._reset()


def test_bad_structured_requests_are_refused() -> None:
    model = _model()
    calib = prune.calibrate(model, _batches(n=1))
    cases = [
        (dict(sparsity=1.0), r"sparsity must be a share in \[0, 1\), got 1.0"),
        (dict(sparsity=-0.2), r"sparsity must be a share in \[0, 1\)"),
        (dict(heads=1.0), r"heads must be a share in \[0, 1\)"),
        (dict(heads=0.8), "heads=0.8 would remove all 2 key/value groups; keep at least one"),
        (dict(mlp=0.999), "mlp=0.999 would remove all 128 MLP channels; keep at least one"),
        (dict(), "needs sparsity"),
        (dict(sparsity=0.3, heads=0.5), "not both"),
        (dict(sparsity=0.95), r"cannot be reached .* at most \d+\.\d% of the parameters outside the embedding"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            prune.structured(model, calib, **kwargs)
        with pytest.raises(ValueError, match=message):
            prune.check_structured(model.config, kwargs.get("sparsity"), kwargs.get("heads"), kwargs.get("mlp"))
    prune.check_structured(model.config, 0.5, None, None)
    prune.check_structured(model.config, None, 0.5, 0.9)
    other = prune.calibrate(_model(intermediate_size=96), _batches(n=1))
    with pytest.raises(ValueError, match="calibration does not match the model"):
        prune.structured(model, other, mlp=0.5)


# -- reporting and config ------------------------------------------------------------------


def test_sparsity_stats_and_pattern() -> None:
    model = _model(tie_word_embeddings=True)
    stats = prune.sparsity_stats(model)
    assert stats["params"] == model.config.num_parameters()  # tied weights once
    assert stats["prunable"] == stats["prunable_nonzero"] and stats["sparsity"] == 0.0
    prune.two_four(model)
    stats = prune.sparsity_stats(model)
    assert stats["sparsity"] == 0.5 and stats["params"] - stats["nonzero"] == stats["prunable"] // 2
    assert prune.sparsity_pattern("2:4", 0.5, None) == {"method": "2:4", "pattern": "2:4", "dim": "input", "sparsity": 0.5, "targets": list(prune.PRUNABLE)}
    assert prune.sparsity_pattern("magnitude", 0.3, "global")["scope"] == "global"
    assert prune.sparsity_pattern("wanda", 0.5, None)["pattern"] == "unstructured"
    json.dumps(prune.sparsity_pattern("structured", 0.25, None))
    with pytest.raises(ValueError, match="unknown pruning method 'random'"):
        prune.sparsity_pattern("random", 0.5, None)
    with pytest.raises(ValueError, match=r"sparsity 0\.5"):
        prune.sparsity_pattern("2:4", 0.3, None)


def test_config_carries_an_explicit_head_dim() -> None:
    transformers = pytest.importorskip("transformers")
    default = LlamaConfig(**SHAPE)
    assert default.head_dim == 16 and LlamaConfig.from_hf_dict(default.to_hf_dict()) == default
    narrow = dataclasses.replace(default, num_attention_heads=2, num_key_value_heads=1, head_dim=16).validate()
    assert LlamaConfig.from_hf_dict(narrow.to_hf_dict()) == narrow
    assert transformers.LlamaConfig(**narrow.to_hf_dict()).head_dim == 16
    assert narrow.num_parameters() == sum(p.numel() for p in Llama(narrow).parameters())
    with pytest.raises(ValueError, match=r"num_attention_heads \(6\) must divide hidden_size \(64\)"):
        LlamaConfig(**{**SHAPE, "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 16}).validate()
    with pytest.raises(ValueError, match=r"head size .* must be even"):
        dataclasses.replace(default, head_dim=7).validate()
