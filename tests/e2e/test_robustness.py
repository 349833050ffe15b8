"""Runners and inputs that misbehave: each fails only its own job, with a clear reason."""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import pytest

import llmos
from tests.conftest import KernelHandle, cli

EVIL = textwrap.dedent(
    '''
    import os, signal, subprocess, time
    from dataclasses import dataclass
    import llmos
    from llmos.protocol import JobStateChanged


    @dataclass(frozen=True)
    class P:
        mode: str = "x"
        marker: str = ""


    class Evil(llmos.Runner):
        def run(self, ctx):
            mode = ctx.params.mode
            if mode == "rtsig":
                ctx.wait_cancelled(60)
                os.kill(os.getpid(), 40)
                time.sleep(5)
            if mode == "orphan":
                subprocess.Popen(["sleep", "1000"], env=dict(os.environ, LLMOS_MARKER=ctx.params.marker))
                return {"ok": True}
            if mode == "biglog":
                for i in range(30):
                    ctx.log.info("big", i=i, pad="x" * 100_000)
                return {"ok": True}
            if mode == "hugeint":
                ctx.log.info("huge", seed=2**80)
                return {"ok": True}
            if mode == "bytes_result":
                return {"blob": b"abc"}
            if mode == "forge":
                ctx.emit("state", JobStateChanged(state="succeeded"))
                return {"ok": True}
            if mode == "cancel_reason":
                ctx.wait_cancelled(60)
                return {"reason": ctx.cancel_reason}
            if mode == "bad_progress":
                ctx.progress(1, message=5)
            return {"mode": mode}


    @llmos.hookimpl
    def llmos_register_job_kinds(register):
        register(llmos.JobKind("evil", runner=Evil, params=P, resources=llmos.Resources(cpus=0)))
    '''
)


