"""The quality gate's measurements: one checkpoint, measured in a fresh process of its own.

Before and after a compression job, the same probe measures each model the way users run it:
loaded through the plugins' ``llmos_load_model`` hook (a quantized checkpoint runs its chosen
kernels), perplexity and top-1 predictions over the same held-out windows, decode tokens/s at
batch 1 and 8 through the ``lm`` engine, and the process's peak resident memory. A fresh process
per model keeps the peaks comparable (nothing of the other model is resident) and the job's own
memory at one model. The probe reads the held-out tokens from a ``.npy`` file and writes its
predictions to another, so the second probe can count agreement with the first.

``python -m llmos.plugins.compress.gate MODEL TOKENS_NPY OUT_JSON [options]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def windows(n_tokens: int, seq_len: int, count: int) -> np.ndarray:
    """Start offsets of ``count`` evenly spread windows of ``seq_len + 1`` tokens (as lm's evaluate picks them)."""
    n = n_tokens - seq_len - 1
    if n <= 0:
        raise ValueError(f"the held-out text has {n_tokens} tokens, fewer than one window of {seq_len + 1}")
    return np.linspace(0, n, num=min(count, n + 1), dtype=np.int64)


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of the weights on disk (the safetensors files)."""
    p = Path(path)
    return sum(f.stat().st_size for f in p.glob("*.safetensors") if not f.name.startswith("train_state"))


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a model, quantized layers counted as the weights they stand for."""
    from llmos.plugins.compress.qlinear import Int4Linear, Int8Linear

    total = nonzero = 0
    seen: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, Int8Linear):
            total += mod.qweight.numel()
            nonzero += int(torch.count_nonzero(mod.qweight))
            continue
        if isinstance(mod, Int4Linear):
            total += mod.out_features * mod.in_features
            nonzero += int(torch.count_nonzero(mod.dequantized()))
            continue
        for p in mod.parameters(recurse=False):
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            total += p.numel()
            nonzero += int(torch.count_nonzero(p))
    return total, nonzero


@torch.inference_mode()
def quality(model: Any, tokens: np.ndarray, seq_len: int, count: int, batch_size: int) -> tuple[float, np.ndarray]:
    """Mean cross-entropy over the windows, and the model's top-1 prediction at every position."""
    starts = windows(len(tokens), seq_len, count)
    losses, preds = [], []
    for i in range(0, len(starts), batch_size):
        chunk = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts[i : i + batch_size]])
        data = torch.from_numpy(chunk)
        logits = model(data[:, :-1]).float()
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1), reduction="sum").item())
        preds.append(logits.argmax(-1).numpy().astype(np.int32))
    return sum(losses) / (len(starts) * seq_len), np.concatenate(preds)


@torch.inference_mode()
def decode_speed(engine: Any, tokens: np.ndarray, batch: int, new_tokens: int, prompt_len: int = 16) -> float:
    """Decode tokens/s at ``batch`` sequences: greedy steps after a prefill, prefill not counted."""
    from llmos.plugins.lm.engine import Sampling

    prompts = [[int(t) for t in tokens[i * prompt_len : (i + 1) * prompt_len]] for i in range(batch)]
    cache = engine.new_cache(batch, prompt_len + new_tokens + 2)
    sampling = Sampling(max_new_tokens=new_tokens + 1, temperature=0.0, stop_tokens=())
    engine.eos = None  # measure steps, not where the model chooses to stop
    seqs = [engine.start(p, sampling, i) for i, p in enumerate(prompts)]
    for s in seqs:
        engine.prefill(s, cache)
    engine.decode(seqs, cache)  # the first step allocates its buffers
    start, steps = time.perf_counter(), 0
    while any(s.finish is None for s in seqs):
        engine.decode(seqs, cache)
        steps += 1
    elapsed = time.perf_counter() - start
    return batch * steps / elapsed if elapsed > 0 else 0.0


@torch.inference_mode()
def prefill_speed(engine: Any, tokens: np.ndarray, length: int = 128, repeats: int = 2) -> float:
    """Prompt tokens/s for one prompt of ``length`` tokens (best of ``repeats``)."""
    length = min(length, len(tokens), engine.context - 1)
    ids = torch.tensor([[int(t) for t in tokens[:length]]])
    cache = engine.new_cache(1, length + 1)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        engine.decoder(ids, [0], [0], cache)
        best = min(best, time.perf_counter() - start)
    return length / best


