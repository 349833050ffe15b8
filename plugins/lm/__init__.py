"""lm: Llama-family language models — the ``train`` and ``eval`` jobs, their CLI commands, and
the loader for Hugging Face-style Llama checkpoints.

This module stays light (no torch): the kernel imports it to validate parameters. The runners
live in :mod:`llmos.plugins.lm.train` and run in workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import llmos
from llmos import JobKind, Resources, ServiceKind, param
from llmos.plugins.lm.config import PRESETS, config_from_dict
from llmos.units import parse_size

LLMOS_API = ">=1,<2"


@dataclass(frozen=True)
class TrainParams:
    data: str = param(help="A text file, a directory of them (see glob), a .jsonl file (see text_field), or 'stdlib'.", path=("stdlib",))
    glob: str = param("**/*.txt", help="Which files of a data directory to read.")
    text_field: str = param("text", help="The field holding the text in JSON-lines data.")
    max_bytes: int = param(10_000_000, ge=1, help="Read at most this many characters of the corpus.")
    val_fraction: float = param(0.05, gt=0, lt=1, help="The share of the corpus held out for validation.")
    preset: str = param(
        "nano", choices=tuple(PRESETS),
        help="The model shape (ignored with config or init_from): nano (<1M parameters), micro (~10M with a 10k vocabulary), small (~125M with 32k), or a common model's.",
    )
    config: dict[str, Any] | None = param(None, help="A full model config (Hugging Face field names) instead of a preset.")
    tokenizer: str = param("bpe", help="'bpe' (learned from the corpus), 'bytes', or a path to a tokenizer.json.", path=("bpe", "bytes"))
    vocab_size: int = param(2048, ge=258, le=262_144, help="The vocabulary size of a learned BPE tokenizer.")
    steps: int = param(100, ge=1, le=100_000_000, help="Optimizer steps.")
    batch_size: int = param(8, ge=1, le=65_536, help="Sequences per micro-batch.")
    seq_len: int = param(128, ge=8, le=1_048_576, help="Tokens per sequence.")
    grad_accum: int = param(1, ge=1, le=4096, help="Micro-batches per optimizer step.")
    lr: float = param(3e-3, gt=0, le=1, help="Peak learning rate (AdamW).")
    min_lr_ratio: float = param(0.1, ge=0, le=1, help="The cosine decay ends at lr * min_lr_ratio.")
    warmup_steps: int = param(10, ge=0, help="Steps of linear warmup.")
    weight_decay: float = param(0.1, ge=0, help="AdamW weight decay (matrices only).")
    grad_clip: float = param(1.0, ge=0, help="Clip the gradient norm to this (0: no clipping).")
    seed: int = param(0, ge=0, help="Seeds the weights and the data order.")
    dtype: Literal["auto", "float32", "bfloat16"] = param("auto", help="Autocast: auto is bfloat16 on GPUs that support it, else float32.")
    compile: bool = param(False, help="Run the model through torch.compile.")
    log_every: int = param(10, ge=1, help="A progress event every this many steps.")
    eval_every: int = param(50, ge=0, help="Validation loss every this many steps (0: only at the end).")
    eval_batches: int = param(8, ge=1, help="Batches of validation per evaluation.")
    checkpoint_every: int = param(0, ge=0, help="A checkpoint every this many steps (0: only at the end).")
    init_from: str | None = param(None, help="Start from this checkpoint's weights (fine-tuning).", path=True)
    resume: str | None = param(
        None,
        help="Continue this checkpoint's run exactly (weights, optimizer, data order). Without it (and init_from), a retried "
        "or preempted attempt resumes from the newest checkpoint an earlier attempt of the same job left in its output.",
        path=True,
    )
    output: str | None = param(None, help="Where to write the checkpoint (default: the job's directory).", path=True)
    threads: int = param(0, ge=0, le=1024, help="Torch CPU threads per rank (0: the job's reserved cpus / world_size).")
    world_size: int = param(1, ge=1, le=1024, help="Ranks under torch.distributed (gloo on CPU, NCCL on GPUs); batch_size is the global batch.")
    parallel: Literal["ddp", "fsdp", "auto"] = param(
        "ddp",
        help="ddp: every rank holds the whole model. fsdp: weights, gradients and optimizer state sharded over the ranks "
        "(FSDP2; for models that do not fit one device; world_size 1 runs the same path on one rank). "
        "auto: fsdp when 16 bytes a parameter exceed 80% of one rank's memory.",
    )


@dataclass(frozen=True)
class EvalParams:
    model: str = param(help="A checkpoint directory.", path=True)
    data: str | None = param(None, help="A corpus (as for train), or none for the one the model was trained on.", path=("stdlib",))
    glob: str | None = param(None, help="Which files of a data directory to read.")
    split: Literal["validation", "all"] = param("validation", help="The held-out split, or the whole corpus.")
    max_bytes: int = param(50_000_000, ge=1, help="Read at most this many characters of another corpus (the model's own is read as training read it).")
    text_field: str | None = param(None, help="The field holding the text in JSON-lines data (default: the model's record, else 'text').")
    seq_len: int = param(128, ge=8, help="Tokens per window.")
    batch_size: int = param(8, ge=1, help="Windows per batch.")
    batches: int = param(16, ge=1, help="Batches to average over.")
    prompts: list[str] = param(default_factory=lambda: ["def ", "import "], help="Prompts for greedy samples.")
    max_new_tokens: int = param(32, ge=0, le=4096, help="Tokens per sample.")
    threads: int = param(0, ge=0, le=1024, help="Torch CPU threads (0: the job's reserved cpus).")
    allow_rejected: bool = param(False, help="Use a checkpoint that a compression job's quality gate rejected (its llmos.json says why).")




@dataclass(frozen=True)
class EvalSample:
    prompt: str
    completion: str


@dataclass(frozen=True)
class EvalResult:
    """What an ``eval`` job returns (as a map: ``asdict``), and how other jobs and SDK users read it
    back: ``EvalResult.from_dict(job.result())``. Pruning and quantization jobs report their
    models' quality in these terms."""

    model: str
    split: Literal["validation", "all"]
    loss: float  # mean cross-entropy per token, in nats
    perplexity: float
    tokens: int  # tokens scored: the windows' predicted tokens, each counted once per window
    samples: list[EvalSample]
    split_tokens: int = 0  # the split's size, the tokens the windows were drawn from

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        return cls(**{**data, "samples": [EvalSample(**s) for s in data.get("samples", [])]})


