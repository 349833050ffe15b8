"""Compression benchmarks: every format llmos makes of one trained model, side by side.

Run ``python benchmarks/compress.py`` (about 50 minutes on 2 cores) or ``--quick`` (fewer steps
and windows; about 12 minutes). In one run, on one set of weights:

1. A ``train`` job trains the ``small`` preset (12 layers, width 768, 12 heads with 4 key/value
   heads, MLP 2048, BPE vocabulary of 32,000 tokens learned from the standard library's source:
   about 125M parameters) for ``--steps`` steps (default 480 of 8 x 128 tokens, about half a
   million tokens; under bfloat16 autocast where the CPU has bfloat16 dot products, which trains
   twice as fast as float32 on 2 cores, else float32). Why that is enough: what quantization and
   pruning lose shows in perplexity only once the weights encode more than unigram frequencies
   (after 150 steps of 4 x 128, 50 % magnitude pruning moved perplexity by 0.2 %: the weights
   hardly mattered yet); the notes give the validation loss reached, far below the ~7 nats a
   unigram model of this corpus scores, on a model whose loss still falls.
2. The compression jobs, each submitted as a user would (``quantize``/``prune`` with default
   options but for the method's own): int8, int4 g128 rtn, int4 g128 gptq, w8a8, magnitude 50 %,
   wanda 50 %, 2:4 (wanda scores), structured 30 % without and with healing (distilled from the
   original). Their gates run with a loose ``max_ppl_increase`` so that every output exists to be
   measured; the table judges them against the issue's targets instead.
3. Every checkpoint (and the original under the bfloat16 engine) measured by the gate's own probe,
   each in a fresh process, on the same held-out windows: bytes, perplexity and its change,
   top-1 agreement with float32, decode tokens/s at batch 1 and 16, prefill tokens/s, and the
   batch-1 decode's share of the format's bytes floor: the float32 weights-only floor (every
   linear layer's float32 ``F.linear`` on a [1, in] input, back to back, measured here) scaled by
   the format's weight bytes, since at batch 1 each weight is read once per token.

A table is printed and written into ``docs/benchmarks.md`` under ``## Compression
(benchmarks/compress.py)`` (only that section is replaced; ``--no-write`` skips the file).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _benchkernel import Kernel
from _report import DOC, REPO, cpu_model, say, timed, verdict, write_doc

from llmos.plugins.compress import gate
from llmos.plugins.compress.jobs import corpus_tokens
from llmos.plugins.lm.checkpoint import load_checkpoint
from llmos.plugins.lm.text import load_tokenizer

SECTION = "## Compression (benchmarks/compress.py)"

FORMATS: list[tuple[str, str, dict[str, Any]]] = [
    ("int8", "quantize", {"scheme": "int8"}),
    ("int4 g128 rtn", "quantize", {"scheme": "int4", "group_size": 128, "method": "rtn"}),
    ("int4 g128 gptq", "quantize", {"scheme": "int4", "group_size": 128, "method": "gptq"}),
    ("w8a8", "quantize", {"scheme": "w8a8"}),
    ("magnitude 50%", "prune", {"method": "magnitude", "sparsity": 0.5}),
    ("wanda 50%", "prune", {"method": "wanda", "sparsity": 0.5}),
    ("2:4 (wanda)", "prune", {"method": "2:4", "scores": "wanda"}),
    ("structured 30%", "prune", {"method": "structured", "sparsity": 0.3}),
    ("structured 30% healed", "prune", {"method": "structured", "sparsity": 0.3, "distill": True}),
]


def float32_floor(ckpt: Path, reps: int) -> float:
    """Seconds per token of the float32 weights-only floor: every linear layer's F.linear on [1, in]."""
    model, _ = load_checkpoint(ckpt)
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(1, w.shape[1]) for w in weights]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(reps):
            start = time.perf_counter()
            for x, w in zip(xs, weights):
                F.linear(x, w)
            best = min(best, time.perf_counter() - start)
    return best


