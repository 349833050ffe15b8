"""train and eval jobs through a real kernel: learning, exact resume, cancel, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest

import llmos
from tests.conftest import KernelHandle, write_word_corpus

torch = pytest.importorskip("torch")

from llmos.plugins.lm import EvalResult  # noqa: E402
from llmos.plugins.lm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from llmos.plugins.lm.config import config_from_preset  # noqa: E402
from llmos.plugins.lm.model import Llama  # noqa: E402
from llmos.plugins.lm.text import bytes_tokenizer  # noqa: E402

SMALL = dict(preset="nano", tokenizer="bytes", seq_len=32, batch_size=8, lr=3e-3, warmup_steps=5, eval_batches=4, log_every=5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_word_corpus(tmp_path_factory.mktemp("corpus"), 40)


def _train(c: llmos.Client, corpus: Path, **params) -> llmos.Job:
    return c.submit("train", params={"data": str(corpus), **SMALL, **params})


def _losses(job: llmos.Job, name: str = "train_loss") -> dict[int, float]:
    return {e.body["step"]: e.body["value"] for e in job.events(follow=False) if e.type == "job.metric" and e.body["name"] == name}


def test_training_lowers_validation_loss_and_eval_agrees(client: llmos.Client, corpus: Path) -> None:
    job = _train(client, corpus, steps=60, eval_every=20)
    result = job.result(timeout=300)
    assert result["val_loss"] < math.log(257) - 1.5, result  # far below a uniform guess over bytes
    val = _losses(job, "val_loss")
    assert val[60] < val[20]
    progress = [e.body for e in job.events(follow=False) if e.type == "job.progress"]
    assert progress[-1]["step"] == 60 and {"loss", "lr", "tokens_per_s", "eta_s"} <= set(progress[-1]["fields"])
    artifacts = [e.body for e in job.events(follow=False) if e.type == "job.artifact"]
    assert artifacts[-1]["path"] == result["checkpoint"] and artifacts[-1]["kind"] == "checkpoint"
    ck = Path(result["checkpoint"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "llmos.json"} <= {p.name for p in ck.iterdir()}
    assert (ck / "model.safetensors").stat().st_mode & 0o777 == (ck / "config.json").stat().st_mode & 0o777  # not 0600 beside 0644
    manifest = json.loads((ck / "llmos.json").read_text())
    assert manifest["produced_by"]["job_id"] == job.id and manifest["metrics"]["val_loss"] == pytest.approx(result["val_loss"])
    ev = client.submit("eval", params={"model": str(ck), "seq_len": 32, "batches": 4, "prompts": ["alpha"], "max_new_tokens": 8}).result(timeout=120)
    assert ev["loss"] == pytest.approx(result["val_loss"], rel=0.05)
    assert ev["perplexity"] == pytest.approx(math.exp(ev["loss"]))
    typed = EvalResult.from_dict(ev)  # the typed result other jobs read back
    assert typed.samples[0].prompt == "alpha" and typed.split == "validation" and typed.tokens > 0
    # What it scored (4 batches of windows of 32 tokens), not the size of the split it drew them from.
    assert ev["tokens"] == 4 * 8 * 32 < ev["split_tokens"], ev  # batches x batch_size (8) x seq_len
    assert ev["samples"][0]["prompt"] == "alpha" and len(ev["samples"][0]["completion"]) > 0


def test_resume_continues_exactly(client: llmos.Client, corpus: Path, tmp_path: Path) -> None:
    straight = _train(client, corpus, steps=30, eval_every=0, output=str(tmp_path / "a"))
    straight.result(timeout=300)
    first = _train(client, corpus, steps=30, eval_every=0, checkpoint_every=15, output=str(tmp_path / "b"))
    first.result(timeout=300)
    middle = tmp_path / "b-step15"
    assert (middle / "train_state.safetensors").exists()
    resumed = _train(client, corpus, steps=30, eval_every=0, resume=str(middle), output=str(tmp_path / "c"))
    resumed.result(timeout=300)
    expected, got = _losses(straight), _losses(resumed)
    assert sorted(got) == list(range(16, 31))
    assert [got[s] for s in range(16, 31)] == [expected[s] for s in range(16, 31)]


def test_a_killed_attempt_resumes_from_its_checkpoint(client: llmos.Client, corpus: Path, tmp_path: Path) -> None:
    base = dict(steps=60, eval_every=0, checkpoint_every=10, log_every=1)
    straight = _train(client, corpus, **base, output=str(tmp_path / "straight"))
    expected = straight.result(timeout=300)
    job = client.submit("train", params={"data": str(corpus), **SMALL, **base}, max_retries=1)
    deadline = time.monotonic() + 120
    while not [e for e in job.events(follow=False) if e.type == "job.artifact"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(job.info().worker_pid, signal.SIGKILL)  # a crash: no cancel, no last checkpoint
    info = job.wait(timeout=300)
    assert info.state == "succeeded" and info.attempts == 2, info.reason
    result = job.result(timeout=10)
    assert result["resumed_from_attempt"] == 1 and result["resumed_from_step"] in range(10, 60, 10), result
    resumed = [e.body["fields"] for e in job.logs(follow=False) if e.body["event"] == "resumed_from_attempt"]
    assert resumed == [{**resumed[0], "attempt": 1, "step": result["resumed_from_step"]}]
    assert result["train_loss"] == expected["train_loss"] and result["val_loss"] == expected["val_loss"]
    assert _losses(job) == _losses(straight)  # attempt 2's steps, from the checkpoint on, are attempt 1's
    manifest = json.loads((Path(result["checkpoint"]) / "llmos.json").read_text())
    assert manifest["produced_by"] == {"job_id": job.id, "kind": "train", "attempt": 2} and manifest["parent"] is None
    assert expected["resumed_from_step"] is None and expected["resumed_from_attempt"] is None


def test_a_preempted_job_resumes_where_it_stopped(client: llmos.Client, corpus: Path, tmp_path: Path) -> None:
    base = dict(steps=100, eval_every=0, log_every=1, threads=1)
    straight = _train(client, corpus, **base, output=str(tmp_path / "straight"))
    expected = straight.result(timeout=300)
    cores = next(d for d in client.devices() if d["kind"] == "cpu")["capacity"]
    # It holds every core: a job that needs one cannot fit unless it is preempted.
    job = client.submit("train", params={"data": str(corpus), **SMALL, **base}, resources={"cpus": cores}, priority=0)
    assert job.info().preemptible  # train jobs are, by default
    deadline = time.monotonic() + 120
    while not [e for e in job.events(follow=False) if e.type == "job.progress" and e.body["step"] >= 3]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    urgent = client.submit("diag.echo", {"message": "now"}, {"cpus": 1}, priority=5)
    assert urgent.wait(timeout=60).state == "succeeded"
    info = job.wait(timeout=300)
    assert info.state == "succeeded" and info.attempts == 2 and info.preemptions == 1, info.reason
    result = job.result(timeout=10)
    logs = {e.body["event"]: e.body["fields"] for e in job.logs(follow=False)}
    stopped_at = logs["preempted_checkpoint_saved"]["step"]
    assert result["resumed_from_attempt"] == 1 and result["resumed_from_step"] == stopped_at and logs["resumed_from_attempt"]["step"] == stopped_at
    assert 3 <= stopped_at < 100
    assert result["train_loss"] == expected["train_loss"] and _losses(job) == _losses(straight)


def test_cancel_saves_a_loadable_checkpoint(client: llmos.Client, corpus: Path) -> None:
    job = _train(client, corpus, steps=100_000, eval_every=0, log_every=1)
    deadline = time.monotonic() + 120
    while not [e for e in job.events(follow=False) if e.type == "job.progress" and e.body["step"] >= 3]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    job.cancel()
    assert job.wait(timeout=120).state == "cancelled"
    path = [e.body["path"] for e in job.events(follow=False) if e.type == "job.artifact"][-1]
    model, manifest = load_checkpoint(path)
    assert manifest["train_state"]["step"] >= 3 and manifest["metrics"]["stopped"] == "cancelled"
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, model.config.vocab_size)


def test_bad_input_is_refused_before_training(client: llmos.Client, corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(llmos.JobRejected, match="does not exist"):
        client.submit("train", params={"data": str(tmp_path / "nothing")})
    with pytest.raises(llmos.JobRejected, match=r"must divide hidden_size \(30\)"):
        client.submit("train", params={"data": str(corpus), "config": {"hidden_size": 30, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}})
    with pytest.raises(llmos.JobRejected, match="preset"):
        client.submit("train", params={"data": str(corpus), "preset": "gigantic"})
    with pytest.raises(llmos.JobRejected, match="not a checkpoint"):
        client.submit("train", params={"data": str(corpus), "init_from": str(tmp_path)})
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short")
    info = client.submit("train", params={"data": str(tiny), **SMALL}).wait(timeout=120)
    assert info.state == "failed" and "fewer than one sequence" in info.reason
    (tmp_path / "empty").mkdir()
    info = client.submit("train", params={"data": str(tmp_path / "empty"), **SMALL}).wait(timeout=120)
    assert info.state == "failed" and "no files matching" in info.reason


def test_nan_loss_stops_with_reason(client: llmos.Client, corpus: Path, tmp_path: Path) -> None:
    model = Llama(config_from_preset("nano", 257))
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("nan"))
    save_checkpoint(tmp_path / "nan", model, None, {})
    info = _train(client, corpus, steps=5, init_from=str(tmp_path / "nan")).wait(timeout=120)
    assert info.state == "failed" and "the loss became nan at step 1; last good checkpoint: none (no checkpoint yet)" in info.reason
    # Under ddp every rank meets the NaN: the job says so, not that rank 1 exited.
    two = _train(client, corpus, steps=5, threads=1, world_size=2, init_from=str(tmp_path / "nan")).wait(timeout=120)
    assert two.state == "failed" and two.reason.startswith("FloatingPointError: the loss became nan at step 1"), two.reason


def test_nan_loss_later_names_the_runs_last_good_checkpoint(client: llmos.Client, tmp_path: Path) -> None:
    """Only the byte '~' has a NaN embedding, and it occurs a few times in the corpus: the loss turns
    NaN at the first step whose batch holds one. The reason names the checkpoint of the step before."""
    (tmp_path / "corpus").mkdir()
    root = write_word_corpus(tmp_path / "corpus", 40)
    for i in (5, 15, 25, 35):
        doc = root / f"doc{i:02}.txt"
        doc.write_text(doc.read_text().replace("gamma", "gam~ma", 1))
    model = Llama(config_from_preset("nano", 257))
    model.init_weights(seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight[bytes_tokenizer().encode("~")[0]] = float("nan")
    save_checkpoint(tmp_path / "start", model, None, {})
    out = tmp_path / "run"
    info = _train(client, root, steps=400, eval_every=0, checkpoint_every=1, init_from=str(tmp_path / "start"), output=str(out)).wait(timeout=300)
    assert info.state == "failed", info
    step = int(info.reason.split("at step ")[1].split(";")[0])
    assert step > 1 and info.reason.endswith(f"last good checkpoint: {out}-step{step - 1}"), info.reason
    load_checkpoint(f"{out}-step{step - 1}")  # and it loads
    data = json.loads(Path(f"{out}-step{step - 1}", "llmos.json").read_text())["data"]
    assert len(data["tokens_sha256"]) == 64 and len(data["tokenizer_sha256"]) == 64 and data["files"] == 40


def test_train_cli_follows_with_progress(kernel: KernelHandle, corpus: Path) -> None:
    proc = kernel.cli("train", "--data", str(corpus), "--steps", "10", "--seq-len", "32", "-p", "tokenizer=bytes", "-p", "log_every=5", timeout=300)
    out = proc.stdout
    assert "step 5/10" in out and "step 10/10" in out and "tok/s" in out and "succeeded" in out


def test_two_ranks_match_one(client: llmos.Client, corpus: Path) -> None:
    base = dict(SMALL, data=str(corpus), steps=8, eval_every=0, threads=1)
    one = client.submit("train", params=base, resources={"cpus": 2})
    two = client.submit("train", params=dict(base, world_size=2), resources={"cpus": 2})
    assert one.wait(timeout=300).state == "succeeded"
    info = two.wait(timeout=300)
    assert info.state == "succeeded", info.reason
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4
    logs = [e.body for e in two.logs(follow=False) if e.body["event"] == "distributed"]
    assert logs and logs[0]["fields"]["world_size"] == 2 and logs[0]["fields"]["backend"] == "gloo"
    assert two.info().resources["cpus"] == 2 and two.info().placement["distributed"]["world_size"] == 2
    # Without resources, the kind's per-rank default (1 core) scales with the ranks.
    default = client.submit("train", params=dict(base, world_size=2, steps=1))
    assert default.info().resources["cpus"] == 2 and default.wait(timeout=300).state == "succeeded"
    with pytest.raises(llmos.JobRejected, match="ask for cpus >= 2"):
        client.submit("train", params=dict(base, world_size=2), resources={"cpus": 1})
    with pytest.raises(llmos.JobRejected, match="multiple of world_size"):
        client.submit("train", params=dict(base, world_size=3, batch_size=8), resources={"cpus": 2})


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append((int(entry.name), cmdline))
    return found


def test_a_dead_rank_fails_the_job_and_names_it(client: llmos.Client, corpus: Path) -> None:
    job = client.submit("train", params=dict(SMALL, data=str(corpus), steps=5000, eval_every=0, threads=1, world_size=2, log_every=1), resources={"cpus": 2})
    deadline = time.monotonic() + 120
    while not [e for e in job.events(follow=False) if e.type == "job.metric"]:
        assert time.monotonic() < deadline and job.info().state in ("pending", "running")
        time.sleep(0.05)
    ranks = [pid for pid, cmd in _children(job.info().worker_pid) if "llmos.plugins.lm.rank" in cmd]
    assert len(ranks) == 1, _children(job.info().worker_pid)
    os.kill(ranks[0], signal.SIGKILL)
    info = job.wait(timeout=180)
    assert info.state == "failed" and "rank 1 of 2 exited with signal SIGKILL during training" in info.reason, info.reason


def test_a_preset_keeps_its_context_length(client: llmos.Client, corpus: Path) -> None:
    """micro is built for 1,024 positions: training on shorter sequences does not shrink the context
    that generate and serve may use later."""
    result = _train(client, corpus, preset="micro", steps=1, eval_every=0, eval_batches=1).result(timeout=180)
    config = json.loads((Path(result["checkpoint"]) / "config.json").read_text())
    assert config["max_position_embeddings"] == 1024 and config["hidden_size"] == 256


def test_relative_paths_mean_the_submitters_directory(client: llmos.Client, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job runs in a folder of its own: relative path parameters are resolved where they were written."""
    (tmp_path / "here").mkdir()
    os.symlink(corpus, tmp_path / "here" / "corpus")
    monkeypatch.chdir(tmp_path / "here")
    job = client.submit("train", params={**SMALL, "data": "corpus", "output": "ck", "steps": 1, "eval_every": 0, "eval_batches": 1})
    assert job.info().params["data"] == str(tmp_path / "here" / "corpus") and job.info().params["output"] == str(tmp_path / "here" / "ck")
    assert job.result(timeout=120)["checkpoint"] == str(tmp_path / "here" / "ck")
    tuned = client.submit("train", params={**SMALL, "data": "stdlib", "max_bytes": 50_000, "init_from": "ck", "output": "../tuned", "steps": 1, "eval_every": 0, "eval_batches": 1})
    assert tuned.result(timeout=120)["checkpoint"] == str(tmp_path / "tuned")
    with pytest.raises(llmos.JobRejected, match=f"init_from {tmp_path / 'here' / 'nope'} is not a checkpoint directory"):
        client.submit("train", params={**SMALL, "data": "corpus", "init_from": "nope"})


def test_ctrl_c_on_a_foreground_train_says_the_job_runs_on(kernel: KernelHandle, corpus: Path) -> None:
    import subprocess
    import sys

    argv = [sys.executable, "-m", "llmos.kernel.cli", "train", "--state-dir", str(kernel.state_dir), "--data", str(corpus), "--steps", "100000",
            "--seq-len", "32", "-p", "tokenizer=bytes", "-p", "log_every=1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=kernel.env)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "step" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    job_id = int(err.split("stopped following job ")[1].split(",")[0])
    assert f"llmos logs {job_id} -f" in err and f"llmos cancel {job_id}" in err
    with kernel.client() as c:
        job = c.job(job_id)
        assert job.info().state == "running"  # it runs on, as it said
        job.cancel()
        assert job.wait(timeout=60).state == "cancelled"
