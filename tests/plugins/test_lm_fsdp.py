"""train with parallel=fsdp through a real kernel: the same losses as ddp, full checkpoints, exact resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import llmos
from tests.conftest import KernelHandle, wait_for_gpu_probe, write_word_corpus

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from llmos.plugins.lm import TrainParams  # noqa: E402
from llmos.plugins.lm.checkpoint import load_checkpoint  # noqa: E402
from llmos.plugins.lm.config import config_from_preset  # noqa: E402
from llmos.plugins.lm.model import Llama  # noqa: E402
from llmos.plugins.lm.train import TrainRunner  # noqa: E402

SMALL = dict(preset="nano", tokenizer="bytes", seq_len=32, batch_size=8, lr=3e-3, warmup_steps=2, eval_batches=2, log_every=4, threads=1)
TOL = 1e-4  # what 1 vs 2 ranks of ddp agree to: the same sums, taken in another order


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_word_corpus(tmp_path_factory.mktemp("corpus"), 20)


@pytest.fixture(scope="module")
def run_ids(kernel: KernelHandle, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """The same 8 steps (eval and a checkpoint every 4) under ddp on 2 ranks and fsdp on 2 ranks."""
    out = tmp_path_factory.mktemp("runs")
    base = dict(SMALL, data=str(corpus), steps=8, eval_every=4, checkpoint_every=4)
    with kernel.client() as c:
        jobs = {
            "ddp": c.submit("train", params=dict(base, world_size=2, output=str(out / "ddp")), resources={"cpus": 2}),
            "fsdp": c.submit("train", params=dict(base, world_size=2, parallel="fsdp", output=str(out / "fsdp")), resources={"cpus": 2}),
        }
        for name, job in jobs.items():
            info = job.wait(timeout=300)
            assert info.state == "succeeded", f"{name}: {info.reason}"
        return {name: job.id for name, job in jobs.items()}


@pytest.fixture
def runs(client: llmos.Client, run_ids: dict[str, int]) -> dict[str, llmos.Job]:
    return {name: client.job(job_id) for name, job_id in run_ids.items()}


def _metric(job: llmos.Job, name: str = "train_loss") -> dict[int, float]:
    return {e.body["step"]: e.body["value"] for e in job.events(follow=False) if e.type == "job.metric" and e.body["name"] == name}


def _close(a: dict[int, float], b: dict[int, float], tol: float = TOL) -> None:
    assert sorted(a) == sorted(b)
    assert max(abs(a[s] - b[s]) for s in a) < tol, (a, b)


@pytest.mark.timeout(300)
def test_fsdp_matches_ddp_in_training_and_evaluation(runs: dict[str, llmos.Job]) -> None:
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    _close(_metric(ddp), _metric(fsdp))  # gradient clipping (grad_clip=1.0) acts in the first steps
    _close(_metric(ddp, "val_loss"), _metric(fsdp, "val_loss"))
    assert sorted(_metric(fsdp, "val_loss")) == [4, 8]  # evaluated while sharded
    result = fsdp.result(timeout=10)
    assert result["parallel"] == "fsdp" and result["steps"] == 8 and result["resumed_from_step"] is None
    logs = [e.body["fields"] for e in fsdp.logs(follow=False) if e.body["event"] == "distributed"]
    assert logs == [{**logs[0], "parallel": "fsdp", "world_size": 2, "backend": "gloo"}]


@pytest.mark.timeout(300)
def test_fsdp_checkpoints_are_full_and_hf_shaped(runs: dict[str, llmos.Job]) -> None:
    for step_dir in ("", "-step4"):
        a = Path(runs["ddp"].result(timeout=10)["checkpoint"] + step_dir)
        b = Path(runs["fsdp"].result(timeout=10)["checkpoint"] + step_dir)
        wa, wb = safetensors_torch.load_file(str(a / "model.safetensors")), safetensors_torch.load_file(str(b / "model.safetensors"))
        assert sorted(wa) == sorted(wb) and all(wa[k].shape == wb[k].shape for k in wa)  # whole tensors, not shards
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
        sa, sb = safetensors_torch.load_file(str(a / "train_state.safetensors")), safetensors_torch.load_file(str(b / "train_state.safetensors"))
        assert sorted(sa) == sorted(sb) and all(sa[k].shape == sb[k].shape for k in sa)
        assert any(k.endswith("/exp_avg_sq") for k in sb)
        manifest = json.loads((b / "llmos.json").read_text())
        assert manifest["train_state"]["parallel"] == "fsdp" and manifest["produced_by"]["job_id"] == runs["fsdp"].id
        model, _ = load_checkpoint(b)  # an ordinary single-process model
        assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, model.config.vocab_size)
    assert sorted(p.name for p in b.parent.iterdir() if p.name.startswith("fsdp")) == ["fsdp", "fsdp-step4"]  # no shards, no temporaries


@pytest.mark.timeout(300)
def test_fsdp_resume_continues_exactly(client: llmos.Client, runs: dict[str, llmos.Job], corpus: Path, tmp_path: Path) -> None:
    middle = Path(runs["fsdp"].result(timeout=10)["checkpoint"] + "-step4")
    base = dict(SMALL, data=str(corpus), steps=8, eval_every=4, checkpoint_every=4, world_size=2)
    resumed = client.submit("train", params=dict(base, parallel="fsdp", resume=str(middle), output=str(tmp_path / "r")), resources={"cpus": 2})
    # A ddp checkpoint resumes under fsdp too: the files are the same format.
    crossed = client.submit("train", params=dict(base, parallel="fsdp", resume=str(Path(runs["ddp"].result(timeout=10)["checkpoint"] + "-step4")), output=str(tmp_path / "x")), resources={"cpus": 2})
    for job in (resumed, crossed):
        info = job.wait(timeout=300)
        assert info.state == "succeeded", info.reason
    expected, got = _metric(runs["fsdp"]), _metric(resumed)
    assert sorted(got) == [5, 6, 7, 8]
    assert [got[s] for s in got] == [expected[s] for s in got]  # exactly: the same shards, the same sums
    assert resumed.result(timeout=10)["resumed_from_step"] == 4
    assert _metric(resumed, "val_loss")[8] == _metric(runs["fsdp"], "val_loss")[8]
    _close({s: v for s, v in _metric(runs["ddp"]).items() if s > 4}, _metric(crossed))


@pytest.mark.timeout(300)
def test_fsdp_attempt_killed_mid_run_resumes_on_all_ranks(client: llmos.Client, corpus: Path, tmp_path: Path) -> None:
    base = dict(SMALL, data=str(corpus), steps=24, eval_every=0, checkpoint_every=4, world_size=2, parallel="fsdp")
    straight = client.submit("train", params=dict(base, output=str(tmp_path / "straight")), resources={"cpus": 2})
    expected = straight.result(timeout=300)
    job = client.submit("train", params=base, resources={"cpus": 2}, max_retries=1)
    deadline = time.monotonic() + 120
    while not [e for e in job.events(follow=False) if e.type == "job.artifact"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(job.info().worker_pid, signal.SIGKILL)  # rank 0 dies; the kernel reaps its group (rank 1)
    info = job.wait(timeout=300)
    assert info.state == "succeeded" and info.attempts == 2, info.reason
    result = job.result(timeout=10)
    assert result["resumed_from_attempt"] == 1 and result["resumed_from_step"] in range(4, 24, 4), result
    assert result["train_loss"] == expected["train_loss"] and _metric(job) == _metric(straight)


@pytest.mark.timeout(300)
def test_fsdp_on_one_rank_matches_plain_training(client: llmos.Client, corpus: Path) -> None:
    base = dict(SMALL, data=str(corpus), steps=6, eval_every=0)
    plain = client.submit("train", params=base)
    one = client.submit("train", params=dict(base, parallel="fsdp"))
    for job in (plain, one):
        info = job.wait(timeout=300)
        assert info.state == "succeeded", info.reason
    _close(_metric(plain), _metric(one), 1e-5)
    assert one.result(timeout=10)["parallel"] == "fsdp"


def test_auto_chooses_fsdp_only_when_the_state_does_not_fit() -> None:
    logged: list[dict] = []
    log = SimpleNamespace(info=lambda event, **kw: logged.append({"event": event, **kw}))

    def choose(world: int, memory: int) -> str:
        runner = TrainRunner()
        runner.model, runner.device, runner.world = Llama(config_from_preset("nano", 257)), torch.device("cpu"), world
        ctx = SimpleNamespace(params=TrainParams(data="stdlib", parallel="auto", world_size=world), resources={"memory": memory}, log=log)
        return runner._choose_parallel(ctx)  # type: ignore[arg-type]

    need = 16 * config_from_preset("nano", 257).num_parameters()
    assert choose(2, 100 * need) == "ddp"
    assert choose(2, need) == "fsdp"  # each of the 2 ranks gets half the memory
    assert choose(1, need // 2) == "ddp"  # one rank: sharding would not save anything
    assert logged[1] == {"event": "parallel_chosen", "parallel": "fsdp", "state_bytes": need, "device_bytes": need // 2}


def _has_cuda() -> bool:
    return shutil.which("nvidia-smi") is not None and torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.timeout(600)
@pytest.mark.skipif(not _has_cuda(), reason="no CUDA GPU on this machine")
def test_fsdp_on_a_real_gpu(state_dir: Path, corpus: Path) -> None:
    """parallel=fsdp on one GPU (NCCL, one rank) trains, saves a full checkpoint and resumes exactly."""
    handle = KernelHandle(state_dir).boot()
    try:
        with handle.client() as c:
            wait_for_gpu_probe(c, timeout=60)
            gpu = {"gpus": 1, "gpu_memory": "2GiB"}
            base = dict(SMALL, data=str(corpus), steps=8, eval_every=4, checkpoint_every=4, dtype="float32")
            ddp = c.submit("train", params=dict(base, output=str(state_dir / "ddp")), resources=gpu)
            fsdp = c.submit("train", params=dict(base, parallel="fsdp", output=str(state_dir / "fsdp")), resources=gpu)
            for job in (ddp, fsdp):
                info = job.wait(timeout=300)
                assert info.state == "succeeded", info.reason
            logs = [e.body["fields"] for e in fsdp.logs(follow=False) if e.body["event"] == "distributed"]
            assert logs[0]["backend"] == "nccl" and logs[0]["parallel"] == "fsdp"
            _close(_metric(ddp), _metric(fsdp), 1e-3)
            resumed = c.submit("train", params=dict(base, parallel="fsdp", resume=str(state_dir / "fsdp-step4"), output=str(state_dir / "r")), resources=gpu)
            assert resumed.wait(timeout=300).state == "succeeded"
            expected, got = _metric(fsdp), _metric(resumed)
            _close({s: expected[s] for s in got}, got, 1e-5)
            model, _ = load_checkpoint(state_dir / "fsdp")
            assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, model.config.vocab_size)
    finally:
        handle.shutdown()
