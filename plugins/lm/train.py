"""The ``train`` runner (imported only in worker processes: it imports torch). ``eval`` and
``generate`` have modules of their own; what all jobs share is in :mod:`llmos.plugins.lm.runtime`."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import llmos
from llmos.paths import free_port
from llmos.plugins.lm.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from llmos.plugins.lm.config import PRESETS, config_from_dict, config_from_preset
from llmos.plugins.lm.eval import evaluate
from llmos.plugins.lm.model import Llama
from llmos.plugins.lm.runtime import (
    _maybe_hash,
    cache_dir,
    load_for_job,
    pick_device,
    set_threads,
    tokenizer_beside,
)
from llmos.plugins.lm.text import (
    Tok,
    bytes_tokenizer,
    corpus_files,
    documents,
    files_signature,
    load_tokenizer,
    tokenize_corpus,
    train_bpe,
)


def batch_at(tokens: np.ndarray, step: int, seed: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step``: random windows drawn from a generator seeded by (seed, step), so a
    resumed run sees exactly the batches an uninterrupted one would."""
    gen = np.random.Generator(np.random.PCG64([seed, step]))
    starts = gen.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    chunk = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    data = torch.from_numpy(chunk)
    return data[:, :-1], data[:, 1:]


def lr_at(step: int, p: Any) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step <= p.warmup_steps:
        return p.lr * step / max(1, p.warmup_steps)
    progress = (step - p.warmup_steps) / max(1, p.steps - p.warmup_steps)
    return p.lr * (p.min_lr_ratio + (1 - p.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    if choice == "float32":
        return None
    if choice == "bfloat16":
        return torch.bfloat16
    # auto: bfloat16 where the hardware runs it natively (a GPU that supports it), else float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _optimizer_state(opt: torch.optim.Optimizer, model: Llama) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, state in opt.state.items():
        for key, value in state.items():
            out[f"opt/{names[id(p)]}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    out["rng/torch"] = torch.get_rng_state()
    return out


def _load_optimizer_state(opt: torch.optim.Optimizer, model: Llama, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        if not key.startswith("opt/"):
            continue
        _, name, field = key.split("/", 2)
        if name not in params:
            raise CheckpointError(f"train state has optimizer state for unknown parameter {name}")
        opt.state[params[name]][field] = value.to(params[name].device) if field != "step" else value
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])


def _load_sharded_optimizer_state(opt: torch.optim.Optimizer, model: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) train state into an optimizer over FSDP shards; every rank holds the
    full tensors and keeps its shard of them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(q): n for n, q in model.named_parameters()}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, name, field = key.split("/", 2)
            state.setdefault(name, {})[field] = value
    unknown = sorted(set(state) - set(names.values()))
    if unknown:
        raise CheckpointError(f"train state has optimizer state for unknown parameter {unknown[0]}")
    if state:
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(q)] for q in g["params"]]} for g in opt.param_groups]
        set_optimizer_state_dict(model, opt, {"state": state, "param_groups": groups}, options=StateDictOptions(full_state_dict=True))
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])


class _Weights:
    """A gathered full state dict in the shape :func:`save_checkpoint` reads (``config``, ``state_dict()``)."""

    def __init__(self, config: Any, state: dict[str, torch.Tensor]) -> None:
        self.config, self._state = config, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def _device_memory(ctx: llmos.JobContext, device: torch.device, world: int) -> int:
    """Bytes one rank may use: its GPU's (or the reservation's), or its share of the CPU memory."""
    reserved = ctx.resources.get("gpu_memory") if device.type == "cuda" else ctx.resources.get("memory")
    if isinstance(reserved, int | float) and reserved > 0:
        return int(reserved) if device.type == "cuda" else int(reserved) // world
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // world


