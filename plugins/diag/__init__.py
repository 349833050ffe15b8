"""diag: job kinds for tests, benchmarks and checking an install.

``diag.sleep`` sleeps, ``diag.echo`` returns its parameters, ``diag.fail`` raises,
``diag.crash`` kills its own worker with SIGKILL, ``diag.emit`` sends progress events and log
records in order, ``diag.devices`` reports the devices the job was given, ``diag.artifact``
writes a small "model" directory from its inputs and announces it as a checkpoint (for pipeline
and artifact tests without torch), ``diag.alloc`` allocates and touches memory and holds it (for
memory-limit tests).
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llmos
from llmos import JobContext, JobKind, Resources, Runner, param

LLMOS_API = ">=1,<2"

# diag jobs barely use a CPU: let many run at once.
_LIGHT = Resources(cpus=0.0)


@dataclass(frozen=True)
class SleepParams:
    seconds: float = param(1.0, ge=0, le=7 * 86400, help="How long to sleep; a cancel wakes it early.")


@dataclass(frozen=True)
class EchoParams:
    data: Any = param(None, help="Any JSON value; the result is the parameters themselves.")
    message: str = param("", help="A string to echo.")


@dataclass(frozen=True)
class FailParams:
    message: str = param("diag.fail was asked to fail", help="The error message the runner raises.")


@dataclass(frozen=True)
class CrashParams:
    delay: float = param(0.0, ge=0, le=3600, help="Seconds to wait before the worker kills itself.")


@dataclass(frozen=True)
class EmitParams:
    count: int = param(10, ge=0, le=10_000_000, help="How many progress events and log records to send.")
    payload: int = param(0, ge=0, le=1_000_000, help="Extra bytes of text in each log record.")
    only: str = param("both", choices=("both", "progress", "log"), help="Send both kinds, or only one.")


@dataclass(frozen=True)
class AllocParams:
    bytes: int = param(64 << 20, ge=0, le=1 << 40, help="How many bytes to allocate, every page written so that they are resident.")
    hold: float = param(0.0, ge=0, le=7 * 86400, help="Seconds to hold them before returning; a cancel ends it early.")
    chunk: int = param(16 << 20, ge=4096, le=1 << 30, help="Bytes per allocation (a cancel is noticed between chunks).")


@dataclass(frozen=True)
class DevicesParams:
    torch: bool = param(False, help="Also import torch and report the CUDA devices it sees (slow: seconds).")
    world_size: int = param(1, ge=1, le=64, help="Ranks to place as one gang (the kernel's rank plan is in the result); the job itself runs rank 0 only.")


@dataclass(frozen=True)
class ArtifactParams:
    text: str = param("weights", help="What the artifact's weights file holds.")
    inputs: list[str] = param(default_factory=list, path=True, help="Artifacts (paths, artifact:ID, job:ID) whose weights are joined into this one.")
    seconds: float = param(0.0, ge=0, le=3600, help="Seconds to work before writing (a cancel stops it).")
    reject: bool = param(False, help="Mark the output rejected by a quality gate and fail, as a compression job whose gate fails does.")
    output: str | None = param(None, path=True, help="Where to write it (default: the job's own folder).")
    allow_rejected: bool = param(False, help="Accept inputs a quality gate rejected.")


class ArtifactRunner(Runner):
    def run(self, ctx: JobContext) -> dict[str, Any]:
        p = ctx.params
        deadline = time.monotonic() + p.seconds
        while time.monotonic() < deadline:
            if ctx.cancelled:
                raise llmos.JobCancelled("cancelled")
            time.sleep(0.02)
        parts = [Path(i, "weights.txt").read_text() for i in p.inputs] + [p.text]
        out = p.output or str(ctx.workdir / "model")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "weights.txt"), "w") as f:
            f.write("+".join(parts))
        manifest: dict[str, Any] = {"produced_by": {"job_id": ctx.job_id, "kind": ctx.kind}, "parents": list(p.inputs), "data": {"source": "diag"}}
        if p.reject:
            manifest["rejected"] = {"reason": "diag.artifact was asked to be rejected", "at": time.time()}
        with open(os.path.join(out, "llmos.json"), "w") as f:
            json.dump(manifest, f)
        ctx.artifact(out, kind="checkpoint")
        if p.reject:
            raise RuntimeError("the quality gate rejected the output (diag.artifact reject=true)")
        return {"checkpoint": out, "text": "+".join(parts)}


class SleepRunner(Runner):
    def run(self, ctx: JobContext) -> dict[str, Any]:
        seconds = ctx.params.seconds
        ctx.log.info("sleeping", seconds=seconds)
        woke = ctx.sleep(seconds)
        return {"slept": seconds, "cancelled": woke}


class EchoRunner(Runner):
    def run(self, ctx: JobContext) -> dict[str, Any]:
        return {"data": ctx.params.data, "message": ctx.params.message}


class FailRunner(Runner):
    def run(self, ctx: JobContext) -> None:
        raise RuntimeError(ctx.params.message)


class CrashRunner(Runner):
    def run(self, ctx: JobContext) -> None:
        if ctx.params.delay:
            ctx.sleep(ctx.params.delay)
        os.kill(os.getpid(), signal.SIGKILL)


class EmitRunner(Runner):
    def run(self, ctx: JobContext) -> dict[str, int]:
        count, pad = ctx.params.count, "x" * ctx.params.payload
        send_progress = ctx.params.only in ("both", "progress")
        send_log = ctx.params.only in ("both", "log")
        for i in range(1, count + 1):
            if send_progress:
                ctx.progress(i, count)
            if send_log:
                if pad:
                    ctx.log.info("emit", i=i, pad=pad)
                else:
                    ctx.log.info("emit", i=i)
        return {"count": count}


class AllocRunner(Runner):
    """Memory that really is used: each chunk's pages are written (one byte in every 4096), so the
    process's resident size grows by what it allocates."""

    def run(self, ctx: JobContext) -> dict[str, Any]:
        total, chunk = ctx.params.bytes, ctx.params.chunk
        held: list[bytearray] = []
        done = 0
        while done < total:
            if ctx.cancelled:
                raise llmos.JobCancelled("cancelled")
            size = min(chunk, total - done)
            block = bytearray(size)
            block[::4096] = b"\x01" * len(range(0, size, 4096))
            held.append(block)
            done += size
            ctx.progress(done, total, message="allocating")
        ctx.log.info("allocated", bytes=done)
        woke = ctx.sleep(ctx.params.hold) if ctx.params.hold else False
        if woke:
            raise llmos.JobCancelled("cancelled")
        return {"allocated": done, "held": ctx.params.hold}


