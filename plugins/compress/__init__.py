"""compress: making models smaller and faster — the ``prune`` and ``quantize`` jobs, their quality
gate, and the loader for quantized (compressed-tensors) checkpoints.

Every job measures the model before and after on the same held-out tokens (perplexity, agreement,
bytes, parameters, decode speed, peak memory) and fails, marking its output rejected, when the
perplexity rose more than ``max_ppl_increase`` allows. Quantized layers run the fastest kernel
that is correct on the machine at hand, chosen by measuring (see ``qlinear.py``).

This module stays light (no torch): the kernel imports it to validate parameters at submit.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import llmos
from llmos import JobKind, Resources, param

LLMOS_API = ">=1,<2"

SCHEMES = ("int8", "int4", "w8a8")
PRUNE_METHODS = ("magnitude", "wanda", "2:4", "structured")
DEFAULT_MAX_PPL_INCREASE = {"quantize": 0.05, "prune": 0.15}


_MODEL_HELP = "The model: a checkpoint directory, or job:ID (that job's newest checkpoint)."
_DATA_HELP = "Held-out text for the gate (a corpus as for train, or 'stdlib'); default: the model's own validation split (llmos.json)."
_CALIB_HELP = "Calibration text (a corpus as for train, or 'stdlib'); default: the model's training corpus (llmos.json), else 'stdlib'."


@dataclass(frozen=True)
class QuantizeParams:
    model: str = param(help=_MODEL_HELP, path=True)
    scheme: Literal["int8", "int4", "w8a8"] = param(
        "int8", help="int8: weight-only, per output channel. int4: weight-only, groups along the input (group_size). w8a8: int8 weights and int8 activations per token at run time."
    )
    group_size: int = param(128, choices=(32, 64, 128), help="int4: weights per scale along the input dimension.")
    symmetric: bool = param(True, help="int4: symmetric groups (no zero points); false adds a zero point per group.")
    method: Literal["rtn", "gptq"] = param("rtn", help="rtn: round to nearest. gptq: error-compensating rounding from calibration activations (int4).")
    head: Literal["quantize", "keep"] = param("quantize", help="quantize: the lm_head too (int8, also for int4: a 32k vocabulary is a fifth of a 125M model). keep: leave it in float.")
    calib_data: str | None = param(None, help=_CALIB_HELP, path=("stdlib",))
    calib_tokens: int = param(16384, ge=256, le=10_000_000, help="gptq: calibration tokens.")
    data: str | None = param(None, help=_DATA_HELP, path=("stdlib",))
    output: str | None = param(None, help="Where to write the quantized checkpoint (default: the job's directory).", path=True)
    max_ppl_increase: float | None = param(None, ge=0, help="Fail (and mark the output rejected) when perplexity rises by more than this fraction (default 0.05).")
    allow_rejected: bool = param(False, help="Accept an input model that a quality gate rejected.")
    seq_len: int = param(128, ge=8, le=65536, help="Tokens per held-out window.")
    eval_windows: int = param(64, ge=1, le=100_000, help="Held-out windows the gate measures on.")
    batch_size: int = param(8, ge=1, le=4096, help="Windows per forward pass while measuring.")
    speed_tokens: int = param(32, ge=1, le=4096, help="Tokens decoded to time decode speed (batch 1 and 8).")
    threads: int = param(0, ge=0, le=1024, help="Torch CPU threads (0: the job's reserved cpus).")


@dataclass(frozen=True)
class PruneParams:
    model: str = param(help=_MODEL_HELP, path=True)
    method: Literal["magnitude", "wanda", "2:4", "structured"] = param(
        "wanda",
        help="magnitude: smallest |W| (scope layer|global). wanda: |W| x input activation norm, per output row (Sun et al. 2023). "
        "2:4: two of every four weights along the input (scores: magnitude|wanda). structured: whole key/value groups and MLP channels "
        "by activation importance, the same number per layer: a smaller dense Llama. Structured pruning of a small model without healing "
        "(heal_steps) loses most of its quality.",
    )
    sparsity: float | None = param(None, ge=0, lt=1, help="The share of weights to remove (structured: of the parameters outside the embedding, an untied output head included but kept); 2:4 is 0.5.")
    scope: Literal["layer", "global"] = param("layer", help="magnitude: one threshold per matrix, or one over all of them.")
    scores: Literal["magnitude", "wanda"] = param("wanda", help="2:4: which scores choose the two kept weights of four.")
    heads: float | None = param(None, ge=0, lt=1, help="structured: the share of key/value groups (with their query heads) to remove, instead of sparsity.")
    mlp: float | None = param(None, ge=0, lt=1, help="structured: the share of MLP channels to remove, instead of sparsity.")
    align: int = param(1, ge=1, le=1024, help="structured with sparsity: keep a multiple of this many MLP channels (32: int4 groups of 32 and the SIMD kernels' blocks divide the pruned width).")
    calib_data: str | None = param(None, help=_CALIB_HELP, path=("stdlib",))
    calib_tokens: int = param(8192, ge=256, le=10_000_000, help="wanda and structured: calibration tokens.")
    heal_steps: int = param(0, ge=0, le=10_000_000, help="Fine-tune this many steps after pruning (the train job's optimizer, schedule and checkpoints). Structured pruning needs it.")
    heal_data: str | None = param(None, help="Text to heal on (default: the calibration text).", path=("stdlib",))
    heal_lr: float = param(3e-4, gt=0, le=1, help="Healing's peak learning rate.")
    heal_batch_size: int = param(8, ge=1, le=4096, help="Healing's sequences per step.")
    distill: bool = param(False, help="Heal by distilling from the unpruned model (KL to its logits, as Minitron does) instead of on the text alone.")
    data: str | None = param(None, help=_DATA_HELP, path=("stdlib",))
    output: str | None = param(None, help="Where to write the pruned checkpoint (default: the job's directory).", path=True)
    max_ppl_increase: float | None = param(None, ge=0, help="Fail (and mark the output rejected) when perplexity rises by more than this fraction (default 0.15).")
    allow_rejected: bool = param(False, help="Accept an input model that a quality gate rejected.")
    seq_len: int = param(128, ge=8, le=65536, help="Tokens per held-out window (and per calibration and healing sequence).")
    eval_windows: int = param(64, ge=1, le=100_000, help="Held-out windows the gate measures on.")
    batch_size: int = param(8, ge=1, le=4096, help="Windows per forward pass while measuring.")
    speed_tokens: int = param(32, ge=1, le=4096, help="Tokens decoded to time decode speed (batch 1 and 8).")
    threads: int = param(0, ge=0, le=1024, help="Torch CPU threads (0: the job's reserved cpus).")


@dataclass(frozen=True)
class CompareParams:
    models: list[str] = param(help="Checkpoints (directories or job:ID) to measure side by side; agreement is with the first.")
    data: str | None = param(None, help="Held-out text (default: the first model's own validation split).", path=("stdlib",))
    seq_len: int = param(128, ge=8, le=65536, help="Tokens per held-out window.")
    eval_windows: int = param(64, ge=1, le=100_000, help="Held-out windows.")
    batch_size: int = param(8, ge=1, le=4096, help="Windows per forward pass.")
    speed_tokens: int = param(32, ge=1, le=4096, help="Tokens decoded to time decode speed (batch 1 and 8).")
    prefill: bool = param(False, help="Also time prefill (one 128-token prompt).")
    threads: int = param(0, ge=0, le=1024, help="Torch CPU threads (0: the job's reserved cpus).")


@dataclass(frozen=True)
class KernelsParams:
    model: str | None = param(None, help="Settle (and show) the kernels of this quantized checkpoint; without it, show the choices made on this machine so far.", path=True)
    threads: int = param(0, ge=0, le=1024, help="Torch CPU threads (0: the job's reserved cpus): choices depend on it.")


# -- checks at submit (no torch) ------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_ref(model: str) -> bool:
    return re.match(r"^job:\d+$", model) is not None


def _model_config(model: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(config.json, llmos.json) of a checkpoint; (None, {}) for a job:ID (read in the worker)."""
    if _is_ref(model):
        return None, {}
    if model.startswith("job:"):
        raise ValueError(f"model {model!r}: a job's checkpoint is named job:ID with a job number")
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model {model} does not exist (give a checkpoint directory, or job:ID for a job's checkpoint)")
    config = read_json(path / "config.json")
    if config is None:
        raise ValueError(f"model {model} is not a checkpoint directory: it has no readable config.json")
    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"model {model} is a {config.get('model_type')!r} model; compression handles Llama-family checkpoints")
    return config, read_json(path / "llmos.json") or {}


