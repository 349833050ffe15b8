"""The ``eval`` job: perplexity of a checkpoint and greedy samples; :func:`evaluate`, the fixed-window
loss that training's validation uses too (imported only in workers: it imports torch)."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

import llmos
from llmos.plugins.lm import EvalResult, EvalSample
from llmos.plugins.lm.model import Llama
from llmos.plugins.lm.runtime import (
    cache_dir,
    load_for_job,
    pick_device,
    set_threads,
    tokenizer_beside,
)
from llmos.plugins.lm.text import corpus_files, tokenize_corpus


@torch.no_grad()
def windows(n_tokens: int, seq_len: int, batches: int, batch_size: int) -> int:
    """How many windows :func:`evaluate` scores from a split of ``n_tokens``."""
    return min(batches * batch_size, max(0, n_tokens - seq_len - 1) + 1)


def evaluate(model: Llama, tokens: np.ndarray, seq_len: int, batches: int, batch_size: int, device: torch.device, amp: torch.dtype | None) -> float:
    """Mean loss over fixed windows of ``tokens`` (the same windows every time): ``windows(...)``
    of them, ``seq_len`` tokens scored in each."""
    model.eval()
    n = len(tokens) - seq_len - 1
    if n <= 0:
        raise ValueError(f"the validation split has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}")
    starts = np.linspace(0, n, num=windows(len(tokens), seq_len, batches, batch_size), dtype=np.int64)
    losses = []
    for i in range(0, len(starts), batch_size):
        chunk = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts[i : i + batch_size]])
        data = torch.from_numpy(chunk).to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            losses.append(model.loss(data[:, :-1], data[:, 1:]).item())
    model.train()
    return float(np.mean(losses))


class EvalRunner(llmos.Runner):
    """Perplexity of a checkpoint on a corpus (or on its own validation split), and greedy samples."""

    def run(self, ctx: llmos.JobContext) -> dict[str, Any]:
        p = ctx.params
        set_threads(ctx, p.threads)
        device = pick_device(ctx)
        model, manifest = load_for_job(ctx, p.model, device)
        tok = tokenizer_beside(p.model)
        data = manifest.get("data", {})
        source = p.data or data.get("source")
        if not source:
            raise ValueError(f"{p.model} does not say what it was trained on; give data=PATH or data=stdlib")
        # On the model's own corpus, read it as training did (the same validation split); on
        # another corpus, as this job's parameters say.
        own = p.data is None
        files = corpus_files(source, p.glob or (data.get("glob") if own else None) or "**/*.txt")
        train, val, _ = tokenize_corpus(
            files, tok, cache_dir(), text_field=p.text_field or (data.get("text_field") if own else None) or "text",
            max_bytes=int(data.get("max_bytes", p.max_bytes)) if own else p.max_bytes,
            val_fraction=float(data.get("val_fraction", 0.05)) if own else 0.05,
        )
        tokens = val if p.split == "validation" else np.concatenate([np.asarray(train), np.asarray(val)])
        ctx.progress(0, 1, message="evaluating")
        loss = evaluate(model, tokens, p.seq_len, p.batches, p.batch_size, device, None)
        samples = []
        for prompt in p.prompts:
            ids = torch.tensor([tok.encode(prompt) or [tok.eos_id or 0]], device=device)
            out = greedy(model, ids, p.max_new_tokens, tok.eos_id)
            samples.append(EvalSample(prompt=prompt, completion=tok.decode(out[0, ids.shape[1]:].tolist())))
        ctx.progress(1, 1, message="done")
        return asdict(EvalResult(model=str(p.model), split=p.split, loss=loss, perplexity=math.exp(min(loss, 50)), tokens=windows(len(tokens), p.seq_len, p.batches, p.batch_size) * p.seq_len, samples=samples,
                                 split_tokens=len(tokens)))


@torch.no_grad()
def greedy(model: Llama, ids: torch.Tensor, max_new_tokens: int, eos_id: int | None) -> torch.Tensor:
    """Greedy decoding without a cache (the inference engine does better; this is for eval samples)."""
    model.eval()
    limit = model.config.max_position_embeddings
    for _ in range(max_new_tokens):
        logits = model(ids[:, -limit:])
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if eos_id is not None and int(nxt) == eos_id:
            break
    return ids


__all__ = ["EvalRunner", "evaluate", "greedy"]
