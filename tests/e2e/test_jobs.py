"""Jobs end to end: a real kernel, real workers, the real CLI and SDK."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time

import pytest

import llmos
from llmos.errors import JobCancelled, JobFailed, JobNotFound, JobRejected, ResourceError
from tests.conftest import KernelHandle


def test_echo_through_sdk_returns_params(client: llmos.Client) -> None:
    job = client.submit("diag.echo", params={"data": {"x": [1, 2]}, "message": "hi"})
    assert job.result(timeout=30) == {"data": {"x": [1, 2]}, "message": "hi"}
    info = job.info()
    assert (info.state, info.reason, info.exit_code, info.attempts) == ("succeeded", "succeeded", 0, 1)
    assert info.placement == {"cpu": {"cores": 0.0, "memory": 0}, "gpus": []}


def test_failures_end_with_one_line_on_stderr(kernel, tmp_path) -> None:
    failed = kernel.cli("submit", "diag.fail", "-p", "message=boom", "--wait", check=False)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [failed.stderr.strip()] and "failed: RuntimeError: boom" in failed.stderr
    assert "boom" not in failed.stdout
    # A folder that is not a checkpoint is refused at submit, saying what it lacks; nothing runs.
    (tmp_path / "notck").mkdir()
    before = len(kernel.cli_json("jobs", "--all"))
    refused = kernel.cli("eval", str(tmp_path / "notck"), check=False)
    assert refused.returncode != 0 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1 and "is not a checkpoint: it has no config.json and no model.safetensors" in refused.stderr
    assert len(kernel.cli_json("jobs", "--all")) == before


def test_submit_through_cli_json_and_wait(kernel) -> None:
    out = kernel.cli_json("submit", "diag.echo", "-p", "message=from the cli")
    assert out["id"] > 0 and out["kind"] == "diag.echo"
    done = kernel.cli("submit", "diag.echo", "-p", "message=x", "-p", 'data={"a": 1}', "--wait", "--json")
    info = json.loads(done.stdout)
    assert info["state"] == "succeeded"
    assert info["result"] == {"data": {"a": 1}, "message": "x"}
    shown = kernel.cli_json("job", str(out["id"]))
    assert set(shown) >= {"id", "kind", "params", "state", "reason", "exit_code", "attempts", "result", "placement"}


def test_failing_runner_fails_its_job_with_reason(client: llmos.Client) -> None:
    job = client.submit("diag.fail", params={"message": "boom"})
    with pytest.raises(JobFailed) as err:
        job.result(timeout=30)
    assert "RuntimeError: boom" in str(err.value)
    info = job.info()
    assert info.state == "failed" and info.exit_code == 1 and info.attempts == 1


def test_retries_count_every_attempt(client: llmos.Client) -> None:
    job = client.submit("diag.fail", max_retries=2)
    info = job.wait(timeout=60)
    assert info.state == "failed"
    assert info.attempts == 3
    states = [e.body["state"] for e in job.events(follow=False) if e.type == "job.state"]
    assert states == ["pending", "running", "pending", "running", "pending", "running", "failed"]


def test_crashed_worker_fails_job_and_frees_devices(client: llmos.Client) -> None:
    job = client.submit("diag.crash", resources={"gpus": 1})
    info = job.wait(timeout=30)
    assert info.state == "failed"
    assert info.exit_code == -9
    assert "SIGKILL" in info.reason
    for dev in client.devices():
        assert job.id not in dev["jobs"]
    # Both GPUs are whole again: a job wanting both can run.
    assert client.submit("diag.echo", resources={"gpus": 2}).wait(timeout=30).state == "succeeded"


def test_cancel_a_sleeping_job(client: llmos.Client) -> None:
    job = client.submit("diag.sleep", params={"seconds": 60}, resources={"gpus": 0.5})
    _wait_state(job, "running")
    t0 = time.monotonic()
    job.cancel()
    info = job.wait(timeout=30)
    assert info.state == "cancelled" and info.reason == "cancelled by user"
    assert time.monotonic() - t0 < 5
    assert all(job.id not in d["jobs"] for d in client.devices())
    with pytest.raises(JobCancelled):
        job.result()


def test_cancel_through_cli(kernel) -> None:
    out = kernel.cli_json("submit", "diag.sleep", "-p", "seconds=60")
    with kernel.client() as c:
        _wait_state(c.job(out["id"]), "running")
    kernel.cli("cancel", str(out["id"]))
    with kernel.client() as c:
        assert c.job(out["id"]).wait(timeout=30).state == "cancelled"


def test_cancel_pending_job_ends_at_once(client: llmos.Client) -> None:
    blocker = client.submit("diag.sleep", params={"seconds": 60}, resources={"gpus": 2})
    _wait_state(blocker, "running")
    waiting = client.submit("diag.echo", resources={"gpus": 1})
    time.sleep(0.2)
    assert waiting.info().state == "pending"
    assert waiting.cancel().state == "cancelled"
    blocker.cancel()
    assert blocker.wait(timeout=30).state == "cancelled"


def test_timeout_ends_a_sleeping_job(client: llmos.Client) -> None:
    job = client.submit("diag.sleep", params={"seconds": 60}, timeout=0.5)
    info = job.wait(timeout=30)
    assert info.state == "failed"
    assert info.reason == "timeout after 0.5s"


def test_unknown_kind_lists_known_ones(client: llmos.Client, kernel) -> None:
    with pytest.raises(JobRejected) as err:
        client.submit("diag.nope")
    assert "diag.echo" in str(err.value) and "diag.sleep" in str(err.value)
    proc = kernel.cli("submit", "diag.nope", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("Error: unknown job kind 'diag.nope'")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"secs": 1}, ["unknown parameter 'secs'", "seconds"]),
        ({"seconds": "soon"}, ["'seconds'", "must be a number from 0 to 604,800; got 'soon'"]),
        ({"seconds": -1}, ["'seconds'", "from 0 to 604,800; got -1"]),
    ],
)
def test_bad_parameters_name_the_field(client: llmos.Client, params: dict, words: list[str]) -> None:
    with pytest.raises(JobRejected) as err:
        client.submit("diag.sleep", params=params)
    for word in words:
        assert word in str(err.value)


def test_cli_coerces_parameter_strings(kernel) -> None:
    proc = kernel.cli("submit", "diag.sleep", "-p", "seconds=abc", check=False)
    assert proc.returncode == 1 and "'seconds' must be a number from 0 to 604,800; got 'abc'" in proc.stderr
    out = kernel.cli_json("submit", "diag.emit", "-p", "count=2", "-p", "only=log")
    assert out["params"] == {"count": 2, "payload": 0, "only": "log"}


def test_never_fitting_request_is_refused(client: llmos.Client, kernel) -> None:
    with pytest.raises(ResourceError) as err:
        client.submit("diag.echo", resources={"gpus": 3})
    assert "asked for 3 GPU(s)" in str(err.value) and "gpu1 24.0GiB" in str(err.value)
    with pytest.raises(ResourceError):
        client.submit("diag.echo", resources={"gpus": 0.5, "gpu_memory": "100GiB"})
    proc = kernel.cli("submit", "diag.echo", "--gpus", "1", "--gpu-memory", "64GiB", check=False)
    assert proc.returncode == 1 and "can never fit" in proc.stderr


def test_fake_gpu_fractions_limit_concurrency(client: llmos.Client) -> None:
    # Two fake GPUs, each job takes 0.5 of one and 16 GiB of its 24 GiB: only two fit at once.
    jobs = [client.submit("diag.sleep", params={"seconds": 1.0}, resources={"gpus": 0.5, "gpu_memory": "16GiB"}) for _ in range(4)]
    _wait_state(jobs[1], "running")
    time.sleep(0.3)
    states = [j.info().state for j in jobs]
    assert states.count("running") == 2 and states.count("pending") == 2
    running_gpus = {j.info().placement["gpus"][0]["id"] for j in jobs if j.info().state == "running"}
    assert running_gpus == {"gpu0", "gpu1"}
    for j in jobs:
        assert j.wait(timeout=30).state == "succeeded"
    # Quarter shares without a memory request pack four to a GPU.
    small = [client.submit("diag.sleep", params={"seconds": 0.8}, resources={"gpus": 0.25}) for _ in range(8)]
    _wait_state(small[-1], "running", timeout=15)
    gpus = [d for d in client.devices() if d["kind"] == "gpu"]
    assert [d["share_reserved"] for d in gpus] == [1.0, 1.0]
    for j in small:
        j.wait(timeout=30)


def test_a_gang_job_gets_its_rank_plan_from_the_kernel(client: llmos.Client) -> None:
    """A kind with ``ranks``: the kernel splits the placement among the ranks, picks the rendezvous
    address, sets torch.distributed's variables for rank 0, and refuses ranks without devices."""
    job = client.submit("diag.devices", params={"world_size": 2}, resources={"gpus": 2, "cpus": 2})
    out = job.result(timeout=30)
    plan = out["distributed"]
    assert plan["world_size"] == 2 and plan["master_addr"] == "127.0.0.1" and 1024 <= plan["master_port"] < 65536
    assert plan["ranks"] == [{"rank": 0, "gpus": [0], "cpus": 1.0}, {"rank": 1, "gpus": [1], "cpus": 1.0}]
    assert out["rank_env"] == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(plan["master_port"])}
    assert job.info().placement["distributed"] == plan
    single = client.submit("diag.devices", resources={"cpus": 1}).result(timeout=30)
    assert single["distributed"] is None and single["rank_env"]["RANK"] is None
    assert single["cuda_device_order"] == "PCI_BUS_ID"  # the probe's numbering (NVML's) is what CUDA_VISIBLE_DEVICES means
    with pytest.raises(llmos.JobRejected, match=r"world_size=2 runs 2 processes, each on whole GPUs of its own: ask for gpus=2 \(or a multiple of 2\), not 1"):
        client.submit("diag.devices", params={"world_size": 2}, resources={"gpus": 1})
    with pytest.raises(llmos.JobRejected, match=r"world_size=2 runs 2 processes, each on a CPU core of its own: ask for cpus >= 2, not 1"):
        client.submit("diag.devices", params={"world_size": 2}, resources={"cpus": 1})
    kinds = {k["name"]: k for k in client.kinds()}
    assert kinds and kinds["diag.devices"]["ranks"] == "world_size" and kinds["diag.echo"]["ranks"] is None


