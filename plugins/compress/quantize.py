"""Quantizing a Llama in place: every projection (and the lm_head unless kept) becomes an
:class:`~llmos.plugins.compress.qlinear.Int8Linear` or
:class:`~llmos.plugins.compress.qlinear.Int4Linear`; embeddings and norms stay as they are
(embeddings are looked up, not multiplied). GPTQ's Hessians come from calibration text run
through the float model; layers that read the same input (q, k and v; gate and up) share one."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import nn

from llmos.plugins.compress import native, quant
from llmos.plugins.compress.ctformat import LINEARS
from llmos.plugins.compress.qlinear import Int4Linear, Int8Linear, QuantLinear
from llmos.plugins.lm.model import Llama

#: Layers that read the same input as another: their Hessian is that layer's.
SAME_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj", "mlp.up_proj": "mlp.gate_proj"}


def layer_names(model: Llama) -> list[str]:
    return [f"model.layers.{i}.{lin}" for i in range(len(model.model.layers)) for lin in LINEARS]


@torch.no_grad()
def collect_hessians(model: Llama, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sum x x^T`` [K, K] (float32) of the inputs of every projection that reads its own input,
    over the calibration batches (token ids [B, T])."""
    hessians: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            h = hessians.get(name)
            if h is None:
                h = hessians[name] = torch.zeros(x.shape[1], x.shape[1])
            h.addmm_(x.t(), x)

        return fn

    for name in layer_names(model):
        if name.split(".", 3)[3] in SAME_INPUT:
            continue
        hooks.append(model.get_submodule(name).register_forward_hook(hook(name)))
    try:
        model.eval()
        for batch in batches:
            model(batch)
    finally:
        for h in hooks:
            h.remove()
    return hessians


def _hessian_of(name: str, hessians: dict[str, torch.Tensor]) -> torch.Tensor:
    prefix, _, local = name.rpartition(".layers.")
    index, _, lin = local.partition(".")
    source = SAME_INPUT.get(lin, lin)
    return hessians[f"{prefix}.layers.{index}.{source}"]


def quantize_layer(weight: torch.Tensor, scheme: str, group: int, symmetric: bool, hessian: torch.Tensor | None = None) -> QuantLinear:
    """One weight [N, K] as the layer that runs ``scheme``."""
    if scheme in ("int8", "w8a8"):
        q = quant.quantize_int8(weight)
        return Int8Linear(q.q, q.scale, act_int8=scheme == "w8a8")
    q = quant.gptq(weight, hessian, group, symmetric) if hessian is not None else quant.quantize_int4(weight, group, symmetric)
    return Int4Linear(native.pack_int4(q.q), q.scale, q.zero, group, weight.shape[1])


@torch.no_grad()
def quantize_model(model: Llama, scheme: str, *, group: int = 128, symmetric: bool = True, head: str = "quantize",
                   hessians: dict[str, torch.Tensor] | None = None, progress: Callable[[int, int], None] | None = None) -> Llama:
    """Replace the model's linear layers by quantized ones (in place; returns the model).

    ``hessians`` (from :func:`collect_hessians`) makes int4 GPTQ; without, round to nearest. The
    lm_head of the int4 scheme is int8 per channel (stored pack-quantized, 8 bits); of the others,
    the scheme's own. A quantized head no longer shares the embedding's weight."""
    names = layer_names(model)
    total = len(names) + (head == "quantize")
    for i, name in enumerate(names):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, attr)
        h = _hessian_of(name, hessians) if hessians is not None and scheme == "int4" else None
        setattr(parent, attr, quantize_layer(lin.weight.detach().float(), scheme, group, symmetric, h))
        if progress:
            progress(i + 1, total)
    if head == "quantize":
        w = model.lm_head.weight.detach().float()
        layer = quantize_layer(w, "int8" if scheme == "int4" else scheme, group, True)
        if scheme == "int4":
            layer.ct_format = "pack-quantized"  # one storage format for the whole checkpoint
        model.lm_head = layer
        if model.config.tie_word_embeddings:
            model.config = dataclasses.replace(model.config, tie_word_embeddings=False)
        if progress:
            progress(total, total)
    return model
