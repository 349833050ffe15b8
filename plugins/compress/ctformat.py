"""Quantized checkpoints in the compressed-tensors layout, written and read.

A quantized checkpoint is an ordinary checkpoint directory whose ``config.json`` carries a
``quantization_config`` as llm-compressor writes it (``quant_method: "compressed-tensors"``,
config groups of targets and weight/activation arguments, ``ignore``, ``format``), and whose
safetensors hold each quantized layer as compressed-tensors names it: ``weight`` (int8) and
``weight_scale`` for ``int-quantized``; ``weight_packed`` (int32, 32 / bits values each),
``weight_shape``, ``weight_scale`` and, asymmetric, ``weight_zero_point`` (packed along the
output dimension) for ``pack-quantized``. ``transformers`` with the ``compressed-tensors``
package loads these; :func:`load_quantized` loads them and llm-compressor's for the same
schemes, and refuses (naming what) whatever it cannot run exactly.

The format says nothing about kernels: which one runs a layer is chosen on the machine at hand
(:mod:`~llmos.plugins.compress.qlinear`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from llmos.plugins.compress import native, quant
from llmos.plugins.compress.qlinear import Int4Linear, Int8Linear, QuantLinear
from llmos.plugins.lm.checkpoint import CheckpointError, read_config
from llmos.plugins.lm.model import Llama

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _weights_args(bits: int, strategy: str, group: int | None, symmetric: bool, observer: str) -> dict[str, Any]:
    return {
        "num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy, "group_size": group,
        "block_structure": None, "dynamic": False, "actorder": None, "observer": observer, "observer_kwargs": {},
    }


def quantization_config(scheme: str, group: int, symmetric: bool, head: str, method: str) -> dict[str, Any]:
    """The ``quantization_config`` of a model quantized here with ``scheme`` (int8 | int4 | w8a8);
    ``head`` "quantize" or "keep" (the lm_head)."""
    observer = "mse" if method == "rtn" and scheme == "int4" else "minmax"
    if scheme == "int4":
        body = {"weights": _weights_args(4, "group", group, symmetric, observer), "input_activations": None, "output_activations": None}
        head_group = {"weights": _weights_args(8, "channel", None, True, "minmax"), "input_activations": None, "output_activations": None}
        fmt = "pack-quantized"
    else:
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True, "group_size": None, "block_structure": None, "actorder": None, "observer": None, "observer_kwargs": {}} if scheme == "w8a8" else None
        body = {"weights": _weights_args(8, "channel", None, True, "minmax"), "input_activations": acts, "output_activations": None}
        head_group = body
        fmt = "int-quantized"
    groups = {"group_0": {"targets": ["re:.*layers\\.\\d+\\..*_proj$"], **body, "format": fmt}}
    if head == "quantize":
        groups["group_1"] = {"targets": ["lm_head"], **head_group, "format": fmt}
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": [] if head == "quantize" else ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _matches(target: str, name: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    # A class name (compressed-tensors' "Linear") targets every linear layer; else a module name.
    return target == "Linear" or name == target or name.endswith("." + target)


def layer_schemes(qc: dict[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    """Which config group's scheme applies to each linear layer name (absent: not quantized)."""
    ignore = qc.get("ignore") or []
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        if any(_matches(t, name) for t in ignore):
            continue
        for gname, group in (qc.get("config_groups") or {}).items():
            if not isinstance(group, dict):
                continue
            if any(_matches(t, name) for t in group.get("targets") or []):
                out[name] = {**group, "_group": gname}
                break
    return out


