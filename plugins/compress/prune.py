"""Pruning algorithms for the ``lm`` plugin's :class:`~llmos.plugins.lm.model.Llama`: plain
functions that change a model's weights in place (or, for structured pruning, build a smaller
one). Only the decoder layers' seven linear projections are pruned (:data:`PRUNABLE`); the
embeddings, norms and ``lm_head`` stay dense, as in Wanda and SparseGPT, since pruning them
costs the most quality for what it saves.

Methods:

* :func:`magnitude` zeroes the weights of smallest ``|W|``, per matrix (``scope="layer"``) or
  with one threshold over all prunable matrices (``"global"``). The classic baseline: no data
  needed, but blind to how large each weight's input is, which in LLMs varies by orders of
  magnitude between hidden dimensions (the "outlier features").
* :func:`wanda` (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language
  Models") scores each weight by ``|W_nk| * ||X_k||_2``, its magnitude times the L2 norm of its
  input feature over calibration tokens, and prunes the same share in every output row. The
  score approximates how much the layer's output changes when the weight goes, so a small
  weight on an outlier feature survives; comparing within a row keeps every output
  neuron's fan-in equally dense, which the paper found matters for LLMs. No weight update, one
  forward pass of calibration data (:func:`calibrate`).
* :func:`two_four` keeps two of every four consecutive input weights of a row (NVIDIA's 2:4
  semi-structured sparsity, which sparse tensor cores run at up to twice the dense speed),
  choosing by magnitude or by Wanda scores.
* :func:`structured` removes whole units and returns a smaller *dense* model, which is faster
  everywhere without sparse kernels: key/value groups (a KV head with the query heads that
  read it, so grouped-query attention stays consistent) and MLP channels, the same number in
  every layer so the result is still a plain Llama config. Importance is activation-based as in
  Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
  Distillation"): a head's importance is the mean L2 norm of its attention output, an MLP
  channel's the mean ``|silu(gate) * up|`` it feeds into ``down_proj``. Heads keep their width
  (the config gets an explicit ``head_dim``); the heads left must still divide ``hidden_size``,
  as transformers requires, which rules out some group counts (a ``sparsity`` takes the nearest
  allowed one below; a ``heads`` share that lands on a ruled-out count is refused). Structured
  pruning loses much more quality than unstructured at the same share; it needs healing
  (fine-tuning or distillation, done by the job runner) afterwards.

Counts are exact per scope as far as integer rounding allows (``round(sparsity * count)``
zeros) and ties are broken deterministically (the lower index goes first), so a run is
reproducible. Masks are applied permanently: the weights are set to zero in place, and the
model stays dense in memory and on disk. Scores are computed in float32 whatever the weights'
dtype (float32 or bfloat16).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmos.plugins.compress.plan import _check_share, _structured_plan, check_structured  # noqa: F401 (part of this module's API)
from llmos.plugins.lm.model import Llama

PRUNABLE = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

METHODS = ("magnitude", "wanda", "2:4", "structured")


def prunable_linears(model: Llama) -> dict[str, nn.Linear]:
    """The decoder layers' projections by parameter-name prefix ("model.layers.0.self_attn.q_proj")."""
    out: dict[str, nn.Linear] = {}
    for i, layer in enumerate(model.model.layers):
        for suffix in PRUNABLE:
            name = f"model.layers.{i}.{suffix}"
            module = layer.get_submodule(suffix)
            if not isinstance(module, nn.Linear):
                # Quantized or packed layers have no dense weight to mask.
                raise ValueError(f"{name} is a {type(module).__name__}, not a dense nn.Linear: prune the unquantized model")
            out[name] = module
    return out


# -- calibration ---------------------------------------------------------------------------