def rejection(manifest: dict[str, Any]) -> str | None:
    """Why a quality gate rejected this checkpoint (its llmos.json), or None."""
    rejected = manifest.get("rejected")
    if not rejected:
        return None
    return rejected.get("reason", "rejected") if isinstance(rejected, dict) else str(rejected)


def check_not_rejected(model: str, manifest: dict[str, Any], allow: bool) -> None:
    why = rejection(manifest)
    if why and not allow:
        raise ValueError(f"model {model} was rejected by its quality gate ({why}); pass allow_rejected=true to use it anyway")


def _widths(config: dict[str, Any]) -> dict[str, int]:
    """The input width of each kind of linear layer."""
    h, heads = int(config.get("hidden_size", 0)), int(config.get("num_attention_heads", 1))
    d = int(config.get("head_dim") or (h // heads if heads else 0))
    return {"q/k/v/gate/up/lm_head": h, "o_proj": heads * d, "down_proj": int(config.get("intermediate_size", 0))}


def _has_text(value: str) -> bool:
    path = Path(value).expanduser()
    if path.is_file():
        return path.stat().st_size > 0
    return any(f.is_file() and f.stat().st_size > 0 for f in path.rglob("*"))


def _check_sources(p: Any, manifest: dict[str, Any], calibrated: bool) -> None:
    """The texts exist; the gate has held-out text; calibration has text to read."""
    for name in ("data", "calib_data", "heal_data"):
        value = getattr(p, name, None)
        if value is not None and value != "stdlib" and not Path(value).expanduser().exists():
            raise ValueError(f"{name} {value} does not exist (give a file, a directory, or 'stdlib')")
    if calibrated and p.calib_data not in (None, "stdlib") and not _has_text(p.calib_data):
        raise ValueError(f"calib_data {p.calib_data} holds no text: {p.method} needs calibration text (give another path, or calib_data=stdlib)")
    if p.data is None and not (manifest.get("data") or {}).get("source"):
        raise ValueError(f"{p.model} does not record the text it was trained on (llmos.json): give data=PATH, held-out text for the gate")


def check_quantize(p: QuantizeParams) -> None:
    config, manifest = _model_config(p.model)
    if config is None:
        return
    if config.get("quantization_config"):
        qc = config["quantization_config"]
        raise ValueError(f"model {p.model} is already quantized ({qc.get('quant_method', '?')}, {qc.get('format', '?')}); quantize its unquantized original")
    check_not_rejected(p.model, manifest, p.allow_rejected)
    if p.method == "gptq" and p.scheme != "int4":
        raise ValueError(f"method=gptq is for scheme=int4; {p.scheme} rounds to nearest (method=rtn)")
    if p.scheme == "int4":
        for what, k in _widths(config).items():
            if k % p.group_size:
                raise ValueError(f"group_size {p.group_size} does not divide the input width {k} of {what}; choose a group size that divides it (32, 64 or 128)")
    _check_sources(p, manifest, p.method == "gptq")


def check_prune(p: PruneParams) -> None:
    config, manifest = _model_config(p.model)
    if p.method in ("magnitude", "wanda") and p.sparsity is None:
        raise ValueError(f"method={p.method} needs sparsity (a share in [0, 1), e.g. 0.5)")
    if p.method == "2:4" and p.sparsity not in (None, 0.5):
        raise ValueError(f"method=2:4 removes exactly half the weights (sparsity 0.5), got sparsity {p.sparsity}")
    if p.method == "structured" and p.sparsity is None and p.heads is None and p.mlp is None:
        raise ValueError("method=structured needs sparsity (a share of the parameters outside the embedding) or heads and/or mlp (shares to remove)")
    if p.method != "structured" and (p.heads is not None or p.mlp is not None):
        raise ValueError(f"heads and mlp are for method=structured, not {p.method}")
    if p.distill and p.heal_steps == 0:
        raise ValueError("distill=true distills while healing: give heal_steps > 0")
    if config is None:
        return
    if config.get("quantization_config"):
        raise ValueError(f"model {p.model} is quantized; prune its unquantized original (then quantize the pruned model)")
    check_not_rejected(p.model, manifest, p.allow_rejected)
    if p.method == "2:4":
        for what, k in _widths(config).items():
            if k % 4:
                raise ValueError(f"2:4 needs input widths divisible by 4; {what} has {k}")
    if p.method == "structured":
        from llmos.plugins.compress.plan import check_structured
        from llmos.plugins.lm.config import LlamaConfig

        check_structured(LlamaConfig.from_hf_dict(config), p.sparsity, p.heads, p.mlp, p.align)
    _check_sources(p, manifest, p.method in ("wanda", "structured") or (p.scores == "wanda" and p.method == "2:4"))


def check_compare(p: CompareParams) -> None:
    if not p.models:
        raise ValueError("models: give at least one checkpoint")
    first = None
    for m in p.models:
        config, manifest = _model_config(m)
        if first is None:
            first = (config, manifest)
    if p.data is not None and p.data != "stdlib" and not Path(p.data).expanduser().exists():
        raise ValueError(f"data {p.data} does not exist (give a file, a directory, or 'stdlib')")
    if p.data is None and first and first[0] is not None and not (first[1].get("data") or {}).get("source"):
        raise ValueError(f"{p.models[0]} does not record the text it was trained on (llmos.json): give data=PATH")


def check_kernels(p: KernelsParams) -> None:
    if p.model is not None:
        config, _ = _model_config(p.model)
        if config is not None and not config.get("quantization_config"):
            raise ValueError(f"model {p.model} is not quantized: there are no kernels to choose")


# -- hooks ---------------------------------------------------------------------------------


@llmos.hookimpl
def llmos_register_job_kinds(register) -> None:  # type: ignore[no-untyped-def]
    register(JobKind("quantize", runner="llmos.plugins.compress.jobs:QuantizeRunner", params=QuantizeParams, resources=Resources(cpus=1),
                     help="Quantize a checkpoint (int8, int4, w8a8), measure it before and after, and refuse it if it got worse than allowed.", check=check_quantize))
    register(JobKind("prune", runner="llmos.plugins.compress.jobs:PruneRunner", params=PruneParams, resources=Resources(cpus=1),
                     help="Prune a checkpoint (magnitude, wanda, 2:4, structured; optional healing), measure it before and after, and refuse it if it got worse than allowed.",
                     check=check_prune))
    register(JobKind("compare", runner="llmos.plugins.compress.jobs:CompareRunner", params=CompareParams, resources=Resources(cpus=1),
                     help="Measure checkpoints side by side on the same held-out tokens: perplexity, agreement, bytes, parameters, decode speed, peak memory.",
                     check=check_compare))
    register(JobKind("compress.kernels", runner="llmos.plugins.compress.jobs:KernelsRunner", params=KernelsParams, resources=Resources(cpus=1),
                     help="Which kernel each quantized layer shape runs on this machine, and why (timings of every correct candidate).", check=check_kernels))


@llmos.hookimpl(tryfirst=True)
def llmos_load_model(path: str, device: Any, dtype: Any) -> Any:
    """Quantized checkpoints (a compressed-tensors ``quantization_config`` in config.json)."""
    config = read_json(Path(path) / "config.json")
    if not config or not config.get("quantization_config"):
        return None
    from llmos.plugins.compress.ctformat import load_quantized

    model, _ = load_quantized(path, device=device or "cpu", dtype=dtype)
    return model


@llmos.hookimpl
def llmos_register_commands(register) -> None:  # type: ignore[no-untyped-def]
    from llmos.plugins.compress.cli import kernels_command, prune_command, quantize_command

    for command in (prune_command, quantize_command, kernels_command):
        register(command)