def probe(model_path: str, tokens_file: str, out: str, *, seq_len: int, windows_count: int, batch_size: int, reference: str | None, predictions: str | None,
          speed_tokens: int, threads: int, prefill: bool = False, batches: tuple[int, ...] = (1, 8), dtype: str = "float32") -> dict[str, Any]:
    """Measure one checkpoint (see the module docstring); writes and returns the figures."""
    from llmos.plugins.lm.engine import Engine
    from llmos.plugins.lm.text import load_tokenizer

    if threads:
        torch.set_num_threads(threads)
    tokens = np.load(tokens_file, allow_pickle=False)
    model = _load(model_path)
    params, nonzero = count_params(model)
    engine = None
    if dtype != "float32":  # the engine's weights (bfloat16 on a CPU: BF16Linear views) are what quality measures then
        engine = Engine(model, load_tokenizer(Path(model_path)), dtype=dtype)
    loss, preds = quality(model, tokens, seq_len, windows_count, batch_size)
    result: dict[str, Any] = {
        "ppl": math.exp(min(loss, 50.0)),
        "loss": loss,
        "bytes": checkpoint_bytes(model_path),
        "params": params,
        "nonzero": nonzero,
    }
    if predictions:
        np.save(predictions, preds, allow_pickle=False)
    if reference:
        ref = np.load(reference, allow_pickle=False)
        result["agreement"] = float((ref == preds).mean()) if ref.shape == preds.shape else None
    else:
        result["agreement"] = 1.0
    engine = engine or Engine(model, load_tokenizer(Path(model_path)), dtype=dtype)
    result["tokens_per_s"] = {str(b): decode_speed(engine, tokens, b, speed_tokens) for b in batches}
    if prefill:
        result["prefill_tokens_per_s"] = prefill_speed(engine, tokens)
    result["peak_memory"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out).write_text(json.dumps(result))
    return result


def _load(path: str) -> Any:
    """The model as a job loads it: this plugin's ``llmos_load_model`` (quantized checkpoints),
    then the lm plugin's (llmos and Hugging Face checkpoints), in the hook's order. The probe is a
    plain process, not a job: it calls the two hook implementations directly (plugins import
    llmos, never its kernel), so a third plugin's format is measured only inside its own jobs."""
    from llmos.plugins import compress, lm

    model = compress.llmos_load_model(path, None, None) or lm.llmos_load_model(path, None, None)
    if model is None:
        raise ValueError(f"{path} is not a checkpoint the compress gate can load (no config.json)")
    return model.eval()


def run_probe(model_path: str | Path, tokens_file: Path, workdir: Path, name: str, *, seq_len: int, windows_count: int, batch_size: int, reference: Path | None,
              speed_tokens: int, threads: int, prefill: bool = False, batches: tuple[int, ...] = (1, 8), dtype: str = "float32",
              timeout: float = 3600) -> dict[str, Any]:
    """:func:`probe` in a fresh Python process; RuntimeError with its last output when it fails."""
    out = workdir / f"{name}.json"
    preds = workdir / f"{name}-predictions.npy"
    argv = [sys.executable, "-m", "llmos.plugins.compress.gate", str(model_path), str(tokens_file), str(out), "--seq-len", str(seq_len),
            "--windows", str(windows_count), "--batch-size", str(batch_size), "--speed-tokens", str(speed_tokens), "--threads", str(threads),
            "--predictions", str(preds)]
    if reference is not None:
        argv += ["--reference", str(reference)]
    if prefill:
        argv.append("--prefill")
    argv += ["--batches", ",".join(map(str, batches)), "--dtype", dtype]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        raise RuntimeError(f"measuring {model_path} failed: " + " | ".join(tail))
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m llmos.plugins.compress.gate", description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("tokens")
    ap.add_argument("out")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reference")
    ap.add_argument("--predictions")
    ap.add_argument("--speed-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--prefill", action="store_true")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    a = ap.parse_args(argv)
    probe(a.model, a.tokens, a.out, seq_len=a.seq_len, windows_count=a.windows, batch_size=a.batch_size, reference=a.reference, predictions=a.predictions,
          speed_tokens=a.speed_tokens, threads=a.threads, prefill=a.prefill, batches=tuple(int(b) for b in a.batches.split(",")), dtype=a.dtype)


if __name__ == "__main__":
    main()
