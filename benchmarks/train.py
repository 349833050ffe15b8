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
   job run one after the other, alternating (loop, job, loop, job, loop, job; ``--quick``: one of
   each). The machine is shared and two threads on two cores slow down several-fold whenever
   anything else runs, so CPU use by foreign processes is sampled at every step and the headline
   compares the median time of the "quiet" steps (foreign load under 0.1 cores), pooled over the
   runs; the mean over those steps and the best whole-window run are shown too. The losses of the
   two are compared step by step (they compute the same thing, so they should be identical).
2. float32 ``torch.mm`` of 2048 x 2048 matrices with N threads (GFLOP/s, best of several reps), and
   training FLOP/s as 6 x parameters x tokens/s, with and without the attention term
   12 x layers x seq_len x width per token (the PaLM convention: the causal mask is not discounted).

Targets (from the issue) are reported as PASS/FAIL; a missed target does not change the exit code.
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
from dataclasses import asdict, dataclass, fields, replace
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
# CPU accounting: how much of the machine other processes take while we measure


@dataclass
class Sample:
    t: float
    busy: float
    cpu: dict[int, float]


class Load:
    """CPU time used by processes foreign to the benchmark: the machine's busy time minus that of
    this process and of the kernel's process tree (kernel, zygote, workers, the job)."""

    def __init__(self, kernel_pid: int) -> None:
        self.kernel_pid = kernel_pid
        self.procs: list[psutil.Process] = []
        self.refresh()

    def refresh(self, *extra: int | None) -> None:
        procs = [psutil.Process()]
        with contextlib.suppress(psutil.Error):
            kernel = psutil.Process(self.kernel_pid)
            procs += [kernel, *kernel.children(recursive=True)]
        for pid in extra:
            if pid and pid not in {p.pid for p in procs}:
                with contextlib.suppress(psutil.Error):
                    procs.append(psutil.Process(pid))
        self.procs = procs

    def sample(self) -> Sample:
        t = psutil.cpu_times()
        cpu = {}
        for proc in self.procs:
            with contextlib.suppress(psutil.Error):
                c = proc.cpu_times()
                cpu[proc.pid] = c.user + c.system
        return Sample(time.perf_counter(), sum(t) - t.idle - getattr(t, "iowait", 0.0), cpu)

    @staticmethod
    def foreign(a: Sample, b: Sample) -> float:
        """Foreign cores (CPU seconds per second) between two samples."""
        ours = sum(b.cpu[pid] - a.cpu[pid] for pid in a.cpu.keys() & b.cpu.keys())
        wall = b.t - a.t
        return max(0.0, b.busy - a.busy - ours) / wall if wall > 0 else 0.0

    def wait_quiet(self, limit: float, quiet: float, period: float = 0.5) -> tuple[float, float]:
        """Wait (up to ``limit`` s) for two quiet periods in a row; (seconds waited, last load)."""
        t0 = time.perf_counter()
        calm, load = 0, math.nan
        prev = self.sample()
        while time.perf_counter() - t0 < limit:
            time.sleep(period)
            cur = self.sample()
            load = self.foreign(prev, cur)
            prev = cur
            calm = calm + 1 if load < quiet else 0
            if calm >= 2:
                break
        return time.perf_counter() - t0, load


# ---------------------------------------------------------------------------------------------
# the measurements


