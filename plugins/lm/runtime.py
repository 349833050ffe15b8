"""What the lm plugin's jobs share in their workers: the device, threads, the token cache, and
loading a model and the tokenizer beside it (imports torch)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

import llmos
from llmos.plugins.lm.checkpoint import file_sha256
from llmos.plugins.lm.model import Llama
from llmos.plugins.lm.text import Tok, load_tokenizer


def cache_dir() -> Path:
    state = os.environ.get("LLMOS_STATE_DIR")
    return (Path(state) if state else Path.home() / ".cache" / "llmos") / "cache" / "tokens"


def pick_device(ctx: llmos.JobContext, rank: int = 0) -> torch.device:
    """The job's GPU for ``rank`` (the first of those the kernel's rank plan gave it), else the CPU."""
    if not (ctx.gpus and torch.cuda.is_available()):
        return torch.device("cpu")
    plan = ctx.distributed
    if plan and plan["ranks"][rank]["gpus"]:
        # The job's CUDA_VISIBLE_DEVICES lists its real GPUs in placement order: find this rank's.
        real = [int(i) for i in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if i.strip().isdigit()]
        index = plan["ranks"][rank]["gpus"][0]
        if index in real:
            return torch.device("cuda", real.index(index))
    return torch.device("cuda", rank)


def set_threads(ctx: llmos.JobContext, threads: int) -> None:
    n = threads or max(1, int(ctx.resources.get("cpus") or 1))
    torch.set_num_threads(n)


def _maybe_hash(path: str) -> str | None:
    f = Path(path) / "model.safetensors"
    return file_sha256(f) if f.exists() else None


def load_for_job(ctx: llmos.JobContext, path: str, device: torch.device) -> tuple[Llama, dict[str, Any]]:
    """The model at ``path`` through the plugins' ``llmos_load_model`` hook (this plugin's loads
    llmos and Hugging Face checkpoint directories; other plugins may add formats), with its
    llmos.json manifest when it has one. The tokenizer is the ``tokenizer.json`` beside it."""
    model = ctx.load_model(path, device=device)
    if not isinstance(model, Llama):
        raise ValueError(f"{path}: the plugin that loaded it gave a {type(model).__name__}, not a Llama-family model these jobs can run")
    manifest_file = Path(path) / "llmos.json"
    try:
        manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    except ValueError:
        manifest = {}
    return model, manifest if isinstance(manifest, dict) else {}


def tokenizer_beside(path: str) -> Tok:
    where = Path(path)
    return load_tokenizer(where if where.is_dir() else where.parent)


__all__ = ["cache_dir", "load_for_job", "pick_device", "set_threads", "tokenizer_beside"]