def _unsupported(where: str, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: {why}; llmos runs int8 per-channel weights (optionally with dynamic per-token int8 activations) and int4 group or channel weights")


def _build_layer(name: str, scheme: dict[str, Any], tensors: dict[str, torch.Tensor], fmt: str, where: str) -> QuantLinear:
    """One layer of the checkpoint as the llmos layer that runs it (or CheckpointError)."""
    w = scheme.get("weights") or {}
    bits, strategy = w.get("num_bits"), w.get("strategy")
    if w.get("type", "int") != "int":
        raise _unsupported(where, f"{name} has {w.get('type')} weights")
    acts = scheme.get("input_activations")
    act_int8 = False
    if acts:
        if not (acts.get("num_bits") == 8 and acts.get("type", "int") == "int" and acts.get("dynamic") in (True, "true") and acts.get("strategy") == "token" and acts.get("symmetric", True)):
            raise _unsupported(where, f"{name} quantizes its activations as {acts}")
        act_int8 = True
    if "weight_g_idx" in tensors:
        raise _unsupported(where, f"{name} uses activation ordering (weight_g_idx)")
    scale = tensors.get("weight_scale")
    if scale is None:
        raise CheckpointError(f"{where}: {name} has no weight_scale")
    fmt = scheme.get("format") or fmt
    if "weight_packed" in tensors:
        shape = tensors.get("weight_shape")
        if shape is None:
            raise CheckpointError(f"{where}: {name} has weight_packed but no weight_shape")
        n, k = (int(v) for v in shape.tolist())
        q = quant.unpack_int32(tensors["weight_packed"].to(torch.int32), bits, k)
    elif "weight" in tensors and tensors["weight"].dtype == torch.int8:
        q = tensors["weight"].clone()  # own, aligned memory: the file's tensors may sit at any offset, and SIMD kernels (torch's too) assume alignment
        n, k = q.shape
    else:
        raise CheckpointError(f"{where}: {name} holds neither weight_packed nor an int8 weight (format {fmt})")
    zero = tensors.get("weight_zero_point")
    symmetric = w.get("symmetric", True)
    if bits == 8:
        if strategy != "channel":
            raise _unsupported(where, f"{name}: 8-bit weights with strategy {strategy!r}")
        if not symmetric or (zero is not None and bool((zero != 0).any())):
            raise _unsupported(where, f"{name}: asymmetric 8-bit weights")
        layer = Int8Linear(q, scale.float().reshape(n), act_int8=act_int8)
        layer.ct_format = "pack-quantized" if "weight_packed" in tensors else "int-quantized"
        return layer
    if bits == 4 and not act_int8:
        if strategy == "group":
            group = int(w.get("group_size") or 0)
        elif strategy == "channel":
            group = k
        else:
            raise _unsupported(where, f"{name}: 4-bit weights with strategy {strategy!r}")
        if group <= 0 or k % group or group % 32:
            raise _unsupported(where, f"{name}: group size {group} for width {k} (llmos needs a multiple of 32 that divides it)")
        scale = scale.float().reshape(n, k // group)
        if not symmetric:
            if zero is None:
                raise CheckpointError(f"{where}: {name} is asymmetric but has no weight_zero_point")
            zero = quant.unpack_int32(zero.to(torch.int32), 4, n, dim=0) if zero.dtype == torch.int32 and zero.shape[0] != n else zero.to(torch.int8).reshape(n, k // group)
        else:
            zero = None
        return Int4Linear(native.pack_int4(q), scale, zero, group, k)
    raise _unsupported(where, f"{name}: {bits}-bit weights{' with int8 activations' if act_int8 else ''}")


def load_quantized(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> tuple[Llama, dict[str, Any]]:
    """The model of a compressed-tensors checkpoint, its quantized layers as llmos's, and its
    llmos.json. CheckpointError for what it cannot load exactly (other schemes, missing tensors)."""
    directory = Path(directory)
    config = read_config(directory)
    raw = json.loads((directory / "config.json").read_text())
    qc = raw.get("quantization_config") or {}
    where = str(directory / "config.json")
    if qc.get("quant_method") != "compressed-tensors":
        raise CheckpointError(f"{where}: quantization method {qc.get('quant_method')!r} is not supported (compressed-tensors only)")
    if qc.get("quantization_status") not in (None, "compressed", "frozen"):
        raise CheckpointError(f"{where}: quantization_status {qc.get('quantization_status')!r}: only compressed checkpoints load")
    files = [directory / "model.safetensors"] if (directory / "model.safetensors").is_file() else sorted(directory.glob("model-*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} has no model.safetensors")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    state[key] = fh.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{f} cannot be read: {exc}") from None
    names = [f"model.layers.{i}.{lin}" for i in range(config.num_hidden_layers) for lin in LINEARS] + ["lm_head"]
    schemes = layer_schemes(qc, names)
    if not schemes:
        raise CheckpointError(f"{where}: its quantization_config quantizes none of the model's linear layers")
    with torch.device("meta"):
        model = Llama(config)
    for name, scheme in schemes.items():
        prefix = name + "."
        tensors = {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        layer = _build_layer(name, scheme, tensors, qc.get("format", ""), where)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        expected = getattr(parent, attr)
        if (layer.out_features, layer.in_features) != (expected.out_features, expected.in_features):
            raise CheckpointError(f"{where}: {name} is {layer.out_features}x{layer.in_features}, config.json implies {expected.out_features}x{expected.in_features}")
        setattr(parent, attr, layer)
    # The rest are float tensors, as in any checkpoint (tied: lm_head shares the embedding).
    tied = config.tie_word_embeddings and "lm_head" not in schemes
    expected = {k: p.shape for k, p in model.named_parameters()}
    if tied:
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        parts = [f"missing {len(missing)} tensors (first: {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected tensors (first: {unexpected[0]})"] if unexpected else []
        raise CheckpointError(f"{directory}: " + "; ".join(parts))
    float_dtype = dtype or torch.float32
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise CheckpointError(f"{directory}: {k} is {tuple(state[k].shape)}, config.json implies {tuple(shape)}")
        mod_name, _, pname = k.rpartition(".")
        setattr(model.get_submodule(mod_name), pname, nn.Parameter(state[k].to(float_dtype), requires_grad=False))
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(device=device)
    manifest_path = directory / "llmos.json"
    try:
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    except ValueError:
        manifest = {}
    return model.eval(), manifest
