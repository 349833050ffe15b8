"""The ``prune``, ``quantize``, ``compare`` and ``compress.kernels`` runners.

A compression job: resolve the model, check it again (a ``job:ID`` is only read here), cut the
held-out tokens, measure the original in a probe process, compress, write the checkpoint,
measure it in another probe, and judge: the report goes into the result and the output's
llmos.json; a perplexity rise past ``max_ppl_increase`` marks the output rejected and fails the job.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import llmos
from llmos.plugins import compress
from llmos.plugins.compress import gate
from llmos.plugins.lm.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from llmos.plugins.lm.model import Llama
from llmos.plugins.lm.text import Tok, corpus_files, load_tokenizer, tokenize_corpus
from llmos.plugins.lm.train import batch_at, cache_dir, lr_at, set_threads


class GateFailed(RuntimeError):
    """The compressed model got worse than the job allows."""


def resolve(model: str) -> str:
    """A checkpoint path for ``model``: ``job:ID`` asks the kernel for that job's newest checkpoint."""
    if not model.startswith("job:"):
        return model
    with llmos.connect() as client:
        return client.resolve_model(model)


def _manifest(path: str | Path) -> dict[str, Any]:
    return compress.read_json(Path(path) / "llmos.json") or {}


def corpus_tokens(source: str, tok: Tok, record: dict[str, Any] | None, split: str) -> np.ndarray:
    """Tokens of a corpus split. The model's own corpus (``record``, its llmos.json ``data``) is
    read as its training read it, so its validation split is the one it never trained on."""
    own = record or {}
    files = corpus_files(source, own.get("glob") or "**/*.txt")
    train, val, _ = tokenize_corpus(files, tok, cache_dir(), text_field=own.get("text_field") or "text",
                                    max_bytes=int(own.get("max_bytes", 10_000_000)), val_fraction=float(own.get("val_fraction", 0.05)))
    out = np.asarray(val if split == "validation" else train)
    if split != "validation" and len(out) < 1024:  # a tiny corpus: calibrate on all of it
        out = np.concatenate([out, np.asarray(val)])
    return out