class TrainRunner(llmos.Runner):
    """Train a Llama-style model from text; checkpoints are Hugging Face directories."""

    def setup(self, ctx: llmos.JobContext) -> None:
        """The steps before the first training step, in order."""
        self._place(ctx)
        source, manifest = self._load_source(ctx)
        self._read_corpus(ctx)
        self._build_model(ctx, source, manifest)
        self._distribute(ctx)
        self._make_optimizer(ctx)
        self._wrap(ctx)
        if self.rank == 0:
            ctx.log.info("model_ready", device=str(self.device), parallel=self.parallel, world_size=self.world, parameters=self.model.config.num_parameters(), start_step=self.start_step)

    def _place(self, ctx: llmos.JobContext) -> None:
        """This rank, its threads, its device and the seed."""
        p = ctx.params
        self.rank = ctx.rank
        self.world = p.world_size
        self.ranks: list[Any] = []
        self.distributed = False
        if self.world > 1:
            check_world(ctx, self.world, p.batch_size)
        set_threads(ctx, p.threads or max(1, int(ctx.resources.get("cpus") or 1) // self.world))
        self.device = pick_device(ctx, self.rank)
        torch.manual_seed(p.seed)

    def _load_source(self, ctx: llmos.JobContext) -> tuple[str | None, dict[str, Any]]:
        """The checkpoint to start from (``resume``, an earlier attempt's, or ``init_from``), its
        tokenizer and train state; (None, {}) for a model trained from scratch."""
        p = ctx.params
        self.resume_state: dict[str, torch.Tensor] | None = None
        self.start_step = 0
        self.out_dir = Path(p.output) if p.output else ctx.workdir / "checkpoint"
        # An earlier attempt of this job (killed, crashed, preempted) may have left a checkpoint:
        # continue from it. Only rank 0 looks; it hands the other ranks what it found.
        self.resume = p.resume
        self.resumed_from_attempt: int | None = None
        if self.rank == 0 and not p.resume and not p.init_from:
            found = self._earlier_attempt(ctx)
            if found is not None:
                self.resume, self.resumed_from_attempt = str(found[0]), found[1]
        source = self.resume or p.init_from
        if not source:
            self.tok = self._tokenizer(ctx)
            return None, {}
        # Weights load on the CPU: ddp moves them to the device below, fsdp shards them there.
        self.model, manifest = load_checkpoint(source, device="cpu")
        self.tok = load_tokenizer(source) if (Path(source) / "tokenizer.json").exists() else self._tokenizer(ctx)
        if self.resume:
            state_file = Path(self.resume) / "train_state.safetensors"
            if not state_file.exists():
                raise CheckpointError(f"{self.resume} has no train_state.safetensors: it cannot be resumed (use init_from to fine-tune from it)")
            from safetensors.torch import load_file

            self.resume_state = load_file(str(state_file))
            self.start_step = int(manifest.get("train_state", {}).get("step", 0))
        if self.resumed_from_attempt is not None:
            ctx.log.info("resumed_from_attempt", attempt=self.resumed_from_attempt, step=self.start_step, checkpoint=self.resume)
        return source, manifest

    def _read_corpus(self, ctx: llmos.JobContext) -> None:
        """Tokenize the corpus (cached), split it, and hash both splits for provenance."""
        p = ctx.params
        files = corpus_files(p.data, p.glob)
        if self.rank == 0:
            ctx.progress(0, p.steps, message=f"reading the corpus ({len(files)} files)")
        self.train_tokens, self.val_tokens, cached = tokenize_corpus(
            files, self.tok, cache_dir(), text_field=p.text_field, max_bytes=p.max_bytes, val_fraction=p.val_fraction
        )
        ctx.log.info("corpus_ready", files=len(files), train_tokens=len(self.train_tokens), val_tokens=len(self.val_tokens), cached=cached)
        # Provenance: exactly which tokens (both splits) and which tokenizer made the model.
        digest = hashlib.sha256(np.ascontiguousarray(self.train_tokens).tobytes())
        digest.update(np.ascontiguousarray(self.val_tokens).tobytes())
        self.data_hashes = {
            "files": len(files), "train_tokens": len(self.train_tokens), "val_tokens": len(self.val_tokens),
            "tokens_sha256": digest.hexdigest(), "tokenizer_sha256": hashlib.sha256(self.tok.to_json().encode()).hexdigest(),
        }
        self.last_good: Path | None = Path(self.resume) if self.resume else None
        if len(self.train_tokens) < p.seq_len + 2:
            raise ValueError(f"the corpus has {len(self.train_tokens)} training tokens, fewer than one sequence of {p.seq_len + 1}")
        if len(self.val_tokens) < p.seq_len + 2:
            raise ValueError(f"the validation split has {len(self.val_tokens)} tokens, fewer than one sequence of {p.seq_len + 1}; lower seq_len or raise val_fraction")

    def _build_model(self, ctx: llmos.JobContext, source: str | None, manifest: dict[str, Any]) -> None:
        """A fresh model (preset or config) unless one was loaded; check it fits the tokenizer
        and the sequence length; note the parent it came from."""
        p = ctx.params
        if not source:
            if p.config:
                config = config_from_dict(p.config, vocab_size=self.tok.vocab_size)
            else:
                config = config_from_preset(p.preset, self.tok.vocab_size, max_position_embeddings=max(p.seq_len, PRESETS[p.preset]["max_position_embeddings"]))
            if self.tok.eos_id is not None:
                config = type(config)(**{**asdict(config), "eos_token_id": self.tok.eos_id, "bos_token_id": self.tok.eos_id})
            self.model = Llama(config)
            self.model.init_weights(p.seed)
        if self.model.config.vocab_size < self.tok.vocab_size:
            raise ValueError(f"the model's vocabulary ({self.model.config.vocab_size}) is smaller than the tokenizer's ({self.tok.vocab_size})")
        if p.seq_len > self.model.config.max_position_embeddings:
            raise ValueError(f"seq_len {p.seq_len} is longer than the model's max_position_embeddings {self.model.config.max_position_embeddings}")
        # An automatic resume continues this job's own run: its provenance is the run's, not a parent's.
        self.parent = {"path": str(source), "sha256": manifest.get("model_sha256") or _maybe_hash(source)} if source and self.resumed_from_attempt is None else None

    def _distribute(self, ctx: llmos.JobContext) -> None:
        """Mixed precision, the parallel mode (ddp or fsdp), the process group; the model on its
        device (or sharded)."""
        self.amp = _amp_dtype(ctx.params.dtype, self.device)
        self.parallel = self._choose_parallel(ctx) if self.rank == 0 else ctx.params.parallel
        self.sharded = self.parallel == "fsdp"
        if self.world > 1 or self.sharded:
            self._init_distributed(ctx)
        if self.sharded:
            self._shard()
        else:
            self.model.to(self.device)

    def _make_optimizer(self, ctx: llmos.JobContext) -> None:
        """AdamW over what this rank holds (under fsdp, its shards), resumed if there is state."""
        p = ctx.params
        decay = [q for n, q in self.model.named_parameters() if q.dim() >= 2]
        no_decay = [q for n, q in self.model.named_parameters() if q.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=p.lr, betas=(0.9, 0.95), eps=1e-8, fused=False, foreach=False,
        )
        if self.resume_state is not None:
            if self.sharded:
                _load_sharded_optimizer_state(self.opt, self.model, self.resume_state)
            else:
                _load_optimizer_state(self.opt, self.model, self.resume_state)

    def _wrap(self, ctx: llmos.JobContext) -> None:
        """What the step calls: the model, compiled if asked, inside DDP across ranks."""
        self.forward = torch.compile(self.model) if ctx.params.compile else self.model
        if self.world > 1 and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(self.forward, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _earlier_attempt(self, ctx: llmos.JobContext) -> tuple[Path, int] | None:
        """The newest resumable checkpoint that an earlier attempt of this very job left in its
        output directory (the final one, written on cancel or preemption, or a periodic
        ``<output>-step<N>``), and that attempt's number."""
        if ctx.attempt <= 1:
            return None
        recipe = json.loads(json.dumps(asdict(ctx.params), default=str))
        name = re.compile(re.escape(self.out_dir.name) + r"(-step\d+)?")
        best: tuple[int, Path, int] | None = None
        parent = self.out_dir.parent
        for path in sorted(parent.iterdir()) if parent.is_dir() else []:
            if not name.fullmatch(path.name) or not (path / "train_state.safetensors").is_file():
                continue
            try:
                manifest = json.loads((path / "llmos.json").read_text())
                by, step = manifest["produced_by"], int(manifest["train_state"]["step"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if by.get("job_id") != ctx.job_id or not isinstance(by.get("attempt"), int) or by["attempt"] >= ctx.attempt:
                continue
            if manifest.get("recipe") != recipe:
                # Same job id, other parameters: another state directory's job, not an earlier try.
                ctx.log.warning("auto_resume_skipped", checkpoint=str(path), why="its recipe differs from this job's parameters")
                continue
            if best is None or step > best[0]:
                best = (step, path, by["attempt"])
        return (best[1], best[2]) if best else None

    def _choose_parallel(self, ctx: llmos.JobContext) -> str:
        """ddp or fsdp; ``auto`` is fsdp when the ranks are several and a full copy of the
        training state (16 bytes a parameter: fp32 weights, gradients, AdamW's two moments)
        would not fit in 80 % of one rank's device memory."""
        p = ctx.params
        if p.parallel != "auto":
            return str(p.parallel)
        need = 16 * self.model.config.num_parameters()
        have = _device_memory(ctx, self.device, self.world)
        choice = "fsdp" if self.world > 1 and have and need > 0.8 * have else "ddp"
        ctx.log.info("parallel_chosen", parallel=choice, state_bytes=need, device_bytes=have)
        return choice

    def _shard(self) -> None:
        """FSDP2: each decoder layer its own unit (all-gathered one at a time), then the root
        (embeddings, final norm, head). Parameters become DTensors sharded over the ranks;
        ``fully_shard`` moves each unit to the device as it shards it, so one rank never holds
        more than one layer unsharded on the device."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    # -- torch.distributed: rank 0 is this worker; it starts the others in its process group --

    def _init_distributed(self, ctx: llmos.JobContext) -> None:
        import datetime

        import torch.distributed as dist

        if self.rank == 0:
            # The kernel placed the ranks and picked the rendezvous address; a job without its plan
            # (one rank under fsdp, or a runner driven outside the kernel) takes a free port here.
            plan = ctx.distributed or {"master_addr": "127.0.0.1", "master_port": free_port()}
            os.environ.update(MASTER_ADDR=plan["master_addr"], MASTER_PORT=str(plan["master_port"]), WORLD_SIZE=str(self.world))
            tok_path = ctx.workdir / "tokenizer.json"
            tok_path.write_text(self.tok.to_json())
            # What rank 0 decided (an automatic resume, the parallel mode) the others do too.
            params = {**asdict(ctx.params), "tokenizer": str(tok_path), "resume": self.resume, "parallel": self.parallel}
            spec = {
                "params": params,
                "job_id": ctx.job_id, "kind": ctx.kind, "attempt": ctx.attempt,
                "resources": ctx.resources, "placement": ctx.placement, "workdir": str(ctx.workdir),
            }
            nodes = [r.get("node") for r in (ctx.distributed or {}).get("ranks", [])]
            for r in range(1, self.world):
                # LOCAL_RANK counts the ranks on the same node (a gang spread over a cluster's nodes).
                local = sum(1 for n in nodes[:r] if n == nodes[r]) if len(nodes) > r else r
                env = {
                    "RANK": str(r), "LOCAL_RANK": str(local), "LLMOS_RANK_SPEC": json.dumps(spec),
                    **{k: os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE") if k in os.environ},
                }
                # Each rank's own output goes to a file in the job's workdir: a failed rank's reason
                # is then in the job's error, not lost in rank 0's worker log. The kernel starts the
                # ranks its plan put on other nodes; the ones on this node are this worker's children.
                self.ranks.append(ctx.start_rank(r, ["-m", "llmos.plugins.lm.rank"], env, ctx.workdir / f"rank{r}.log"))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            rank=self.rank, world_size=self.world, timeout=datetime.timedelta(seconds=120),
        )
        self.distributed = True
        if self.rank == 0:
            ctx.log.info("distributed", backend=backend, world_size=self.world, parallel=self.parallel, master=f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")

    def _mean_across_ranks(self, value: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def _should_stop(self, ctx: llmos.JobContext) -> bool:
        if self.world == 1:
            return ctx.cancelled
        import torch.distributed as dist

        flag = torch.tensor([1.0 if ctx.cancelled else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def teardown(self, ctx: llmos.JobContext) -> None:
        ranks = getattr(self, "ranks", [])
        if getattr(self, "distributed", False):
            import torch.distributed as dist

            if dist.is_initialized():
                if getattr(self, "finished", False):
                    # A clean end: all ranks meet, the others leave first, and rank 0 (which holds the
                    # rendezvous store) closes its connections last, so no rank sees a peer vanish
                    # while it is still shutting down. After a failure, rank 0 closes at once instead:
                    # that breaks the others out of any collective they wait in.
                    try:
                        dist.barrier()
                    except Exception as exc:
                        ctx.log.warning("barrier_failed", error=str(exc))
                    _wait_all(ranks, timeout=60)
                dist.destroy_process_group()
        _wait_all(ranks, timeout=60)
        bad = [(r, p.returncode) for r, p in enumerate(ranks, start=1) if p.returncode]
        if bad:
            r = bad[0][0]
            raise RuntimeError(
                f"{len(bad)} of {self.world - 1} other ranks failed ({', '.join(f'rank {i}: {_exit_text(c)}' for i, c in bad)}); "
                f"rank {r} said: {_tail(ctx.workdir / f'rank{r}.log')}"
            )

    def _dead_rank(self, grace: float) -> tuple[int, int] | None:
        """The first other rank whose process has ended with a failure, waiting up to ``grace`` seconds."""
        deadline = time.monotonic() + grace
        while True:
            for r, proc in enumerate(self.ranks, start=1):
                if proc.poll() not in (None, 0):
                    return r, proc.returncode
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _tokenizer(self, ctx: llmos.JobContext) -> Tok:
        p = ctx.params
        if p.tokenizer == "bytes":
            return bytes_tokenizer()
        if p.tokenizer == "bpe":
            files = corpus_files(p.data, p.glob)
            budget = min(p.max_bytes, 20_000_000)
            key = hashlib.sha256(f"{files_signature(files)}|{p.text_field}|{budget}|{p.vocab_size}".encode()).hexdigest()[:24]
            cached = cache_dir().parent / "tokenizers" / f"{key}.json"
            if cached.exists():
                return load_tokenizer(cached)
            ctx.progress(0, p.steps, message=f"learning a {p.vocab_size}-token BPE vocabulary from the corpus")
            tok = train_bpe(documents(files, p.text_field, budget), p.vocab_size)
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(tok.to_json())
            tmp.replace(cached)
            return tok
        return load_tokenizer(p.tokenizer)

    def _save(self, ctx: llmos.JobContext, step: int, metrics: dict[str, Any], path: Path | None = None) -> Path:
        """Write a checkpoint (rank 0). Under fsdp every rank must call it: the full weights and
        optimizer state are gathered to rank 0 first, so the files are the same as ddp's."""
        p = ctx.params
        path = path or self.out_dir
        if self.rank and not self.sharded:
            return path
        weights, train_state = self._full_state()
        if self.rank:
            return path
        manifest = {
            "produced_by": {"job_id": ctx.job_id, "kind": ctx.kind, "attempt": ctx.attempt},
            "parent": self.parent,
            "recipe": asdict(p),
            "data": {
                "source": p.data, "glob": p.glob, "text_field": p.text_field, "max_bytes": p.max_bytes, "val_fraction": p.val_fraction,
                **self.data_hashes,
            },
            "metrics": metrics,
            "train_state": {"step": step, "parallel": self.parallel, "world_size": self.world},
        }
        save_checkpoint(path, weights, self.tok.to_json(), manifest, extra_state=train_state)
        ctx.artifact(path, kind="checkpoint", step=step, **{k: v for k, v in metrics.items() if isinstance(v, int | float)})
        if "stopped" not in metrics:
            self.last_good = path
        return path

    def _full_state(self) -> tuple[Any, dict[str, torch.Tensor]]:
        """The model to save and the flat train state (``opt/<param>/<field>``, ``rng/torch``)."""
        if not self.sharded:
            return self.model, _optimizer_state(self.opt, self.model)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets it all, the others nothing
        weights = get_model_state_dict(self.model, options=options)
        state: dict[str, torch.Tensor] = {}
        # Before the first step the optimizer has no state; gathering would make some (a step with
        # lr 0), and a resume from it would then differ from an uninterrupted run.
        if self.opt.state:
            gathered = get_optimizer_state_dict(self.model, self.opt, options=options)
            for name, fields in gathered.get("state", {}).items():
                for key, value in fields.items():
                    state[f"opt/{name}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        state["rng/torch"] = torch.get_rng_state()
        return _Weights(self.model.config, weights), state

    def run(self, ctx: llmos.JobContext) -> dict[str, Any]:
        try:
            result = self._run(ctx)
        except Exception as exc:
            # A collective that failed because another rank died says only "connection closed":
            # name the rank and what it printed instead. Errors every rank meets alike (a NaN loss,
            # bad input) keep their own words.
            broken = isinstance(exc, RuntimeError | OSError)
            dead = self._dead_rank(grace=2.0) if broken and self.rank == 0 and self.ranks else None
            if dead is not None:
                r, code = dead
                raise RuntimeError(f"rank {r} of {self.world} exited with {_exit_text(code)} during training; it said: {_tail(ctx.workdir / f'rank{r}.log')}") from exc
            raise
        self.finished = True  # every collective of the run is done on this rank: teardown may meet the others
        return result

    def _run(self, ctx: llmos.JobContext) -> dict[str, Any]:
        p = ctx.params
        model, opt = self.model, self.opt
        model.train()
        tokens_per_step = p.batch_size * p.seq_len * p.grad_accum
        step = self.start_step
        resumed = {"resumed_from_step": step if self.resume else None, "resumed_from_attempt": self.resumed_from_attempt}
        last_loss = float("nan")
        val_loss = None
        metrics: dict[str, Any] = {}
        # Rank 0 reports, evaluates and saves; under fsdp the others take part in evaluating and
        # saving (the weights are sharded over them) but still report nothing.
        leader, helps = self.rank == 0, self.rank == 0 or self.sharded

        def evaluated(at: int) -> float:
            """The validation loss now; the leader records it as a point on the validation curve."""
            loss = evaluate(model, self.val_tokens, p.seq_len, p.eval_batches, p.batch_size, self.device, self.amp)
            if leader:
                ctx.metric("val_loss", loss, step=at)
                ctx.metric("val_perplexity", math.exp(min(loss, 50)), step=at)
                ctx.log.info("evaluated", step=at, val_loss=round(loss, 4), val_perplexity=round(math.exp(min(loss, 50)), 2))
            return loss

        t0 = time.perf_counter()
        window_t, window_tokens = time.perf_counter(), 0
        ctx.progress(step, p.steps, message="starting", parameters=self.model.config.num_parameters())
        while step < p.steps:
            if self._should_stop(ctx):
                # Cancelled or preempted: either way save where the run is. A preempted job starts
                # again with the same workdir, and its next attempt resumes from this checkpoint.
                stopped = "preempted" if ctx.preempted else "cancelled"
                path = self._save(ctx, step, {"train_loss": last_loss, "val_loss": val_loss, "stopped": stopped})
                if self.rank:
                    return {"steps": step, "cancelled": True}
                ctx.log.info(f"{stopped}_checkpoint_saved", step=step, checkpoint=str(path))
                return {"checkpoint": str(path), "steps": step, "cancelled": True, "stopped": stopped, **resumed}
            step += 1
            lr = lr_at(step, p)
            for group in opt.param_groups:
                group["lr"] = lr
            total = 0.0
            for micro in range(p.grad_accum):
                x, y = batch_at(self.train_tokens, step * p.grad_accum + micro, p.seed, p.batch_size, p.seq_len)
                if self.world > 1:  # every rank draws the global batch and takes its share
                    share = p.batch_size // self.world
                    x, y = x[self.rank * share : (self.rank + 1) * share], y[self.rank * share : (self.rank + 1) * share]
                x, y = x.to(self.device), y.to(self.device)
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    logits = self.forward(x)
                loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1)) / p.grad_accum
                loss.backward()
                total += loss.item()
            if self.world > 1:
                total = self._mean_across_ranks(total)
            if not math.isfinite(total):
                good = self.last_good  # this run's newest checkpoint (or the one it resumed from)
                raise FloatingPointError(f"the loss became {total} at step {step}; last good checkpoint: {good or 'none (no checkpoint yet)'}")
            if p.grad_clip > 0:
                # Under fsdp the gradients are DTensor shards: the norm is reduced over the ranks.
                torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            last_loss = total
            window_tokens += tokens_per_step
            if leader:
                ctx.metric("train_loss", total, step=step)
            if leader and (step % p.log_every == 0 or step == p.steps):
                now = time.perf_counter()
                tps = window_tokens / max(now - window_t, 1e-9)
                window_t, window_tokens = now, 0
                eta = (p.steps - step) * tokens_per_step / max(tps, 1e-9)
                ctx.progress(step, p.steps, loss=round(total, 4), lr=lr, tokens_per_s=round(tps, 1), eta_s=round(eta, 1))
            if helps and p.eval_every and (step % p.eval_every == 0 or step == p.steps):
                val_loss = evaluated(step)
            if helps and p.checkpoint_every and step % p.checkpoint_every == 0 and step != p.steps:
                # Periodic checkpoints sit beside the final one: <output>-step<N>.
                self._save(ctx, step, {"train_loss": total, "val_loss": val_loss}, self.out_dir.with_name(f"{self.out_dir.name}-step{step}"))
        if not helps:
            return {"steps": step}
        if val_loss is None or not p.eval_every:
            val_loss = evaluated(step)  # the final evaluation is a point on the curve too
        elapsed = time.perf_counter() - t0
        trained = (step - self.start_step) * tokens_per_step
        metrics = {"train_loss": last_loss, "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50)), "tokens": trained, "tokens_per_s": trained / max(elapsed, 1e-9)}
        path = self._save(ctx, step, metrics)
        if self.rank:
            return {"steps": step}
        return {"checkpoint": str(path), "steps": step, "parameters": self.model.config.num_parameters(), "parallel": self.parallel, **resumed, **metrics}


def check_world(ctx: llmos.JobContext, world: int, batch_size: int) -> None:
    """A world_size the job's devices can hold, and a global batch it divides."""
    if ctx.gpus:
        if world > len(ctx.gpus):
            raise ValueError(f"world_size {world} is larger than the {len(ctx.gpus)} GPU(s) granted; ask for --gpus {world}")
    else:
        cpus = float(ctx.resources.get("cpus") or 0)
        if world > max(1, int(cpus)):
            raise ValueError(f"world_size {world} is larger than the {cpus:g} CPU core(s) granted; ask for cpus >= {world}")
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} (the global batch) must be a multiple of world_size {world}")


def _wait_all(procs: list[Any], timeout: float) -> None:
    """Wait for the other ranks' processes, killing any still running after ``timeout`` seconds."""
    import subprocess

    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _exit_text(code: int) -> str:
    """'exit code 1' or 'signal SIGKILL' for a subprocess return code."""
    import signal

    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _tail(path: Path, limit: int = 1500) -> str:
    """The last lines of a rank's output, for the job's error ("(no output)" when there is none)."""
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return "(no output)"
    text = data.decode("utf-8", "replace").strip()
    return text or "(no output)"


__all__ = ["TrainRunner", "batch_at", "cache_dir", "check_world", "load_for_job", "lr_at", "pick_device", "set_threads", "tokenizer_beside"]