def linear_bytes(ckpt: Path, embed_bytes: int) -> int:
    """Bytes of a checkpoint's weights that decode reads per token: all but the embedding."""
    return gate.checkpoint_bytes(ckpt) - embed_bytes


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps and held-out windows")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 480; 30 with --quick)")
    parser.add_argument("--preset", default="small", help="the model shape (default small; a smaller one only to try the script out)")
    parser.add_argument("--no-write", action="store_true", help=f"print the table only; leave {DOC.relative_to(REPO)} alone")
    parser.add_argument("--render", type=Path, default=None, help="only render the table of an earlier run's raw figures (the JSON it names)")
    args = parser.parse_args(argv)
    if args.render:
        render(json.loads(args.render.read_text()), args.no_write)
        return 0
    q = args.quick
    steps = args.steps or (30 if q else 480)
    amp = "bfloat16" if {"amx_bf16", "avx512_bf16"} & cpu_flags() else "float32"
    windows = 16 if q else 48
    heal = 20 if q else 60
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    started = time.perf_counter()
    when = dt.datetime.now(dt.UTC)
    say(f"llmos compression benchmarks ({'quick' if q else 'full'}): {cpu_model()}; {threads} threads")
    scratch = Path(tempfile.mkdtemp(prefix="llmos-bench-compress-work-"))
    notes: list[str] = []
    gate_opts = {"eval_windows": 8, "speed_tokens": 8, "seq_len": 128, "max_ppl_increase": 1000.0, "calib_tokens": 8192}
    try:
        with Kernel("llmos-bench-compress-") as kernel:
            client = kernel.client
            ckpt = scratch / "small"
            train = {"data": "stdlib", "max_bytes": 6_000_000, "preset": args.preset, "vocab_size": 32000 if args.preset == "small" else 2048, "steps": steps, "batch_size": 8, "seq_len": 128,
                     "dtype": amp, "lr": 2e-3, "warmup_steps": 20, "eval_every": 0, "eval_batches": 4, "threads": threads, "output": str(ckpt)}
            t0 = time.perf_counter()
            trained = timed(f"train `small` {steps} steps", lambda: client.submit("train", train, {"cpus": threads}).result(timeout=7200))
            train_s = time.perf_counter() - t0
            outputs: dict[str, Path] = {}
            seconds: dict[str, float] = {}
            for name, kind, params in FORMATS:
                if args.preset != "small" and "group_size" in params:
                    params = {**params, "group_size": 32}  # a small shape tried out: its widths are not multiples of 128
                extra = {"heal_steps": heal} if "healed" in name else {}
                out = scratch / name.replace(" ", "_").replace("%", "").replace(":", "-")
                t1 = time.perf_counter()
                info = timed(f"{kind} {name}", lambda kind=kind, params=params, extra=extra, out=out: client.submit(
                    kind, {"model": str(ckpt), "output": str(out), **gate_opts, **params, **extra}, {"cpus": threads}).wait(timeout=7200))
                seconds[name] = time.perf_counter() - t1
                if info.state != "succeeded":
                    notes.append(f"{name}: the {kind} job {info.state}: {info.reason}")
                    continue
                outputs[name] = out
        # The same probe as the gate's, each model in a fresh process, on the same held-out windows.
        tok = load_tokenizer(ckpt)
        record = json.loads((ckpt / "llmos.json").read_text())["data"]
        held = corpus_tokens(record["source"], tok, record, "validation")
        tokens_file = scratch / "heldout.npy"
        np.save(tokens_file, np.asarray(held, dtype=np.int64), allow_pickle=False)
        probe = dict(seq_len=128, windows_count=windows, batch_size=8, speed_tokens=16 if q else 32, threads=threads, prefill=True, batches=(1, 16))
        results: dict[str, dict[str, Any]] = {}
        results["float32"] = timed("measure float32", lambda: gate.run_probe(ckpt, tokens_file, scratch, "float32", reference=None, **probe))
        ref = scratch / "float32-predictions.npy"
        results["bfloat16"] = timed("measure bfloat16", lambda: gate.run_probe(ckpt, tokens_file, scratch, "bfloat16", reference=ref, dtype="bfloat16", **probe))
        for name, out in outputs.items():
            results[name] = timed(f"measure {name}", lambda name=name, out=out: gate.run_probe(out, tokens_file, scratch, name.replace(" ", "_").replace("%", "").replace(":", "-"), reference=ref, **probe))
        floor = float32_floor(ckpt, 20)
        cfg = json.loads((ckpt / "config.json").read_text())
        embed = cfg["vocab_size"] * cfg["hidden_size"] * 4
        f32_linear = linear_bytes(ckpt, embed)
        raw = {"results": results, "weight_bytes": {n: linear_bytes(o, embed) for n, o in outputs.items()}, "seconds": seconds, "notes": notes,
               "trained": trained, "train_s": train_s, "floor": floor, "f32_linear": f32_linear, "held": len(held), "steps": steps, "batch": 8, "amp": amp, "windows": windows,
               "speed_tokens": probe["speed_tokens"], "quick": q, "when": when.isoformat(), "elapsed": time.perf_counter() - started, "threads": threads}
        RAW.write_text(json.dumps(raw, default=str))
        say(f"raw figures in {RAW} (re-render with --render {RAW})")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    render(raw, args.no_write)
    return 0