@pytest.fixture(scope="module")
def evil_kernel(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("evil")
    (root / "plug").mkdir()
    (root / "plug" / "evil_plugin.py").write_text(EVIL)
    env = {"PYTHONPATH": str(root / "plug"), "LLMOS_PLUGIN_MODULES": "evil=evil_plugin"}
    handle = KernelHandle(root / "state", env=env).boot()
    try:
        yield handle
    finally:
        handle.shutdown()


@pytest.fixture
def ec(evil_kernel: KernelHandle):
    with evil_kernel.client() as c:
        yield c


def _alive(pid: int) -> bool:
    return llmos.paths.pid_alive(pid)


def test_huge_integers_are_refused_not_fatal(ec: llmos.Client, evil_kernel: KernelHandle) -> None:
    proc = evil_kernel.cli("submit", "diag.echo", "-p", "data=99999999999999999999999", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "data" in proc.stderr
    with pytest.raises(llmos.JobRejected):
        ec.submit("diag.echo", params={"data": b"bytes"})
    with pytest.raises(llmos.ValidationError):
        ec.submit("diag.echo", priority=10**30)
    for args in (["job", "99999999999999999999"], ["job", "9999999999999999999"], ["submit", "diag.echo", "--memory", "9" * 400]):
        proc = evil_kernel.cli(*args, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert ec.status()["pid"] == evil_kernel.pid


def test_realtime_signal_during_cancel(ec: llmos.Client) -> None:
    job = ec.submit("evil", params={"mode": "rtsig"})
    _wait(lambda: job.info().worker_pid)
    time.sleep(0.2)
    job.cancel()
    info = job.wait(timeout=30)
    assert info.state == "cancelled" and "signal 40" in info.reason and info.exit_code == -40
    assert ec.submit("diag.echo").wait(timeout=30).state == "succeeded"


def test_leftover_processes_die_with_the_job(ec: llmos.Client) -> None:
    marker = f"m{os.getpid()}{time.time_ns()}"
    assert ec.submit("evil", params={"mode": "orphan", "marker": marker}).result(timeout=30) == {"ok": True}

    def leftovers() -> list[int]:
        out = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if f"LLMOS_MARKER={marker}".encode() in (proc / "environ").read_bytes():
                        out.append(int(proc.name))
                except OSError:
                    pass
        return [p for p in out if _alive(p)]

    _wait(lambda: not leftovers(), timeout=10)


def test_oversized_and_unencodable_events_do_not_lose_the_job(ec: llmos.Client) -> None:
    job = ec.submit("evil", params={"mode": "biglog"})
    assert job.result(timeout=60) == {"ok": True}
    assert len([e for e in job.logs(follow=False) if e.body["event"] == "big"]) == 30
    job = ec.submit("evil", params={"mode": "hugeint"})
    assert job.result(timeout=30) == {"ok": True}
    huge = next(e for e in job.logs(follow=False) if e.body["event"] == "huge")
    assert huge.body["fields"]["seed"] == str(2**80)


def test_unstorable_result_fails_with_reason(ec: llmos.Client) -> None:
    info = ec.submit("evil", params={"mode": "bytes_result"}).wait(timeout=30)
    assert info.state == "failed" and "cannot be stored" in info.reason


def test_runner_cannot_forge_job_state(ec: llmos.Client) -> None:
    job = ec.submit("evil", params={"mode": "forge"})
    info = job.wait(timeout=30)
    assert info.state == "succeeded"
    states = [e.body["state"] for e in job.events(follow=False) if e.type == "job.state"]
    assert states == ["pending", "running", "succeeded"]


def test_cancel_reason_reaches_the_runner_and_progress_types_are_checked(ec: llmos.Client) -> None:
    job = ec.submit("evil", params={"mode": "cancel_reason"})
    _wait(lambda: job.info().worker_pid)
    time.sleep(0.2)
    job.cancel("enough")
    info = job.wait(timeout=30)
    assert info.state == "cancelled" and info.reason == "enough"
    bad = ec.submit("evil", params={"mode": "bad_progress"}).wait(timeout=30)
    assert bad.state == "failed" and "job.progress.message" in bad.reason


def test_timeout_exit_code(ec: llmos.Client) -> None:
    info = ec.submit("diag.sleep", params={"seconds": 30}, timeout=0.3).wait(timeout=30)
    assert (info.state, info.exit_code) == ("failed", 124)


def test_follow_from_past_the_end_returns(ec: llmos.Client, evil_kernel: KernelHandle) -> None:
    job = ec.submit("diag.echo")
    job.wait(timeout=30)
    last = max(e.seq for e in job.events(follow=False))
    assert list(job.events(since=last, follow=True, timeout=10)) == []
    proc = evil_kernel.cli("logs", str(job.id), "-f", "--since", str(last), timeout=20)
    assert proc.stdout == ""


def test_events_job_prefix_means_one_stream(ec: llmos.Client, evil_kernel: KernelHandle) -> None:
    jobs = [ec.submit("diag.echo") for _ in range(11)]
    for j in jobs:
        j.wait(timeout=30)
    first = min(j.id for j in jobs)
    lines = evil_kernel.cli("events", f"job.{first}", "--json").stdout.splitlines()
    assert lines and {json.loads(line)["topic"].split(".")[1] for line in lines} == {str(first)}


def test_state_dir_with_spaces(tmp_path: Path) -> None:
    handle = KernelHandle(tmp_path / "with space").boot()
    try:
        assert cli("submit", "diag.echo", "-p", "message=ok", "--wait", state_dir=handle.state_dir).returncode == 0
    finally:
        handle.shutdown()


def _wait(cond, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.02)


@pytest.mark.parametrize("detach", [False, True])
def test_boot_on_an_unusable_state_dir_says_why_in_one_line(tmp_path: Path, detach: bool) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for state in (blocker / "state", Path("/proc/llmos-cannot-exist")):
        proc = cli("boot", "--state-dir", str(state), *(["--detach"] if detach else []), check=False, timeout=30)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith(f"Error: cannot use state dir {state}: ") and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("job", "abc"), "Error: Invalid value for 'JOB_ID': 'abc' is not a valid integer. (see 'llmos job --help')"),
        (("submit", "diag.echo", "--gpu-memory", "4Gx"), "expected a size such as 4GiB"),
        (("no-such-command",), "Error: No such command 'no-such-command'. (see 'llmos --help')"),
    ],
)
def test_bad_options_are_one_line_errors(args: tuple[str, ...], says: str, tmp_path: Path) -> None:
    proc = cli(*args, "--state-dir", str(tmp_path), check=False) if args[0] != "no-such-command" else cli(*args, check=False)
    assert proc.returncode == 2 and says in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
