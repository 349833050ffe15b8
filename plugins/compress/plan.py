"""How many key/value groups and MLP channels structured pruning removes: plain arithmetic on a
model's config, without torch, so requests are judged at submit (the kernel imports this)."""

from __future__ import annotations

import math
from typing import Any

from llmos.plugins.lm.config import LlamaConfig

__all__ = ["check_structured"]


def _check_share(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a share in [0, 1), got {value!r}")
    return float(value)


def _removable_groups(config: LlamaConfig) -> list[int]:
    """How many key/value groups may go: fewer than all, and leaving a head count that divides
    hidden_size, without which transformers refuses the config (even with head_dim given)."""
    g = config.num_attention_heads // config.num_key_value_heads
    nkv = config.num_key_value_heads
    return [k for k in range(nkv) if config.hidden_size % ((nkv - k) * g) == 0]


def _structured_plan(config: LlamaConfig, sparsity: float | None, heads: float | None, mlp: float | None, align: int = 1) -> tuple[int, int]:
    """(key/value groups, MLP channels) to remove from every layer; ValueError for impossible
    requests. ``align``: with ``sparsity``, keep a multiple of this many MLP channels."""
    for name, value in (("sparsity", sparsity), ("heads", heads), ("mlp", mlp)):
        if value is not None:
            _check_share(name, value)
    if sparsity is None and heads is None and mlp is None:
        raise ValueError("structured pruning needs sparsity (a share of the parameters outside the embedding), or heads and/or mlp (shares to remove)")
    if sparsity is not None and (heads is not None or mlp is not None):
        raise ValueError("structured pruning: give sparsity, or heads and/or mlp, not both")
    nkv, inter, h = config.num_key_value_heads, config.intermediate_size, config.hidden_size
    g = config.num_attention_heads // nkv
    allowed = _removable_groups(config)
    if sparsity is None:
        groups = round(heads * nkv) if heads is not None else 0
        channels = round(mlp * inter) if mlp is not None else 0
        if groups >= nkv:
            raise ValueError(f"heads={heads} would remove all {nkv} key/value groups; keep at least one")
        if groups not in allowed:
            options = ", ".join(f"{k} (heads={k / nkv:.4g})" for k in allowed if k)
            raise ValueError(
                f"heads={heads} would leave {(nkv - groups) * g} attention heads, which do not divide hidden_size {h} "
                f"(transformers requires it); key/value groups that can go: {options or 'none'}"
            )
        if channels >= inter:
            raise ValueError(f"mlp={mlp} would remove all {inter} MLP channels; keep at least one")
        return groups, channels  # the user's share, exactly
    d = config.head_dim
    per_group = h * d * (2 * g + 2)  # g query heads' rows of q_proj and columns of o_proj, one head of k and v
    per_channel = 3 * h  # a row of gate and up, a column of down
    total = nkv * per_group + inter * per_channel
    # The share is of the parameters outside the embedding: the layers' and an untied output
    # head's. The head is not pruned (a smaller vocabulary is another model), so the layers give
    # it all; at batch 1 decode reads the head too, and this is what makes the share the speed-up.
    head = 0 if config.tie_word_embeddings else config.vocab_size * h
    target = sparsity * (total + head / config.num_hidden_layers)
    # About the same share of both parts: groups are coarse, so round them down and let the
    # finer MLP channels make up the rest.
    share = math.floor(target / total * nkv + 1e-9)
    groups = max(k for k in allowed if k <= share)
    channels = round((target - groups * per_group) / per_channel)
    # At high shares the MLP alone cannot make up the rest: take more groups while there are any.
    for more in (k for k in allowed if k > groups):
        if channels <= inter - 1:
            break
        groups, channels = more, round((target - more * per_group) / per_channel)
    if channels > inter - 1:
        most = (allowed[-1] * per_group + (inter - 1) * per_channel) / (total + head / config.num_hidden_layers)
        raise ValueError(
            f"sparsity={sparsity} cannot be reached by structured pruning: removing {allowed[-1]} of {nkv} key/value groups "
            f"and all but one MLP channel per layer removes at most {most:.1%} of the parameters outside the embedding"
        )
    return groups, _aligned(inter, max(channels, 0), align)


def _aligned(inter: int, channels: int, align: int) -> int:
    """``channels`` to remove, moved so that the kept width is a multiple of ``align`` (32 lets
    int4 groups of 32 and the SIMD kernels' blocks divide the pruned width; 91 fits neither)."""
    kept = inter - channels
    if align <= 1 or kept < align or channels == 0:
        return channels
    kept = min(inter, max(align, round(kept / align) * align))
    return inter - kept


def check_structured(config: LlamaConfig, sparsity: float | None, heads: float | None, mlp: float | None, align: int = 1) -> None:
    """The ValueErrors :func:`structured` raises for impossible requests, without a model."""
    _structured_plan(config, sparsity, heads, mlp, align)