class DevicesRunner(Runner):
    def run(self, ctx: JobContext) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pid": os.getpid(),
            "gpus": ctx.gpus,
            "placement": ctx.placement,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cuda_device_order": os.environ.get("CUDA_DEVICE_ORDER"),
            "node": os.environ.get("LLMOS_NODE"),  # where it really runs, as its cluster says (Ray backend)
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "distributed": ctx.distributed,
            "rank_env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")},
        }
        if ctx.params.torch:
            import torch  # only here: the kernel and the diag plugin's import stay torch-free

            out["torch"] = {
                "version": torch.__version__,
                "cuda_available": torch.cuda.is_available(),
                "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            }
        return out


KINDS = [
    JobKind("diag.sleep", runner=SleepRunner, params=SleepParams, resources=_LIGHT, help="Sleep for `seconds` (wakes on cancel)."),
    JobKind("diag.echo", runner=EchoRunner, params=EchoParams, resources=_LIGHT, help="Return the parameters as the result."),
    JobKind("diag.fail", runner=FailRunner, params=FailParams, resources=_LIGHT, help="Raise RuntimeError(message)."),
    JobKind("diag.crash", runner=CrashRunner, params=CrashParams, resources=_LIGHT, help="Kill the worker with SIGKILL."),
    JobKind("diag.devices", runner=DevicesRunner, params=DevicesParams, resources=_LIGHT, ranks="world_size",
            help="Report the devices this job was given (and, with torch=true, what torch sees)."),
    JobKind("diag.artifact", runner=ArtifactRunner, params=ArtifactParams, resources=_LIGHT, help="Write a tiny model directory from its inputs and announce it as a checkpoint."),
    JobKind("diag.alloc", runner=AllocRunner, params=AllocParams, resources=_LIGHT,
            help="Allocate `bytes` (every page touched) and hold them `hold` seconds (for memory-limit tests)."),
    JobKind("diag.emit", runner=EmitRunner, params=EmitParams, resources=_LIGHT, help="Send `count` progress events and `count` log records, in order."),
]


@llmos.hookimpl
def llmos_register_job_kinds(register) -> None:  # type: ignore[no-untyped-def]
    for kind in KINDS:
        register(kind)


__all__ = ["KINDS", "llmos_register_job_kinds"]