RAW = Path(tempfile.gettempdir()) / "llmos-compress-bench.json"


def render(raw: dict[str, Any], no_write: bool) -> None:
    results, seconds, notes, trained = raw["results"], raw["seconds"], list(raw["notes"]), raw["trained"]
    floor, f32_linear, steps, windows, q, threads = raw["floor"], raw["f32_linear"], raw["steps"], raw["windows"], raw["quick"], raw["threads"]
    when = dt.datetime.fromisoformat(raw["when"])
    base = results["float32"]
    rows = []
    for name, r in results.items():
        if name == "bfloat16":
            weight_bytes = f32_linear / 2
            disk = "(engine dtype)"
        else:
            weight_bytes = raw["weight_bytes"].get(name, f32_linear)
            disk = f"{r['bytes'] / 2**20:.1f} MiB ({r['bytes'] / base['bytes']:.2f}x)"
        floor_tps = (1 / floor) * f32_linear / weight_bytes
        tps1, tps16 = r["tokens_per_s"]["1"], r["tokens_per_s"]["16"]
        rows.append((name, disk, f"{r['ppl']:.3f} ({r['ppl'] / base['ppl'] - 1:+.2%})", f"{r['agreement']:.1%}", f"{tps1:.1f} ({tps1 / base['tokens_per_s']['1']:.2f}x)",
                     f"{tps16:.1f} ({tps16 / base['tokens_per_s']['16']:.2f}x)", f"{r['prefill_tokens_per_s']:.0f} ({r['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f}x)",
                     f"{tps1 / floor_tps:.0%} of {floor_tps:.0f}"))

    def ratio(name: str, key: str = "1") -> float:
        return results[name]["tokens_per_s"][key] / base["tokens_per_s"][key] if name in results else float("nan")

    def dppl(name: str) -> float:
        return results[name]["ppl"] / base["ppl"] - 1 if name in results else float("nan")

    vnni = any(f in (Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else "") for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    targets = [
        ("int8 decode at batch 1 vs float32", f"{ratio('int8'):.2f}x", ">= 3x", ratio("int8") >= 3),
        ("int4 g128 gptq decode at batch 1 vs float32", f"{ratio('int4 g128 gptq'):.2f}x", ">= 4.5x", ratio("int4 g128 gptq") >= 4.5),
        ("int4 g128 rtn decode at batch 1 vs float32", f"{ratio('int4 g128 rtn'):.2f}x", ">= 4.5x", ratio("int4 g128 rtn") >= 4.5),
        ("int8 perplexity change", f"{dppl('int8'):+.2%}", "<= +1%", dppl("int8") <= 0.01),
        ("int4 gptq perplexity change", f"{dppl('int4 g128 gptq'):+.2%}", "<= +3%", dppl("int4 g128 gptq") <= 0.03),
        ("int4 rtn perplexity change", f"{dppl('int4 g128 rtn'):+.2%}", "<= +6%", dppl("int4 g128 rtn") <= 0.06),
        ("w8a8 prefill vs float32" + ("" if vnni else " (no VNNI/AMX here: not a target)"),
         f"{results['w8a8']['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f}x" if "w8a8" in results else "-", ">= 2x",
         "w8a8" in results and results["w8a8"]["prefill_tokens_per_s"] / base["prefill_tokens_per_s"] >= 2 if vnni else None),
        ("structured 30% healed: decode speed-up / perplexity change", f"{ratio('structured 30% healed'):.2f}x / {dppl('structured 30% healed'):+.1%}", ">= 1.3x / <= +10%",
         ratio("structured 30% healed") >= 1.3 and dppl("structured 30% healed") <= 0.10),
        ("wanda 50% perplexity below magnitude 50%'s", f"{results.get('wanda 50%', {}).get('ppl', float('nan')):.3f} vs {results.get('magnitude 50%', {}).get('ppl', float('nan')):.3f}",
         "wanda < magnitude", results.get("wanda 50%", {}).get("ppl", 1e9) < results.get("magnitude 50%", {}).get("ppl", 0)),
    ]
    elapsed = raw["elapsed"]
    table = ["| format | bytes on disk | perplexity (change) | agreement | decode tok/s b1 | decode tok/s b16 | prefill tok/s | b1 share of its bytes floor |",
             "|---|---|---|---|---|---|---|---|"]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    ttable = ["| target (against float32, same run) | measured | target | result |", "|---|---|---|---|"]
    ttable += [f"| {a} | {b} | {c} | {'-' if d is None else verdict(d)} |" for a, b, c, d in targets]
    notes.insert(0, f"The weights: a `train` job, preset `small` ({trained.get('parameters', 0) / 1e6:.1f}M parameters), {steps} steps of {raw.get('batch', 4)} x 128 tokens of the standard"
                    f" library's source under {raw.get('amp', 'float32')} autocast, lr 2e-3, {raw['train_s']:.0f} s: validation loss {trained.get('val_loss', float('nan')):.2f}"
                    f" (perplexity {trained.get('val_perplexity', float('nan')):.1f}; a uniform guess over 32,000 tokens is 10.37 nats).")
    notes.append(f"Held-out: {windows} windows of 128 tokens of the model's own validation split ({raw['held']:,} tokens); agreement is top-1 agreement with float32 at every position."
                 f" Decode: greedy, {raw['speed_tokens']} steps after a 16-token prompt, batch 1 and 16; prefill: one 128-token prompt (best of 2).")
    notes.append(f"Floor: float32 weights-only {1 / floor:.1f} tokens/s ({floor * 1e3:.1f} ms a token for {f32_linear / 2**20:.0f} MiB of linear weights); a format's floor scales it by its"
                 " linear bytes (the checkpoint's, less the embedding). The bfloat16 row is the lm engine's dtype=bfloat16 (bfloat16 weights, float32 activations).")
    notes.append("Job times: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + " (each includes its own gate: two probes).")
    section = "\n".join([
        SECTION, "",
        f"`python benchmarks/compress.py{' --quick' if q else ''}` on {when:%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s. Machine: {os.cpu_count()} CPUs ({cpu_model()}),"
        f" Python {sys.version.split()[0]}, torch {torch.__version__}; {threads} threads.", "",
        *table, "", *ttable, "", *[f"- {n}" for n in notes], "",
    ])
    print()
    print(section)
    if not no_write:
        write_doc(SECTION, section)
        say(f"wrote {DOC}")


if __name__ == "__main__":
    sys.exit(main())
