"""Training benchmarks: tokens/s of a ``train`` job against a plain PyTorch loop, and the share of
the machine's matrix-multiply rate that training reaches.

Run ``python benchmarks/train.py`` (about 2.5 minutes on 2 cores) or ``--quick`` (about 1 minute).
It boots a real kernel with ``llmos boot --detach`` in a temporary state directory, shuts it down
(also on error), prints a Markdown table and writes it into ``docs/benchmarks.md`` under
``## Training (benchmarks/train.py)`` (only that section is replaced; ``--no-write`` skips the file).

1. tokens/s: a ``train`` job (preset ``micro``, byte tokenizer, the ``stdlib`` corpus, batch 8 x 128
   tokens, no evaluation until the end) submitted with ``resources={"cpus": N}`` and ``threads=N``,
   N = ``os.cpu_count()``; its steps are timed by the worker-stamped ``ts`` of its per-step
   ``train_loss`` metric events. Baseline: a plain PyTorch loop in this process with
   ``torch.set_num_threads(N)``, the same model class, config and initialisation, the same AdamW
   (parameter groups, betas, eps, weight decay, torch's default implementation on CPU), learning-rate
   schedule, gradient clipping, and the same batches (``batch_at`` on the same token arrays, read
   from the same cache file). Both are timed over the same window of steps, after a warm-up; loop and
   job run one after the other, alternating (loop, job, loop, job; ``--quick``: one of each); the
   best run of each is compared, the median per-step time is shown as well. The losses of the two
   are compared step by step (they compute the same thing, so they should agree).
2. float32 ``torch.mm`` of 2048 x 2048 matrices with N threads (GFLOP/s, best of several reps), and
   training FLOP/s as 6 x parameters x tokens/s, with and without the attention term
   12 x layers x seq_len x width per token (the PaLM convention: the causal mask is not discounted).

Targets (from the issue) are reported as PASS/FAIL; a missed target does not change the exit code.
The machine is shared: the CPU time other processes took during each timed window is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import psutil
import torch

import llmos
from llmos.paths import pid_alive, read_kernel_info
from llmos.plugins.lm import TrainParams
from llmos.plugins.lm.config import LlamaConfig, config_from_preset
from llmos.plugins.lm.model import Llama
from llmos.plugins.lm.text import bytes_tokenizer, corpus_files, tokenize_corpus
from llmos.plugins.lm.train import batch_at, lr_at
from llmos.protocol import ShutdownRequest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Training (benchmarks/train.py)"
END_STATES = ("succeeded", "failed", "cancelled")
TARGET = 0.97


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# the kernel under test


def llmos_cmd() -> list[str]:
    exe = shutil.which("llmos")
    return [exe] if exe else [sys.executable, "-m", "llmos.kernel.cli"]


class Kernel:
    """A kernel booted with ``llmos boot --detach`` in a temporary state dir; stopped on exit."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="llmos-bench-train-"))
        self.pid: int | None = None
        self.client: llmos.Client | None = None

    def __enter__(self) -> Kernel:
        try:
            proc = subprocess.run([*llmos_cmd(), "boot", "--detach", "--state-dir", str(self.dir)], capture_output=True, text=True, timeout=60)
            if proc.returncode != 0:
                raise RuntimeError(f"llmos boot failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
            self.client = llmos.connect(self.dir)
            self.pid = int(self.client.status()["pid"])
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Shut the kernel down: politely, else SIGTERM, else SIGKILL; then remove the state dir."""
        pid = self.pid
        if pid is None:
            with contextlib.suppress(Exception):
                pid = int(read_kernel_info(self.dir)["pid"])
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.request(ShutdownRequest(), timeout=10)
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None
        if pid is not None:
            for sig, wait in ((None, 15.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                deadline = time.monotonic() + wait
                while pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
                if not pid_alive(pid):
                    break
            self.pid = None
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# CPU accounting: how much of the machine other processes took while we measured


class CpuProbe:
    """System-wide busy CPU seconds minus those of one process, between ``start`` and ``stop``."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.t0 = self.busy0 = self.own0 = 0.0

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def _own(self) -> float:
        c = self.proc.cpu_times()
        return c.user + c.system

    def start(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        own = self._own() - self.own0
        other = self._busy() - self.busy0 - own
        return {"own_cores": own / wall if wall else 0.0, "other_cores": max(0.0, other) / wall if wall else 0.0}


# ---------------------------------------------------------------------------------------------
# the measurements


def matmul_rates(threads: int, n: int = 2048, reps: int = 10) -> list[float]:
    """GFLOP/s of float32 ``torch.mm`` of n x n matrices, one figure per rep."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=out)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return rates


def model_config(p: TrainParams, vocab_size: int, eos_id: int | None) -> LlamaConfig:
    """The shape the train job builds for these parameters (TrainRunner.setup, no checkpoint)."""
    config = config_from_preset(p.preset, vocab_size, max_position_embeddings=max(p.seq_len, 512))
    if eos_id is not None:
        config = replace(config, eos_token_id=eos_id, bos_token_id=eos_id)
    return config


def plain_loop(p: TrainParams, config: LlamaConfig, tokens: Any, threads: int, window: tuple[int, int]) -> dict[str, Any]:
    """The same training, written as a plain PyTorch loop in this process.

    Returns the ``perf_counter`` time at the end of each step, the losses, and the CPU others
    took between the window's first and last step."""
    torch.set_num_threads(threads)
    torch.manual_seed(p.seed)
    model = Llama(config)
    model.init_weights(p.seed)
    model.train()
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=p.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    probe = CpuProbe(os.getpid())
    ends: dict[int, float] = {}
    losses: dict[int, float] = {}
    other: dict[str, float] = {}
    t_start = time.perf_counter()
    for step in range(1, p.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, p)
        x, y = batch_at(tokens, step, p.seed, p.batch_size, p.seq_len)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[step] = loss.item()
        ends[step] = time.perf_counter()
        if step == window[0]:
            probe.start()
        elif step == window[1]:
            other = probe.stop()
    return {"ends": ends, "losses": losses, "cpu": other, "first_step_s": ends[1] - t_start}


def train_job(client: llmos.Client, params: dict[str, Any], threads: int, window: tuple[int, int], timeout: float) -> dict[str, Any]:
    """Submit a ``train`` job, follow its events to the end; per-step times from its metrics."""
    t_submit = time.time()
    job = client.submit("train", params=params, resources={"cpus": threads}, timeout=timeout)
    ends: dict[int, float] = {}
    losses: dict[int, float] = {}
    progress: list[tuple[int, float]] = []
    corpus: dict[str, Any] = {}
    state, reason = None, None
    t_running = None
    probe: CpuProbe | None = None
    other: dict[str, float] = {}
    for event in job.events(follow=True, timeout=timeout + 60):
        body = event.body
        if event.type == "job.metric" and body.get("name") == "train_loss":
            step = int(body["step"])
            ends[step] = event.ts
            losses[step] = float(body["value"])
            if step == window[0]:
                pid = job.info().worker_pid
                if pid:
                    with contextlib.suppress(psutil.Error):
                        probe = CpuProbe(pid)
                        probe.start()
            elif step == window[1] and probe is not None:
                with contextlib.suppress(psutil.Error):
                    other = probe.stop()
        elif event.type == "job.progress":
            tps = (body.get("fields") or {}).get("tokens_per_s")
            if tps is not None:
                progress.append((int(body["step"]), float(tps)))
        elif event.type == "job.log" and body.get("event") == "corpus_ready":
            corpus = body.get("fields") or {}
        elif event.type == "job.state":
            if body.get("state") == "running" and t_running is None:
                t_running = event.ts
            if body.get("state") in END_STATES:
                state, reason = body.get("state"), body.get("reason")
    info = job.wait(timeout=30)
    if info.state != "succeeded":
        raise RuntimeError(f"train job {job.id} {info.state}: {info.reason or reason}")
    return {
        "id": job.id,
        "ends": ends,
        "losses": losses,
        "progress": progress,
        "corpus": corpus,
        "cpu": other,
        "state": state,
        "result": info.result,
        "submit_to_first_step_s": ends[1] - t_submit if 1 in ends else math.nan,
        "first_step_s": ends[1] - t_running if 1 in ends and t_running else math.nan,
        "after_last_step_s": (info.ended_at or 0.0) - ends[max(ends)] if ends and info.ended_at else math.nan,
    }


def window_stats(run: dict[str, Any], window: tuple[int, int], tokens_per_step: int) -> dict[str, float]:
    """Tokens/s over steps window[0]+1 .. window[1] (end of step w0 to end of step w1), and the
    median step time in that window."""
    w0, w1 = window
    ends = run["ends"]
    missing = [s for s in range(w0, w1 + 1) if s not in ends]
    if missing:
        raise RuntimeError(f"no timing for steps {missing[:5]}{'...' if len(missing) > 5 else ''}")
    steps = [ends[s] - ends[s - 1] for s in range(w0 + 1, w1 + 1)]
    wall = ends[w1] - ends[w0]
    median = statistics.median(steps)
    return {"rate": (w1 - w0) * tokens_per_step / wall, "median_rate": tokens_per_step / median, "median_step": median, "max_step": max(steps), "wall": wall}


# ---------------------------------------------------------------------------------------------
# the report


def verdict(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def machine() -> str:
    return (
        f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {platform.machine()}, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, llmos {llmos.__version__}"
    )


def write_doc(section: str) -> None:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nEach section is written by the script it names; run it again to refresh it.\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one loop and one job of fewer steps (about 1 minute)")
    parser.add_argument("--no-write", action="store_true", help=f"print the table only; leave {DOC.relative_to(REPO)} alone")
    args = parser.parse_args(argv)
    q = args.quick
    threads = os.cpu_count() or 1
    warmup, measured = (10, 40) if q else (10, 100)
    rounds = 1 if q else 2
    window = (warmup, warmup + measured)
    # The job's parameters; the baseline reads the same dataclass (lr schedule, clipping, seed).
    job_params: dict[str, Any] = {
        "data": "stdlib",
        "max_bytes": 3_000_000,
        "tokenizer": "bytes",
        "preset": "micro",
        "batch_size": 8,
        "seq_len": 128,
        "steps": warmup + measured,
        "eval_every": 0,
        "eval_batches": 1,
        "log_every": 10,
        "threads": threads,
        "seed": 0,
    }
    p = TrainParams(**job_params)
    defaults = {f.name: getattr(TrainParams(data="x"), f.name) for f in fields(TrainParams) if f.name != "data"}
    tokens_per_step = p.batch_size * p.seq_len * p.grad_accum

    started = time.perf_counter()
    when = dt.datetime.now(dt.UTC)
    say(f"llmos training benchmarks ({'quick' if q else 'full'}): {machine()}; {threads} threads")
    with Kernel() as kernel:
        client = kernel.client
        assert client is not None
        say(f"kernel pid {kernel.pid} in {kernel.dir}")

        # The tokens, written to the kernel's token cache: the job finds them there (its
        # corpus_ready log says cached=True), so both train on the very same array.
        t0 = time.perf_counter()
        tok = bytes_tokenizer()
        train_tokens, _, _ = tokenize_corpus(
            corpus_files(p.data, p.glob), tok, kernel.dir / "cache" / "tokens",
            text_field=p.text_field, max_bytes=p.max_bytes, val_fraction=p.val_fraction,
        )
        say(f"- corpus: {len(train_tokens):,} training tokens in {time.perf_counter() - t0:.1f} s")
        config = model_config(p, tok.vocab_size, tok.eos_id)
        n_params = config.num_parameters()

        say("- matmul 2048 x 2048 float32 ...")
        mm = matmul_rates(threads)
        say(f"  best {max(mm):.1f} GFLOP/s, median {statistics.median(mm):.1f}")

        loops: list[dict[str, Any]] = []
        jobs: list[dict[str, Any]] = []
        for r in range(rounds):
            say(f"- round {r + 1}/{rounds}: plain loop, {p.steps} steps ...")
            run = plain_loop(p, config, train_tokens, threads, window)
            run.update(window_stats(run, window, tokens_per_step))
            loops.append(run)
            say(f"  {run['rate']:,.0f} tokens/s (median step {run['median_step'] * 1e3:.0f} ms), others used {run['cpu'].get('other_cores', math.nan):.2f} cores")
            say(f"- round {r + 1}/{rounds}: train job, {p.steps} steps ...")
            run = train_job(client, job_params, threads, window, timeout=600)
            run.update(window_stats(run, window, tokens_per_step))
            jobs.append(run)
            say(f"  job {run['id']}: {run['rate']:,.0f} tokens/s (median step {run['median_step'] * 1e3:.0f} ms), others used {run['cpu'].get('other_cores', math.nan):.2f} cores")

    # -- figures
    best_loop = max(loops, key=lambda r: r["rate"])
    best_job = max(jobs, key=lambda r: r["rate"])
    ratio = best_job["rate"] / best_loop["rate"]
    med_loop = statistics.median(r["median_step"] for r in loops)
    med_job = statistics.median(r["median_step"] for r in jobs)
    med_ratio = med_loop / med_job
    mm_best, mm_median = max(mm), statistics.median(mm)
    flop_per_token = 6 * n_params
    attn_per_token = 12 * config.num_hidden_layers * p.seq_len * config.hidden_size
    # Same computation: the job's losses against the loop's, step by step.
    diffs = [abs(j["losses"][s] - lp["losses"][s]) for j in jobs for lp in loops for s in range(1, p.steps + 1) if s in j["losses"]]
    max_diff = max(diffs) if diffs else math.nan
    win_progress = [tps for j in jobs for s, tps in j["progress"] if window[0] + p.log_every <= s <= window[1]]

    rows: list[tuple[str, str, str, str, str]] = []
    rows.append(
        (f"tokens/s, steps {window[0] + 1}-{window[1]} (best of {rounds})", f"{best_job['rate']:,.0f}", f"{best_loop['rate']:,.0f} plain PyTorch loop",
         f"{ratio:.3f}x (target >= {TARGET}x)", verdict(ratio >= TARGET))
    )
    rows.append(
        ("median step time (median over runs)", f"{med_job * 1e3:.1f} ms", f"{med_loop * 1e3:.1f} ms", f"{med_ratio:.3f}x speed", "-")
    )
    rows.append(
        ("all runs, tokens/s", ", ".join(f"{r['rate']:,.0f}" for r in jobs), ", ".join(f"{r['rate']:,.0f}" for r in loops),
         "others used " + ", ".join(f"{r['cpu'].get('other_cores', math.nan):.2f}" for r in jobs) + " / "
         + ", ".join(f"{r['cpu'].get('other_cores', math.nan):.2f}" for r in loops) + " cores", "-")
    )
    if win_progress:
        rows.append(("job's own `tokens_per_s` (progress events in the window, median)", f"{statistics.median(win_progress):,.0f}", "-", "-", "-"))
    rows.append(("same losses, job vs loop (max abs difference, all steps)", f"{max_diff:.2g}", "-", "must be < 1e-3", verdict(max_diff < 1e-3)))
    rows.append((f"float32 matmul 2048x2048, {threads} threads (best / median of {len(mm)})", "-", f"{mm_best:.1f} / {mm_median:.1f} GFLOP/s", "117 GFLOP/s in MEASURED.md", "-"))
    for label, per_token in (("6·N", flop_per_token), ("6·N + 12·L·T·d attention", flop_per_token + attn_per_token)):
        job_f, loop_f = best_job["rate"] * per_token / 1e9, best_loop["rate"] * per_token / 1e9
        rows.append((f"training GFLOP/s ({label}) and share of matmul", f"{job_f:.1f} ({job_f / mm_best:.1%})", f"{loop_f:.1f} ({loop_f / mm_best:.1%})", "-", "-"))
    rows.append(
        ("job: submit -> first step done / first step / last step -> ended",
         " / ".join(f"{statistics.median(r[k] for r in jobs):.1f} s" for k in ("submit_to_first_step_s", "first_step_s", "after_last_step_s")),
         f"- / {statistics.median(r['first_step_s'] for r in loops):.1f} s / -", "-", "-")
    )

    elapsed = time.perf_counter() - started
    shape = (
        f"`micro` with the byte tokenizer: width {config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads} heads ({config.num_key_value_heads} KV), MLP {config.intermediate_size}, vocab {config.vocab_size}, "
        f"{n_params:,} parameters"
    )
    non_default = {k: v for k, v in asdict(p).items() if k != "data" and v != defaults.get(k)}
    cached_ok = all(j["corpus"].get("cached") for j in jobs)
    table = ["| metric | llmos job | baseline | ratio / target | result |", "|---|---|---|---|---|"]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    section = "\n".join(
        [
            SECTION,
            "",
            f"`python benchmarks/train.py{' --quick' if q else ''}` on {when:%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s. Machine: {machine()}; "
            f"{threads} torch threads in both. Model: {shape}. Batch {p.batch_size} x {p.seq_len} tokens "
            f"({tokens_per_step:,} a step), data `stdlib` ({len(train_tokens):,} training tokens from {p.max_bytes:,} characters).",
            "",
            *table,
            "",
            f"- The job: `train` with {', '.join(f'{k}={v!r}' for k, v in non_default.items())} and `resources={{'cpus': {threads}}}`;"
            f" its step times are the worker-stamped `ts` of its per-step `train_loss` metric events. Token arrays shared with the baseline"
            f" through the token cache: {'yes' if cached_ok else '**no** (the job tokenized the corpus itself)'}.",
            f"- The baseline: the same `Llama`, config, `init_weights({p.seed})`, AdamW parameter groups and hyper-parameters"
            " (torch's default implementation, which on CPU is the same per-parameter loop the job asks for), `lr_at`,"
            f" `clip_grad_norm_({p.grad_clip})` and `batch_at` batches, timed with `perf_counter` after each step's `loss.item()`."
            f" Loop and job alternate ({'loop, job' if rounds == 1 else 'loop, job, loop, job'}), never together; the first {warmup}"
            f" steps are warm-up (the first step alone takes seconds: one-time kernel set-up).",
            f"- FLOPs: N = all {n_params:,} parameters (embedding and untied head included); the attention term adds"
            f" {attn_per_token / flop_per_token:.1%}. Shares are of the best matmul rep. 'Others used' is the machine's busy CPU"
            " time during the window minus the measured process's, in cores (the kernel and this process included).",
            "",
        ]
    )
    print()
    print(section)
    if not args.no_write:
        write_doc(section)
        say(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