@dataclass(frozen=True)
class GenerateParams:
    model: str = param(help="A checkpoint directory.", path=True)
    prompts: list[str] | None = param(None, help="Prompts to complete.")
    prompts_file: str | None = param(None, help="A JSON-lines file of prompts (see prompt_field).", path=True)
    prompt_field: str = param("prompt", help="The field of a prompts_file line that holds the prompt.")
    output: str | None = param(None, help="Where to write the completions (JSON lines; default: the job's directory).", path=True)
    max_new_tokens: int = param(64, ge=0, le=1_000_000, help="Tokens to generate at most.")
    temperature: float | None = param(None, ge=0, le=100, help="0 is greedy (default: the model's generation_config.json, else 1.0).")
    top_k: int | None = param(None, ge=0, help="Keep the k most likely tokens (0: all; default: the model's generation_config.json, else 0).")
    top_p: float | None = param(None, gt=0, le=1, help="Keep the smallest set of tokens whose probability reaches p (default: generation_config.json, else 1.0).")
    repetition_penalty: float | None = param(None, gt=0, le=100, help="Above 1 discourages repeating tokens already seen (default: generation_config.json, else 1.0).")
    seed: int | None = param(None, ge=0, help="Make sampling repeatable.")
    stop: list[str] = param(default_factory=list, help="Stop at any of these strings (not included).")
    stop_tokens: list[int] = param(default_factory=list, help="Stop at any of these token ids.")
    dtype: Literal["float32", "bfloat16", "float16"] = param("float32", help="The weights' type while generating.")
    batch_size: int = param(8, ge=1, le=4096, help="Prompts decoded together.")
    stream: bool = param(False, help="Also send every text piece as a job.<id>.token event.")
    threads: int = param(0, ge=0, le=1024, help="Torch CPU threads (0: the job's reserved cpus).")
    allow_rejected: bool = param(False, help="Use a checkpoint that a compression job's quality gate rejected (its llmos.json says why).")


@dataclass(frozen=True)
class ServeParams:
    model: str = param(help="A checkpoint directory.", path=True)
    name: str | None = param(None, help="The service name (default: the checkpoint directory's name).")
    max_seqs: int = param(16, ge=1, le=4096, help="Sequences decoded together (continuous batching).")
    max_len: int = param(1024, ge=2, help="Tokens per sequence the KV cache holds (prompt and completion).")
    max_queue: int = param(64, ge=0, le=100_000, help="Requests that may wait for a slot; past that, 'busy'.")
    dtype: Literal["float32", "bfloat16", "float16"] = param("float32", help="The weights' type.")
    threads: int = param(0, ge=0, le=1024, help="Torch CPU threads (0: the job's reserved cpus).")
    kv_memory: int | str = param(
        0,
        help="The KV cache's budget: bytes, or a size such as 2GiB. 0: max_seqs x max_len tokens, whatever that takes; "
        "with a budget, each sequence holds as many tokens (at most max_len) as max_seqs sequences fit in it.",
    )
    allow_rejected: bool = param(False, help="Use a checkpoint that a compression job's quality gate rejected (its llmos.json says why).")


def check_serve(p: ServeParams) -> None:
    _check_model(p.model)
    _check_rejected(p.model, p.allow_rejected)
    try:
        parse_size(p.kv_memory)
    except ValueError as exc:
        raise ValueError(f"kv_memory: {exc}") from None


def check_generate(p: GenerateParams) -> None:
    _check_model(p.model)
    _check_rejected(p.model, p.allow_rejected)
    if p.prompts_file is not None and not Path(p.prompts_file).expanduser().is_file():
        raise ValueError(f"prompts_file {p.prompts_file} does not exist")
    if not p.prompts and p.prompts_file is None:
        raise ValueError("no prompts: give prompts or prompts_file")