@dataclass
class Calibration:
    """Activation statistics of a model on calibration tokens (see :func:`calibrate`)."""

    #: per prunable linear, the sum over tokens of x_k^2 for each input column k (float64)
    sq_norms: dict[str, torch.Tensor]
    #: how many tokens went through
    tokens: int
    #: [layer][num_attention_heads]: the mean L2 norm of each head's attention output
    head_importance: list[torch.Tensor]
    #: [layer][intermediate_size]: the mean |silu(gate) * up| of each MLP channel
    channel_importance: list[torch.Tensor]

    def act_norm(self, name: str) -> torch.Tensor:
        """||X_k||_2 over the calibration tokens for each input column of linear ``name``."""
        if name not in self.sq_norms:
            raise ValueError(f"the calibration has no statistics for {name}: calibrate this model")
        return self.sq_norms[name].sqrt()


@torch.no_grad()
def calibrate(model: Llama, batches: Iterable[torch.Tensor]) -> Calibration:
    """Run ``batches`` (token ids [B, T]) through ``model`` and collect what :func:`wanda`,
    :func:`two_four` and :func:`structured` score with."""
    linears = prunable_linears(model)
    c = model.config
    nh, d = c.num_attention_heads, c.head_dim
    device = model.model.embed_tokens.weight.device
    f64 = dict(dtype=torch.float64, device=device)
    sq = {name: torch.zeros(lin.in_features, **f64) for name, lin in linears.items()}
    heads = [torch.zeros(nh, **f64) for _ in model.model.layers]
    channels = [torch.zeros(c.intermediate_size, **f64) for _ in model.model.layers]

    def hook_for(name: str) -> Any:
        layer = int(name.split(".")[2])
        kind = name.rsplit(".", 1)[1]

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            # Summed in float64: millions of tokens of squares lose digits in float32.
            sq[name].add_(x.square().sum(0, dtype=torch.float64))
            if kind == "o_proj":  # o_proj's input is the heads' outputs side by side, head-major
                heads[layer].add_(x.view(-1, nh, d).norm(dim=-1).sum(0, dtype=torch.float64))
            elif kind == "down_proj":  # down_proj's input is silu(gate) * up
                channels[layer].add_(x.abs().sum(0, dtype=torch.float64))

        return hook

    tokens = 0
    handles = [lin.register_forward_hook(hook_for(name)) for name, lin in linears.items()]
    try:
        for batch in batches:
            if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.is_floating_point():
                raise ValueError(f"calibration batches are token id tensors [B, T], got {getattr(batch, 'shape', type(batch).__name__)}")
            model(batch.to(device))
            tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
    if tokens == 0:
        raise ValueError("calibrate: no calibration tokens (give at least one [B, T] batch of token ids)")
    return Calibration(
        sq_norms={name: v.cpu() for name, v in sq.items()},
        tokens=tokens,
        head_importance=[(v / tokens).cpu() for v in heads],
        channel_importance=[(v / tokens).cpu() for v in channels],
    )


# -- unstructured and 2:4 ------------------------------------------------------------------


def _as_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def _zero_smallest(weights: list[torch.Tensor], k: int) -> None:
    """Zero the ``k`` entries of smallest |w| over all of ``weights`` together (ties: the
    earlier matrix, then the lower flat index, first).

    The threshold is found by bisection over float32 bit patterns (non-negative floats order as
    their bits do) rather than by sorting everything at once: a global threshold over a
    billion-parameter model would need the whole model's scores and sort indices in memory,
    while counting needs one matrix's scores at a time, 31 times over.
    """
    if k <= 0:
        return

    def count(t: float, strict: bool) -> int:
        return sum(int(((w.float().abs() < t) if strict else (w.float().abs() <= t)).sum()) for w in weights)

    lo, hi = 0, 0x7F800000  # 0.0 and +inf
    while lo < hi:
        mid = (lo + hi) // 2
        if count(_as_float(mid), strict=False) >= k:
            hi = mid
        else:
            lo = mid + 1
    t = _as_float(lo)
    left = k - count(t, strict=True)
    for w in weights:
        a = w.float().abs()
        mask = a < t
        if left > 0:
            ties = (a == t).flatten().nonzero().flatten()[:left]
            mask.view(-1)[ties] = True
            left -= ties.numel()
        w.masked_fill_(mask, 0)