def matmul_rates(threads: int, n: int = 2048, reps: int = 6) -> list[float]:
    """GFLOP/s of float32 ``torch.mm`` of n x n matrices, one figure per rep."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    for _ in range(2):
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


def plain_loop(p: TrainParams, config: LlamaConfig, tokens: Any, threads: int, load: Load, deadline: float) -> dict[str, Any]:
    """The same training, written as a plain PyTorch loop in this process: per step, the
    ``perf_counter`` time at its end, its loss, and a CPU sample. Stops early at ``deadline``
    (``perf_counter`` time; a busy machine)."""
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
    ends: dict[int, float] = {}
    losses: dict[int, float] = {}
    samples: dict[int, Sample] = {}
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
        samples[step] = load.sample()
        if ends[step] > deadline:
            break
    return {"ends": ends, "losses": losses, "samples": samples, "first_step_s": ends[1] - t_start}


def train_job(client: llmos.Client, params: dict[str, Any], threads: int, load: Load, deadline: float) -> dict[str, Any]:
    """Submit a ``train`` job and follow its events to the end: per step, the worker-stamped ``ts``
    of its ``train_loss`` metric event, the loss, and a CPU sample taken as the event arrives.
    Cancelled once a step ends after ``deadline`` (``perf_counter`` time; a busy machine)."""
    t_submit = time.time()
    job = client.submit("train", params=params, resources={"cpus": threads}, timeout=600)
    stopped = False
    ends: dict[int, float] = {}
    losses: dict[int, float] = {}
    samples: dict[int, Sample] = {}
    progress: list[tuple[int, float]] = []
    corpus: dict[str, Any] = {}
    t_running = t_model = None
    for event in job.events(follow=True, timeout=660):
        body = event.body
        if event.type == "job.metric" and body.get("name") == "train_loss":
            step = int(body["step"])
            if step == 1:
                load.refresh(job.info().worker_pid)
            ends[step] = event.ts
            losses[step] = float(body["value"])
            samples[step] = load.sample()
            if not stopped and samples[step].t > deadline:
                stopped = True
                job.cancel("benchmark time limit")
        elif event.type == "job.progress":
            tps = (body.get("fields") or {}).get("tokens_per_s")
            if tps is not None:
                progress.append((int(body["step"]), float(tps)))
            elif body.get("message") == "starting":
                t_model = event.ts
        elif event.type == "job.log" and body.get("event") == "corpus_ready":
            corpus = dict(body.get("fields") or {}, ts=event.ts)
        elif event.type == "job.state" and body.get("state") == "running" and t_running is None:
            t_running = event.ts
    info = job.wait(timeout=30)
    if info.state != "succeeded" and not (stopped and info.state == "cancelled"):
        raise RuntimeError(f"train job {job.id} {info.state}: {info.reason}")
    return {
        "id": job.id,
        "stopped": stopped,
        "ends": ends,
        "losses": losses,
        "samples": samples,
        "progress": progress,
        "corpus": corpus,
        "result": info.result,
        "submit_to_first_step_s": ends[1] - t_submit if 1 in ends else math.nan,
        "submit_to_running_s": t_running - t_submit if t_running else math.nan,
        "running_to_corpus_s": corpus["ts"] - t_running if t_running and "ts" in corpus else math.nan,
        "corpus_to_model_s": t_model - corpus["ts"] if t_model and "ts" in corpus else math.nan,
        "first_step_s": ends[1] - t_model if 1 in ends and t_model else math.nan,
        "after_last_step_s": info.ended_at - ends[max(ends)] if ends and info.ended_at and not stopped else math.nan,
    }


def step_stats(run: dict[str, Any], window: tuple[int, int], tokens_per_step: int, quiet: float) -> None:
    """Add to ``run``: tokens/s over steps window[0]+1 .. window[1] (end of step w0 to end of step
    w1), the median step time there, and the same over the steps during which foreign processes
    used less than ``quiet`` cores."""
    w0, w1 = window
    ends, samples = run["ends"], run["samples"]
    w1 = min(w1, max(ends))  # a run stopped at its time limit has fewer steps
    if w1 < w0 + 2:
        raise RuntimeError(f"only {max(ends)} steps ran: the machine is too busy (or the time limit too short)")
    missing = [s for s in range(w0, w1 + 1) if s not in ends or s not in samples]
    if missing:
        raise RuntimeError(f"no timing for steps {missing[:5]}{'...' if len(missing) > 5 else ''}")
    steps = {s: ends[s] - ends[s - 1] for s in range(w0 + 1, w1 + 1)}
    foreign = {s: Load.foreign(samples[s - 1], samples[s]) for s in steps}
    quiet_steps = [steps[s] for s in steps if foreign[s] < quiet]
    whole = samples[w1].t - samples[w0].t
    run.update(
        last=w1,
        rate=(w1 - w0) * tokens_per_step / (ends[w1] - ends[w0]),
        median_step=statistics.median(steps.values()),
        step_times=list(steps.values()),
        quiet_times=quiet_steps,
        foreign=Load.foreign(samples[w0], samples[w1]) if whole > 0 else math.nan,
    )


def run_note(run: dict[str, Any], window: tuple[int, int]) -> str:
    return f"{run['rate']:,.0f} ({run['foreign']:.2f}" + (f"; step {run['last']})" if run["last"] < window[1] else ")")


def quiet_rates(runs: list[dict[str, Any]], tokens_per_step: int) -> tuple[float, float, int]:
    """Tokens/s over the quiet steps of all runs: at the median step, on average; and how many."""
    times = [t for r in runs for t in r["quiet_times"]]
    if not times:
        return math.nan, math.nan, 0
    return tokens_per_step / statistics.median(times), len(times) * tokens_per_step / sum(times), len(times)


# ---------------------------------------------------------------------------------------------
# the report


def verdict(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine() -> str:
    return (
        f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}) of {cpu_model()}, "
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
    warmup, measured = (8, 40) if q else (10, 60)
    rounds = 1 if q else 3
    budget = 60.0 if q else 120.0  # no new round starts once this much time has gone
    run_limit = 25.0 if q else 30.0  # a run stops after this many seconds (about 2x a quiet run)
    wait_limit = 5.0 if q else 8.0  # seconds to wait for a quiet machine before each run
    quiet = 0.1  # a step is quiet if foreign processes used less than this many cores during it
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
    loops: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    waits: list[tuple[float, float]] = []
    with Kernel() as kernel:
        client = kernel.client
        assert client is not None and kernel.pid is not None
        load = Load(kernel.pid)
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

        def settle() -> None:
            waits.append(load.wait_quiet(wait_limit, quiet))

        settle()
        mm = matmul_rates(threads)
        say(f"- matmul 2048 x 2048 float32: best {max(mm):.1f} GFLOP/s")
        for r in range(rounds):
            if r and time.perf_counter() - started > budget:
                say(f"- skipping rounds {r + 1}-{rounds}: {time.perf_counter() - started:.0f} s gone (a busy machine)")
                break
            settle()
            say(f"- round {r + 1}/{rounds}: plain loop, {p.steps} steps ...")
            load.refresh()
            run = plain_loop(p, config, train_tokens, threads, load, time.perf_counter() + run_limit)
            step_stats(run, window, tokens_per_step, quiet)
            loops.append(run)
            say(f"  {run['rate']:,.0f} tokens/s, median step {run['median_step'] * 1e3:.0f} ms, {len(run['quiet_times'])} quiet steps, foreign load {run['foreign']:.2f} cores")
            settle()
            say(f"- round {r + 1}/{rounds}: train job, {p.steps} steps ...")
            run = train_job(client, job_params, threads, load, time.perf_counter() + run_limit)
            step_stats(run, window, tokens_per_step, quiet)
            jobs.append(run)
            say(f"  job {run['id']}: {run['rate']:,.0f} tokens/s, median step {run['median_step'] * 1e3:.0f} ms, {len(run['quiet_times'])} quiet steps, foreign load {run['foreign']:.2f} cores")
        settle()
        mm += matmul_rates(threads)

    # -- figures
    n_runs = len(jobs)
    best_loop = max(loops, key=lambda r: r["rate"])
    best_job = max(jobs, key=lambda r: r["rate"])
    ratio_best = best_job["rate"] / best_loop["rate"]
    q_loop, qmean_loop, nq_loop = quiet_rates(loops, tokens_per_step)
    q_job, qmean_job, nq_job = quiet_rates(jobs, tokens_per_step)
    enough = min(nq_loop, nq_job) >= 20
    ratio_quiet = q_job / q_loop if enough else math.nan
    med_loop = statistics.median(t for r in loops for t in r["step_times"])
    med_job = statistics.median(t for r in jobs for t in r["step_times"])
    mm_best = max(mm)
    flop_per_token = 6 * n_params
    attn_per_token = 12 * config.num_hidden_layers * p.seq_len * config.hidden_size
    # The same computation: the job's losses against the loop's, step by step.
    ref = loops[0]["losses"]
    divergent = []  # (run label, first step that differs, max abs difference)
    for label, run in [*((f"loop {i + 1}", r) for i, r in enumerate(loops[1:], 1)), *((f"job {i + 1}", r) for i, r in enumerate(jobs))]:
        common = [s for s in sorted(run["losses"]) if s in ref]
        bad = [s for s in common if run["losses"][s] != ref[s]]
        if bad:
            divergent.append((label, bad[0], max(abs(run["losses"][s] - ref[s]) for s in bad)))
    win_progress = [tps for j in jobs for s, tps in j["progress"] if window[0] + p.log_every <= s <= window[1]]

    rows: list[tuple[str, str, str, str, str]] = []
    rows.append(
        (f"tokens/s at the median quiet step ({nq_job} job / {nq_loop} loop steps with < {quiet} foreign cores)",
         f"{q_job:,.0f}" if nq_job else "-", f"{q_loop:,.0f} plain PyTorch loop" if nq_loop else "-",
         f"{ratio_quiet:.3f}x (target >= {TARGET}x)" if enough else "too few quiet steps: see the best run below",
         verdict(ratio_quiet >= TARGET) if enough else "-")
    )
    if nq_job and nq_loop:
        rows.append(("tokens/s, mean over the same quiet steps", f"{qmean_job:,.0f}", f"{qmean_loop:,.0f}", f"{qmean_job / qmean_loop:.3f}x", "-"))
    rows.append(
        (f"tokens/s, all steps {window[0] + 1}-{window[1]}, best of {n_runs} runs", f"{best_job['rate']:,.0f}", f"{best_loop['rate']:,.0f}",
         f"{ratio_best:.3f}x" + ("" if enough else f" (target >= {TARGET}x)"), "-" if enough else verdict(ratio_best >= TARGET))
    )
    rows.append(
        ("all runs: tokens/s (foreign load in cores; last step if stopped at the time limit)", ", ".join(run_note(r, window) for r in jobs),
         ", ".join(run_note(r, window) for r in loops), "-", "-")
    )
    rows.append(("median step time, all runs", f"{med_job * 1e3:.1f} ms", f"{med_loop * 1e3:.1f} ms", f"{med_loop / med_job:.3f}x", "-"))
    if win_progress:
        rows.append(("job's own `tokens_per_s` (its progress events in the window, median)", f"{statistics.median(win_progress):,.0f}", "-", "-", "-"))
    rows.append(
        ("losses, every run against loop 1, step by step", "identical" if not divergent else "; ".join(f"{lb} differs from step {s} (max {d:.2g})" for lb, s, d in divergent),
         "-", "same computation: identical", verdict(not divergent))
    )
    rows.append((f"float32 matmul 2048x2048, {threads} threads (best / median of {len(mm)})", "-", f"{mm_best:.1f} / {statistics.median(mm):.1f} GFLOP/s", "-", "-"))
    # The headline figures: quiet steps when there are enough of them on both sides, else best windows.
    head_job = q_job if enough else best_job["rate"]
    head_loop = q_loop if enough else best_loop["rate"]
    for label, per_token in (("6·N", flop_per_token), ("6·N + 12·L·T·d", flop_per_token + attn_per_token)):
        job_f, loop_f = head_job * per_token / 1e9, head_loop * per_token / 1e9
        rows.append((f"training GFLOP/s ({label}), share of best matmul", f"{job_f:.1f} ({job_f / mm_best:.1%})", f"{loop_f:.1f} ({loop_f / mm_best:.1%})", "-", "-"))
    rows.append(
        ("job start: submit -> first step done (= submit -> running + worker setup to corpus ready + model and optimizer + first step)",
         f"{statistics.median(r['submit_to_first_step_s'] for r in jobs):.1f} s (= "
         + " + ".join(f"{statistics.median(r[k] for r in jobs):.2f}" for k in ("submit_to_running_s", "running_to_corpus_s", "corpus_to_model_s", "first_step_s")) + ")",
         f"first step {statistics.median(r['first_step_s'] for r in loops):.2f} s", "-", "-")
    )
    rows.append(("job end: last step -> job ended (final evaluation, checkpoint)", f"{statistics.median(r['after_last_step_s'] for r in jobs):.2f} s", "-", "-", "-"))

    elapsed = time.perf_counter() - started
    shape = (
        f"`micro` with the byte tokenizer: width {config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads} heads ({config.num_key_value_heads} KV), MLP {config.intermediate_size}, vocab {config.vocab_size}, "
        f"{n_params:,} parameters"
    )
    non_default = {k: v for k, v in asdict(p).items() if k != "data" and v != defaults.get(k)}
    cached_ok = all(j["corpus"].get("cached") for j in jobs)
    waited = sum(w for w, _ in waits)
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
            f"- The job: `train` with data='stdlib', {', '.join(f'{k}={v!r}' for k, v in non_default.items())} and `resources={{'cpus': {threads}}}`;"
            " a step's time is the gap between the worker-stamped `ts` of consecutive `train_loss` metric events (one per step)."
            f" It read the baseline's token arrays from the token cache: {'yes' if cached_ok else '**no** (it tokenized the corpus itself)'}.",
            f"- The baseline: a plain loop in the benchmark process with the same `Llama`, config, `init_weights({p.seed})`, AdamW"
            " parameter groups and hyper-parameters (torch's default implementation, on CPU the same per-parameter loop the job asks"
            f" for), `lr_at`, `clip_grad_norm_({p.grad_clip})` and `batch_at` batches, timed with `perf_counter` after each step's"
            f" `loss.item()`. Loop and job alternate ({n_runs} of each), never together; the first {warmup} steps are warm-up"
            " (the very first takes seconds: one-time kernel set-up). Both are compared over the same steps.",
            f"- The machine is shared. 'Foreign' CPU is the machine's busy time minus this process's and the llmos kernel's process tree's"
            " (kernel, zygote, workers, the job); it is sampled at every step (for the job, as its metric event arrives). Two threads"
            " per two cores slow down several-fold as soon as anything else runs, so the headline compares the median of the quiet"
            f" steps' times, pooled over the runs (the mean over the same steps is shown too). Each run starts after the machine was quiet for 1 s (or {wait_limit:.0f} s of waiting):"
            f" {waited:.0f} s waited in all.",
            f"- FLOPs: N = all {n_params:,} parameters (embedding and untied head included); the attention term (scores and"
            f" weighted sum, forward and backward, causal mask not discounted) adds {attn_per_token / flop_per_token:.1%}."
            " Shares are of the best matmul rep (matmul measured before and after the runs).",
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