def windows_of(tokens: np.ndarray, seq_len: int, count_tokens: int, batch: int = 8) -> list[torch.Tensor]:
    """Calibration batches: about ``count_tokens`` tokens in windows of ``seq_len``, evenly spread."""
    n = max(1, count_tokens // seq_len)
    starts = gate.windows(len(tokens), seq_len, n)
    rows = [np.asarray(tokens[s : s + seq_len], dtype=np.int64) for s in starts]
    return [torch.from_numpy(np.stack(rows[i : i + batch])) for i in range(0, len(rows), batch)]


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    tmp = directory / f"llmos.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, directory / "llmos.json")


def judge(before: dict[str, Any], after: dict[str, Any], limit: float) -> dict[str, Any]:
    increase = after["ppl"] / before["ppl"] - 1.0
    return {"before": before, "after": after, "ppl_increase": increase, "max_ppl_increase": limit, "accepted": bool(increase <= limit)}


def _figures(result: dict[str, Any]) -> dict[str, Any]:
    tps = result.get("tokens_per_s", {})
    out = {k: result[k] for k in ("ppl", "bytes", "params", "nonzero", "peak_memory", "agreement") if k in result}
    out["tokens_per_s"] = {"batch_1": tps.get("1"), "batch_8": tps.get("8")}
    if "prefill_tokens_per_s" in result:
        out["prefill_tokens_per_s"] = result["prefill_tokens_per_s"]
    return out


class _CompressRunner(llmos.Runner):
    """What prune and quantize share: the gate around ``compress``."""

    kind = ""

    def compress(self, ctx: llmos.JobContext, source: str, tok: Tok, manifest: dict[str, Any], out: Path, calib: np.ndarray | None) -> dict[str, Any]:
        """Write the compressed checkpoint to ``out``; return what llmos.json records of the method."""
        raise NotImplementedError

    def needs_calibration(self, p: Any) -> bool:
        return False

    def check(self, p: Any) -> None:
        raise NotImplementedError

    def run(self, ctx: llmos.JobContext) -> dict[str, Any]:
        p = ctx.params
        set_threads(ctx, p.threads)
        threads = torch.get_num_threads()
        source = str(Path(resolve(p.model)).absolute())
        self.check(dataclasses.replace(p, model=source))  # a job:ID is first seen here
        manifest = _manifest(source)
        tok = load_tokenizer(source)
        record = manifest.get("data") or {}
        if p.data is not None:
            held = corpus_tokens(p.data, tok, None, "validation")
        else:
            held = corpus_tokens(record["source"], tok, record, "validation")
        calib = None
        if self.needs_calibration(p):
            calib_source = p.calib_data or (record.get("source") if record.get("source") and (record["source"] == "stdlib" or Path(record["source"]).exists()) else "stdlib")
            calib = corpus_tokens(calib_source, tok, record if calib_source == record.get("source") else None, "train")
            ctx.log.info("calibration", source=calib_source, tokens=len(calib))
        work = ctx.workdir
        tokens_file = work / "heldout.npy"
        np.save(tokens_file, np.asarray(held, dtype=np.int64), allow_pickle=False)
        probe = dict(seq_len=p.seq_len, windows_count=p.eval_windows, batch_size=p.batch_size, speed_tokens=p.speed_tokens, threads=threads)
        ctx.progress(0, 3, message="measuring the original")
        before = gate.run_probe(source, tokens_file, work, "before", reference=None, **probe)
        ctx.log.info("measured", model="original", ppl=round(before["ppl"], 4), bytes=before["bytes"])
        out = Path(p.output).expanduser() if p.output else work / "checkpoint"
        ctx.progress(1, 3, message=f"{self.kind} running")
        started = time.perf_counter()
        method = self.compress(ctx, source, tok, manifest, out, calib)
        method["seconds"] = round(time.perf_counter() - started, 2)
        ctx.progress(2, 3, message="measuring the result")
        after = gate.run_probe(out, tokens_file, work, "after", reference=work / "before-predictions.npy", **probe)
        limit = p.max_ppl_increase if p.max_ppl_increase is not None else compress.DEFAULT_MAX_PPL_INCREASE[self.kind]
        report = judge(_figures(before), _figures(after), limit)
        report[self.kind] = method
        ctx.log.info("measured", model=self.kind + "d", ppl=round(after["ppl"], 4), bytes=after["bytes"], agreement=round(after["agreement"] or 0, 4), accepted=report["accepted"])
        written = _manifest(out)
        written["report"] = report
        if not report["accepted"]:
            reason = f"perplexity rose {report['ppl_increase']:.1%} ({before['ppl']:.4g} -> {after['ppl']:.4g}), above max_ppl_increase {limit:.1%}"
            written["rejected"] = {"reason": reason, "at": time.time()}
        _write_manifest(out, written)
        ctx.artifact(out, kind="checkpoint", accepted=report["accepted"])
        ctx.progress(3, 3, message="done")
        if not report["accepted"]:
            ctx.log.warning("gate_failed", report=report)
            raise GateFailed(f"{written['rejected']['reason']}; the output {out} is marked rejected (use it with allow_rejected=true). "
                             f"agreement {after['agreement']:.3f}, bytes {before['bytes']} -> {after['bytes']}")
        return {"checkpoint": str(out), "report": report}

    @staticmethod
    def output_manifest(ctx: llmos.JobContext, source: str, manifest: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        """The output's llmos.json: what the source's says of its data, where it came from, the method."""
        keep = {k: manifest[k] for k in ("data", "tokenizer") if k in manifest}
        return {
            **keep,
            "produced_by": {"job_id": ctx.job_id, "kind": ctx.kind, "attempt": ctx.attempt},
            "parent": {"path": source, "model_sha256": manifest.get("model_sha256") or _maybe_sha(source)},
            **extra,
        }


def _maybe_sha(source: str) -> str | None:
    f = Path(source) / "model.safetensors"
    return file_sha256(f) if f.is_file() else None


def _tokenizer_json(source: str) -> str | None:
    f = Path(source) / "tokenizer.json"
    return f.read_text() if f.is_file() else None


def _load_float(source: str) -> Llama:
    model, _ = load_checkpoint(source, dtype=torch.float32)
    return model.eval()


class QuantizeRunner(_CompressRunner):
    kind = "quantize"

    def check(self, p: Any) -> None:
        compress.check_quantize(p)

    def needs_calibration(self, p: Any) -> bool:
        return p.method == "gptq"

    def compress(self, ctx: llmos.JobContext, source: str, tok: Tok, manifest: dict[str, Any], out: Path, calib: np.ndarray | None) -> dict[str, Any]:
        from llmos.plugins.compress.ctformat import quantization_config
        from llmos.plugins.compress.quantize import collect_hessians, quantize_model

        p = ctx.params
        model = _load_float(source)
        hessians = None
        if p.method == "gptq":
            assert calib is not None
            ctx.progress(1, 3, message="calibrating (GPTQ Hessians)")
            hessians = collect_hessians(model, windows_of(calib, p.seq_len, p.calib_tokens))

        def progress(done: int, total: int) -> None:
            ctx.progress(1 + done / (total + 1), 3, message=f"quantizing layer {done}/{total}")

        quantize_model(model, p.scheme, group=p.group_size, symmetric=p.symmetric, head=p.head, hessians=hessians, progress=progress)
        qc = quantization_config(p.scheme, p.group_size, p.symmetric, p.head, p.method)
        method = {"scheme": p.scheme, "method": p.method, "head": p.head, "format": qc["format"]}
        if p.scheme == "int4":
            method.update(group_size=p.group_size, symmetric=p.symmetric, packing="int4 in int32 words (8 a word, compressed-tensors pack-quantized); lm_head int8 (4 a word)" if p.head == "quantize" else "int4 in int32 words (8 a word)")
        else:
            method["packing"] = "int8 weights as they are (compressed-tensors int-quantized)" + (", activations int8 per token at run time" if p.scheme == "w8a8" else "")
        params, _ = gate.count_params(model)
        save_checkpoint(out, model, _tokenizer_json(source), self.output_manifest(ctx, source, manifest, {"quantization": method, "parameters": params}),
                        config_extra={"quantization_config": qc}, tokenizer_from=source)
        return method


class PruneRunner(_CompressRunner):
    kind = "prune"

    def check(self, p: Any) -> None:
        compress.check_prune(p)

    def needs_calibration(self, p: Any) -> bool:
        return p.method in ("wanda", "structured") or (p.method == "2:4" and p.scores == "wanda") or p.heal_steps > 0

    def compress(self, ctx: llmos.JobContext, source: str, tok: Tok, manifest: dict[str, Any], out: Path, calib: np.ndarray | None) -> dict[str, Any]:
        from llmos.plugins.compress import prune

        p = ctx.params
        model = _load_float(source)
        teacher = _load_float(source) if p.distill else None
        stats = None
        if p.method in ("wanda", "structured") or (p.method == "2:4" and p.scores == "wanda"):
            assert calib is not None
            ctx.progress(1, 3, message="calibrating (activation norms)")
            stats = prune.calibrate(model, windows_of(calib, p.seq_len, p.calib_tokens))
        if p.method == "magnitude":
            prune.magnitude(model, p.sparsity, scope=p.scope)
        elif p.method == "wanda":
            prune.wanda(model, p.sparsity, stats)
        elif p.method == "2:4":
            prune.two_four(model, stats)
        else:
            model = prune.structured(model, stats, sparsity=p.sparsity, heads=p.heads, mlp=p.mlp, align=p.align)
        pattern = prune.sparsity_pattern(p.method, 0.5 if p.method == "2:4" else (p.sparsity or 0.0), p.scope if p.method == "magnitude" else None)
        if p.method == "structured":
            pattern.update(heads=p.heads, mlp=p.mlp, config={k: getattr(model.config, k) for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")})
        healed = None
        if p.heal_steps:
            assert calib is not None
            heal_tokens = calib if p.heal_data is None else corpus_tokens(p.heal_data, tok, None, "train")
            healed = heal(ctx, model, teacher, heal_tokens, p, keep_zeros=p.method != "structured")
        stats_after = prune.sparsity_stats(model)
        method = {"method": p.method, "sparsity": pattern, "achieved": stats_after, "healed": healed, "storage": "dense"}
        save_checkpoint(out, model, _tokenizer_json(source), self.output_manifest(ctx, source, manifest, {"pruning": method, "sparsity": pattern}), tokenizer_from=source)
        return method


def heal(ctx: llmos.JobContext, model: Llama, teacher: Llama | None, tokens: np.ndarray, p: Any, keep_zeros: bool) -> dict[str, Any]:
    """Fine-tune a pruned model as the ``train`` job does (AdamW, warmup and cosine decay, clipping,
    progress), pruned weights held at zero; with a teacher, on KL to its logits (distillation)."""
    sched = SimpleNamespace(lr=p.heal_lr, warmup_steps=min(10, p.heal_steps // 10), steps=p.heal_steps, min_lr_ratio=0.1)
    masks = {n: (w != 0) for n, w in model.named_parameters() if w.dim() == 2 and keep_zeros and "layers." in n}
    for w in model.parameters():
        w.requires_grad_(True)
    decay = [w for w in model.parameters() if w.dim() >= 2]
    no_decay = [w for w in model.parameters() if w.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=p.heal_lr, betas=(0.9, 0.95), eps=1e-8)
    params = dict(model.named_parameters())
    model.train()
    first = last = float("nan")
    seq = min(p.seq_len, len(tokens) - 2)
    for step in range(1, p.heal_steps + 1):
        if ctx.cancelled:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, sched)
        x, y = batch_at(tokens, step, 0, p.heal_batch_size, seq)
        logits = model(x).float()
        if teacher is not None:
            with torch.no_grad():
                target = F.log_softmax(teacher(x).float(), -1)
            loss = F.kl_div(F.log_softmax(logits, -1).view(-1, logits.shape[-1]), target.view(-1, logits.shape[-1]), log_target=True, reduction="batchmean")
        else:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, m in masks.items():
                params[n].mul_(m)
        last = loss.item()
        if not math.isfinite(last):
            raise FloatingPointError(f"healing's loss became {last} at step {step}")
        first = last if step == 1 else first
        if step % 10 == 0 or step == p.heal_steps:
            ctx.progress(1 + step / (p.heal_steps + 1), 3, message=f"healing step {step}/{p.heal_steps}", loss=round(last, 4))
    model.eval()
    for w in model.parameters():
        w.requires_grad_(False)
    return {"steps": p.heal_steps, "distill": teacher is not None, "first_loss": first, "last_loss": last, "lr": p.heal_lr}


class CompareRunner(llmos.Runner):
    """Measure several checkpoints on the same held-out tokens (agreement against the first)."""

    def run(self, ctx: llmos.JobContext) -> dict[str, Any]:
        p = ctx.params
        set_threads(ctx, p.threads)
        models = [str(Path(resolve(m)).absolute()) for m in p.models]
        first = _manifest(models[0])
        tok = load_tokenizer(models[0])
        record = first.get("data") or {}
        if p.data is None and not record.get("source"):
            raise ValueError(f"{models[0]} does not record the text it was trained on: give data=PATH")
        held = corpus_tokens(p.data, tok, None, "validation") if p.data else corpus_tokens(record["source"], tok, record, "validation")
        tokens_file = ctx.workdir / "heldout.npy"
        np.save(tokens_file, np.asarray(held, dtype=np.int64), allow_pickle=False)
        rows = []
        for i, m in enumerate(models):
            ctx.progress(i, len(models), message=f"measuring {Path(m).name}")
            ref = ctx.workdir / "m0-predictions.npy" if i else None
            r = gate.run_probe(m, tokens_file, ctx.workdir, f"m{i}", reference=ref, seq_len=p.seq_len, windows_count=p.eval_windows, batch_size=p.batch_size,
                               speed_tokens=p.speed_tokens, threads=torch.get_num_threads(), prefill=p.prefill)
            rows.append({"model": m, "rejected": bool(_manifest(m).get("rejected")), **_figures(r)})
        ctx.progress(len(models), len(models), message="done")
        # The best: the smallest of those no quality gate rejected (each passed its gate against its
        # parent); a pipeline serves it. Ties go to the faster.
        ok = [r for r in rows if not r["rejected"]] or rows
        best = min(ok, key=lambda r: (r.get("bytes") or 0, -(r["tokens_per_s"].get("batch_1") or 0.0)))
        return {"models": rows, "best": best["model"]}


class KernelsRunner(llmos.Runner):
    """The kernel choices on this machine: settle a checkpoint's, then report every choice."""

    def run(self, ctx: llmos.JobContext) -> dict[str, Any]:
        from llmos.plugins.compress import native, qlinear
        from llmos.plugins.compress.ctformat import load_quantized
        from llmos.plugins.lm.kernels import kernel_status

        p = ctx.params
        set_threads(ctx, p.threads)
        if p.model:
            model, _ = load_quantized(resolve(p.model))
            layers = [m for m in model.modules() if isinstance(m, qlinear.QuantLinear)]
            qlinear.prepare(layers)
        out = qlinear.choices()
        st = kernel_status()
        out["native"] = native.status()
        out["lm_kernels"] = {"path": st.path, "isa": st.isa, "reason": st.reason}
        out["threads"] = torch.get_num_threads()
        out["torch"] = torch.__version__
        return out