def _check_data(data: str | None) -> None:
    if data is not None and data != "stdlib" and not Path(data).expanduser().exists():
        raise ValueError(f"data path {data} does not exist (give a file, a directory, or 'stdlib')")


def _check_model(path: str) -> None:
    """A model to run exists. Its format is the business of the ``llmos_load_model`` hook, in the
    worker: this plugin loads checkpoint directories, other plugins may load other files."""
    where = Path(path).expanduser()
    if not where.exists():
        raise ValueError(f"model {path} does not exist (give a checkpoint directory, or job:ID for a job's checkpoint)")
    if where.is_dir():
        # A folder is a checkpoint (this plugin's format, and transformers'): say what it lacks.
        missing = [name for name, ok in (("config.json", (where / "config.json").is_file()),
                                        ("model.safetensors", any(where.glob("*.safetensors")))) if not ok]
        if missing:
            raise ValueError(f"{path} is not a checkpoint: it has no {' and no '.join(missing)} "
                             "(a checkpoint folder holds config.json, model.safetensors and tokenizer.json, as `llmos train` writes)")


def _check_rejected(path: str, allow: bool) -> None:
    """A checkpoint a quality gate rejected (``rejected`` in its llmos.json, written by the
    compress plugin's jobs) is refused unless the caller allows it."""
    import json

    try:
        manifest = json.loads((Path(path).expanduser() / "llmos.json").read_text())
    except (OSError, ValueError):
        return
    rejected = manifest.get("rejected") if isinstance(manifest, dict) else None
    if rejected and not allow:
        why = rejected.get("reason", "rejected") if isinstance(rejected, dict) else str(rejected)
        raise ValueError(f"model {path} was rejected by its quality gate ({why}); pass allow_rejected=true to use it anyway")


def _check_checkpoint(path: str | None, what: str) -> None:
    if path is not None and not (Path(path).expanduser() / "config.json").is_file():
        raise ValueError(f"{what} {path} is not a checkpoint directory (no config.json)")


def check_train(p: TrainParams) -> None:
    """What can be known at submit: the data exists, the shape is sound, checkpoints are checkpoints."""
    _check_data(p.data)
    if p.config is not None:
        config_from_dict(p.config, vocab_size=p.config.get("vocab_size", p.vocab_size))
    if p.batch_size % p.world_size:
        raise ValueError(f"batch_size {p.batch_size} (the global batch) must be a multiple of world_size {p.world_size}")
    if p.init_from and p.resume:
        raise ValueError("give init_from (fine-tune) or resume (continue), not both")
    _check_checkpoint(p.init_from, "init_from")
    _check_checkpoint(p.resume, "resume")
    if p.tokenizer not in ("bpe", "bytes") and not Path(p.tokenizer).expanduser().exists():
        raise ValueError(f"tokenizer {p.tokenizer} is neither 'bpe', 'bytes' nor an existing tokenizer.json")


def check_eval(p: EvalParams) -> None:
    _check_model(p.model)
    _check_rejected(p.model, p.allow_rejected)
    _check_data(p.data)


@llmos.hookimpl
def llmos_register_job_kinds(register) -> None:  # type: ignore[no-untyped-def]
    register(JobKind("train", runner="llmos.plugins.lm.train:TrainRunner", params=TrainParams, resources=Resources(cpus=1), help="Train a Llama-style model from text.", check=check_train, preemptible=True, ranks="world_size"))
    register(JobKind("eval", runner="llmos.plugins.lm.eval:EvalRunner", params=EvalParams, resources=Resources(cpus=1), help="Perplexity and greedy samples of a checkpoint.", check=check_eval))
    register(JobKind("generate", runner="llmos.plugins.lm.generate:GenerateRunner", params=GenerateParams, resources=Resources(cpus=1), help="Complete prompts with a checkpoint (KV cache, batched).", check=check_generate))


@llmos.hookimpl
def llmos_register_services(register) -> None:  # type: ignore[no-untyped-def]
    register(ServiceKind("serve", runner="llmos.plugins.lm.serve:ServeRunner", params=ServeParams, resources=Resources(cpus=1), help="Serve a checkpoint: generation requests with continuous batching and streaming.", check=check_serve))


@llmos.hookimpl
def llmos_load_model(path: str, device: Any, dtype: Any) -> Any:
    from pathlib import Path

    if not (Path(path) / "config.json").is_file():
        return None
    from llmos.plugins.lm.checkpoint import load_checkpoint

    model, _ = load_checkpoint(path, device=device or "cpu", dtype=dtype)
    return model


@llmos.hookimpl
def llmos_register_commands(register) -> None:  # type: ignore[no-untyped-def]
    from llmos.plugins.lm.cli import (
        eval_command,
        generate_command,
        serve_command,
        services_command,
        train_command,
    )

    for command in (train_command, eval_command, generate_command, serve_command, services_command):
        register(command)