def test_priority_runs_first(client: llmos.Client) -> None:
    blocker = client.submit("diag.sleep", params={"seconds": 0.5}, resources={"gpus": 2})
    _wait_state(blocker, "running")
    low = client.submit("diag.echo", resources={"gpus": 2}, priority=0)
    high = client.submit("diag.echo", resources={"gpus": 2}, priority=5)
    low_info, high_info = low.wait(timeout=30), high.wait(timeout=30)
    assert high_info.started_at < low_info.started_at


def test_job_not_found(client: llmos.Client, kernel) -> None:
    with pytest.raises(JobNotFound):
        client.job(999_999)
    proc = kernel.cli("job", "999999", check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == "Error: no job with id 999999"


def test_jobs_and_devices_json(kernel) -> None:
    jobs = kernel.cli_json("jobs")
    assert isinstance(jobs, list) and all("id" in j and "state" in j for j in jobs)
    devices = kernel.cli_json("devices")
    assert [d["id"] for d in devices] == ["cpu", "gpu0", "gpu1"]
    for d in devices:
        assert {"id", "kind", "memory_total", "memory_reserved", "share_reserved", "fake"} <= set(d)
    assert devices[1]["fake"] is True and devices[1]["memory_total"] == 24 * 1024**3


def _wait_state(job: llmos.Job, state: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while job.info().state != state:
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job.id} never reached {state}: {job.info()}")
        time.sleep(0.02)


def test_gpu_requests_wait_for_the_probe_to_be_answered(tmp_path) -> None:
    """While the GPU probe runs, a request only real GPUs could hold gets its answer when the probe
    ends: refused at submit if it can never fit, not accepted and failed later."""
    handle = KernelHandle(tmp_path / "state", "--fake-gpus", "1x8GiB", env={"LLMOS_PROBE_DELAY": "2"}).boot()
    try:
        with handle.client() as c:
            t0 = time.monotonic()
            fits = c.submit("diag.echo", resources={"gpus": 1, "gpu_memory": "4GiB"})  # the fake GPU holds it: no wait
            assert time.monotonic() - t0 < 1.5
            with pytest.raises(ResourceError, match=r"asked for 2 GPU\(s\)"):
                c.submit("diag.echo", resources={"gpus": 2})
            assert time.monotonic() - t0 >= 1.0  # answered once the probe was done
            assert fits.wait(timeout=30).state == "succeeded"
            assert [j.kind for j in c.jobs()] == ["diag.echo"]  # the refused request left no job behind
    finally:
        handle.shutdown()


def test_top_json_and_status_show_what_the_readme_says(kernel) -> None:
    top = kernel.cli_json("top", "--json")
    assert {"status", "devices", "running", "pending", "failed"} <= set(top) and top["status"]["pid"] == kernel.pid
    status = kernel.cli("status").stdout
    url = kernel.cli_json("status")["metrics_url"]
    assert url and f"metrics    {url}" in status


def test_pending_jobs_say_why_they_wait(fresh_kernel) -> None:
    import psutil

    cores = psutil.cpu_count() or 1
    with fresh_kernel.client() as c:
        holder = c.submit("diag.sleep", {"seconds": 60}, resources={"cpus": cores})
        deadline = time.monotonic() + 30
        while holder.info().state != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        waiting = c.submit("diag.echo", resources={"cpus": 1})
        gang = c.submit("diag.devices", {"world_size": 2}, resources={"cpus": 2}) if cores >= 2 else None
        deadline = time.monotonic() + 10
        while not (waiting.info().reason or "").startswith("waiting"):
            assert time.monotonic() < deadline, waiting.info().reason
            time.sleep(0.05)
        assert waiting.info().reason == f"waiting for 1 CPU core: 0 free of {cores:g}, held by job {holder.id}"
        if gang is not None:
            assert gang.info().reason == f"its 2 ranks: waiting for 2 CPU cores: 0 free of {cores:g}, held by job {holder.id}"
        shown = fresh_kernel.cli("job", str(waiting.id)).stdout
        assert f"held by job {holder.id}" in shown
        listed = fresh_kernel.cli_json("jobs", "--state", "pending")
        assert any(j["id"] == waiting.id and j["reason"].startswith("waiting for 1 CPU core") for j in listed)
        states = [e.body for e in waiting.events(follow=False) if e.type == "job.state"]
        assert states[-1]["state"] == "pending" and states[-1]["reason"].startswith("waiting for 1 CPU core")
        # Ranks that can never fit say it is the ranks.
        with pytest.raises(ResourceError, match=f"its {cores * 2} ranks ask for {cores * 2} CPU cores together"):
            c.submit("diag.devices", {"world_size": cores * 2}, resources={"cpus": cores * 2})
        holder.cancel()
        assert waiting.wait(timeout=30).state == "succeeded"


def test_job_shows_what_a_job_has_a_field_a_line(kernel) -> None:
    out = kernel.cli_json("submit", "diag.echo", "-p", "message=shown", "--wait", "--json")
    text = kernel.cli("job", str(out["id"])).stdout
    assert "None" not in text and "\n  message              shown\n" in text and "(ran " in text


def test_top_on_a_terminal_fits_80x24_and_q_quits(kernel: KernelHandle) -> None:
    """``llmos top`` in a real pseudo-terminal of 80x24: each frame fits it (the queue is cut,
    saying how many more), the cores held read as such, and pressing q ends it with exit code 0."""
    import fcntl
    import pty
    import select
    import struct
    import subprocess
    import sys
    import termios

    with kernel.client() as c:
        holder = c.submit("diag.sleep", {"seconds": 60}, resources={"cpus": 2})
        deadline = time.monotonic() + 30
        while holder.info().state != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        waiting = [c.submit("diag.sleep", {"seconds": 1}, resources={"cpus": 1}) for _ in range(30)]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {**kernel.env, "TERM": "xterm", "COLUMNS": "80", "LINES": "24"}
    proc = subprocess.Popen([sys.executable, "-m", "llmos.kernel.cli", "top", "--state-dir", str(kernel.state_dir), "--interval", "0.2"],
                            stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True, start_new_session=True)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 20
        while b"more: llmos jobs" not in out and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                out += os.read(master, 65536)
        os.write(master, b"q")
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(OSError):
            while select.select([master], [], [], 0.2)[0]:
                out += os.read(master, 65536)
        os.close(master)
        with kernel.client() as c:
            for j in [holder, *waiting]:
                with contextlib.suppress(llmos.LlmosError):
                    c.job(j.id).cancel()
    text = out.decode(errors="replace")
    assert code == 0, text[-2000:]
    assert "more: llmos jobs --state pending" in text, text
    assert "2/2 cores" in text, text
    assert "(q quits)" in text
    frames = [f for f in text.split("\x1b[H") if "devices" in f]
    frame = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", frames[-1])
    lines = [line for line in frame.replace("\r", "").split("\n") if line.strip()]
    assert len(lines) <= 24 and max(len(line) for line in lines) <= 80, frame


def test_jobs_are_listed_a_page_at_a_time(fresh_kernel) -> None:
    """The newest page first; --before pages back; the hint says where the next page is; the
    SDK's list carries the same total and cursor; services' jobs are left out unless asked."""
    with fresh_kernel.client() as c:
        ids = [c.submit("diag.echo", {"message": str(i)}).id for i in range(12)]
        for job_id in ids:
            c.job(job_id).wait(timeout=60)
        page = c.jobs(limit=5)
        assert [j.id for j in page] == ids[-5:] and page.total == 12 and page.older == 7 and page.before == ids[-5]
        back = c.jobs(limit=5, before=page.before)
        assert [j.id for j in back] == ids[2:7] and back.total == 12 and back.older == 2
        last = c.jobs(limit=5, before=back.before)
        assert [j.id for j in last] == ids[:2] and last.older == 0 and last.before is None
        assert [j.id for j in c.jobs(state="succeeded", before=ids[3])] == ids[:3]
        with pytest.raises(llmos.ValidationError, match="before 0: expected a job id"):
            c.jobs(before=0)
    proc = fresh_kernel.cli("jobs", "--limit", "5")
    assert [line.split()[0] for line in proc.stdout.splitlines()[1:]] == [str(i) for i in ids[-5:]]
    assert proc.stderr.strip() == f"showing 5 of 12 jobs (ids {ids[-5]}-{ids[-1]}); 7 older: llmos jobs --before {ids[-5]} --limit 5"
    older = fresh_kernel.cli_json("jobs", "--limit", "5", "--before", str(ids[-5]))
    assert [j["id"] for j in older] == ids[2:7]
    everything = fresh_kernel.cli("jobs")
    assert everything.stderr == "" and len(everything.stdout.splitlines()) == 13
    bad = fresh_kernel.cli("jobs", "--before", "0", check=False)
    assert bad.returncode == 2 and "--before" in bad.stderr