def _lowest_in_rows(score: torch.Tensor, k: int) -> torch.Tensor:
    """A mask of the ``k`` lowest scores of each row (ties: lower column first)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask.scatter_(-1, torch.argsort(score, dim=-1, stable=True)[..., :k], True)
    return mask


def _wanda_score(calib: Calibration, name: str, lin: nn.Linear) -> torch.Tensor:
    norm = calib.act_norm(name)
    if norm.shape != (lin.in_features,):
        raise ValueError(f"the calibration of {name} has {norm.shape[0]} input columns, the model {lin.in_features}: calibrate this model")
    return lin.weight.detach().float().abs() * norm.to(device=lin.weight.device, dtype=torch.float32)


@torch.no_grad()
def magnitude(model: Llama, sparsity: float, scope: str = "layer") -> None:
    """Zero the ``sparsity`` share of smallest-|W| prunable weights: per matrix (``"layer"``) or
    over all prunable matrices at once (``"global"``)."""
    sparsity = _check_share("sparsity", sparsity)
    if scope not in ("layer", "global"):
        raise ValueError(f"magnitude: scope must be 'layer' or 'global', got {scope!r}")
    weights = [lin.weight for lin in prunable_linears(model).values()]
    if scope == "global":
        _zero_smallest(weights, round(sparsity * sum(w.numel() for w in weights)))
    else:
        for w in weights:
            _zero_smallest([w], round(sparsity * w.numel()))


@torch.no_grad()
def wanda(model: Llama, sparsity: float, calib: Calibration) -> None:
    """Wanda: zero the ``sparsity`` share of lowest ``|W_nk| * ||X_k||`` within each output row n."""
    sparsity = _check_share("sparsity", sparsity)
    if calib is None:
        raise ValueError("wanda needs a calibration (calibrate the model first)")
    for name, lin in prunable_linears(model).items():
        score = _wanda_score(calib, name, lin)
        lin.weight.masked_fill_(_lowest_in_rows(score, round(sparsity * lin.in_features)), 0)


@torch.no_grad()
def two_four(model: Llama, calib: Calibration | None = None) -> None:
    """2:4 along the input dimension: in each group of 4 consecutive input weights of a row,
    keep the 2 of highest score (|W|, or Wanda's score when ``calib`` is given)."""
    linears = prunable_linears(model)
    # Checked for every layer first, so that a refused model is left untouched.
    for name, lin in linears.items():
        if lin.in_features % 4:
            raise ValueError(f"2:4 needs input widths divisible by 4; {name} has in_features {lin.in_features}")
    for name, lin in linears.items():
        w = lin.weight
        score = _wanda_score(calib, name, lin) if calib is not None else w.detach().float().abs()
        groups = score.view(w.shape[0], w.shape[1] // 4, 4)
        w.masked_fill_(_lowest_in_rows(groups, 2).view(w.shape), 0)


# -- structured ----------------------------------------------------------------------------


def _span(units: torch.Tensor, width: int) -> torch.Tensor:
    """The indices of rows (or columns) of units ``units``, each ``width`` wide."""
    return (units[:, None] * width + torch.arange(width, device=units.device)).flatten()


@torch.no_grad()
def structured(model: Llama, calib: Calibration, sparsity: float | None = None, heads: float | None = None, mlp: float | None = None, align: int = 1) -> Llama:
    """A new, smaller dense Llama without the least important key/value groups (with their
    query heads) and MLP channels, the same number removed from every layer.

    ``sparsity``: the share of the parameters outside the embedding to remove (an untied output
    head counts, but is kept: the layers give its share), split about evenly between attention and
    MLP; or ``heads`` / ``mlp``: the shares of key/value groups / MLP channels to
    remove (a part not given is untouched). ``model`` is left as it was. The group count is
    limited to those that leave a head count dividing hidden_size (see the module's notes).
    """
    c = model.config
    groups, channels = _structured_plan(c, sparsity, heads, mlp, align)
    if calib is None:
        raise ValueError("structured pruning needs a calibration (calibrate the model first)")
    nh, nkv, d, inter, n_layers = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size, c.num_hidden_layers
    g = nh // nkv
    if len(calib.head_importance) != n_layers or len(calib.channel_importance) != n_layers or any(
        hi.shape != (nh,) or ci.shape != (inter,) for hi, ci in zip(calib.head_importance, calib.channel_importance)
    ):
        raise ValueError(f"the calibration does not match the model ({n_layers} layers, {nh} heads, {inter} MLP channels): calibrate this model")
    params = dict(model.named_parameters())
    state = {name: p.detach().clone() for name, p in params.items()}
    for i in range(n_layers):
        prefix = f"model.layers.{i}."
        device = params[prefix + "self_attn.q_proj.weight"].device
        # A group lives or dies with all its query heads: it is worth what they are worth together.
        group_importance = calib.head_importance[i].view(nkv, g).sum(1)
        kept_groups = torch.argsort(group_importance, stable=True)[groups:].sort().values.to(device)
        kept_channels = torch.argsort(calib.channel_importance[i], stable=True)[channels:].sort().values.to(device)
        q_rows = _span(_span(kept_groups, g), d)  # query head j reads key/value head j // g
        kv_rows = _span(kept_groups, d)
        for name, dim, index in (
            ("self_attn.q_proj", 0, q_rows), ("self_attn.k_proj", 0, kv_rows), ("self_attn.v_proj", 0, kv_rows), ("self_attn.o_proj", 1, q_rows),
            ("mlp.gate_proj", 0, kept_channels), ("mlp.up_proj", 0, kept_channels), ("mlp.down_proj", 1, kept_channels),
        ):
            key = f"{prefix}{name}.weight"
            state[key] = params[key].detach().index_select(dim, index)
    new_config = dataclasses.replace(
        c,
        num_attention_heads=(nkv - groups) * g,
        num_key_value_heads=nkv - groups,
        intermediate_size=inter - channels,
        head_dim=d,  # heads keep their width; the query width shrinks below hidden_size
    ).validate()
    with torch.device("meta"):
        pruned = Llama(new_config)
    if new_config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    pruned.load_state_dict(state, strict=True, assign=True)
    if new_config.tie_word_embeddings:  # assign=True wraps each name in its own Parameter: tie them again
        pruned.lm_head.weight = pruned.model.embed_tokens.weight
    for name, p in pruned.named_parameters():
        p.requires_grad_(params[name].requires_grad)
    return pruned.train(model.training)


# -- reporting -----------------------------------------------------------------------------


def sparsity_stats(model: Llama) -> dict[str, Any]:
    """Parameter counts (tied weights once) and the zero share of the prunable weights."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p))
    weights = [lin.weight for lin in prunable_linears(model).values()]
    prunable = sum(w.numel() for w in weights)
    prunable_nonzero = sum(int(torch.count_nonzero(w)) for w in weights)
    return {
        "params": total,
        "nonzero": nonzero,
        "prunable": prunable,
        "prunable_nonzero": prunable_nonzero,
        "sparsity": 1.0 - prunable_nonzero / prunable if prunable else 0.0,
    }


def sparsity_pattern(method: str, sparsity: float, scope: str | None) -> dict[str, Any]:
    """The description of a pruning for llmos.json: method, pattern, share and target layers."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; methods: {', '.join(METHODS)}")
    if scope is not None and method != "magnitude":
        raise ValueError(f"scope is for method=magnitude, not {method}")
    sparsity = _check_share("sparsity", sparsity)
    targets = list(PRUNABLE)
    if method == "magnitude":
        return {"method": method, "pattern": "unstructured", "scope": scope or "layer", "sparsity": sparsity, "targets": targets}
    if method == "wanda":
        return {"method": method, "pattern": "unstructured", "scope": "row", "sparsity": sparsity, "targets": targets}
    if method == "2:4":
        if sparsity != 0.5:
            raise ValueError(f"2:4 removes exactly half the weights (sparsity 0.5), got {sparsity}")
        return {"method": method, "pattern": "2:4", "dim": "input", "sparsity": 0.5, "targets": targets}
    return {"method": method, "pattern": "structured", "units": ["kv_group", "mlp_channel"], "sparsity": sparsity, "targets": targets}
