"""Pipelines and artifacts with diag stages (no torch): ordering, parallel stages, failure and
rejection propagation, cancel, resume after a kernel SIGKILL, bad files; artifact hashing,
lineage, references at submit, gc safety and a tampered file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

import llmos
from llmos.errors import JobRejected, ValidationError
from tests.conftest import KernelHandle

pytestmark = pytest.mark.timeout(180)


def _art(text: str, *inputs: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "diag.artifact", "params": {"text": text, "inputs": list(inputs), **extra}}


def _states(info: dict[str, Any]) -> dict[str, str]:
    return {s["name"]: s["state"] for s in info["stages"]}


def test_stages_run_in_order_and_in_parallel(client: llmos.Client) -> None:
    spec = {
        "name": "diamond",
        "stages": {
            "a": _art("A"),
            "b": _art("B", "${a.model}", seconds=1.0),
            "c": _art("C", "${a.model}", seconds=1.0),
            "d": {"kind": "diag.echo", "params": {"message": "${b.text}|${c.text}", "data": ["${b.model}", "${c.model}"]}},
        },
    }
    pipe = client.pipeline(spec)
    info = pipe.wait(timeout=60)
    assert info["state"] == "succeeded", info
    stages = pipe.stages()
    assert [s for s in stages] == ["a", "b", "c", "d"]  # a topological order
    jobs = {n: client.job(s["job_id"]).info() for n, s in stages.items()}
    assert jobs["a"].ended_at <= min(jobs["b"].started_at, jobs["c"].started_at)
    # b and c do not depend on each other: they ran at the same time.
    assert jobs["b"].started_at < jobs["c"].ended_at and jobs["c"].started_at < jobs["b"].ended_at
    assert max(jobs["b"].ended_at, jobs["c"].ended_at) <= jobs["d"].started_at
    result = jobs["d"].result
    assert result["message"] == "A+B|A+C"
    assert result["data"] == [client.artifact(stages["b"]["artifact"])["path"], client.artifact(stages["c"]["artifact"])["path"]]
    kinds = [e.body["state"] for e in pipe.events(follow=False) if e.type == "pipeline.state"]
    assert kinds == ["running", "succeeded"]


def test_a_failed_or_rejected_stage_stops_what_depends_on_it_and_the_rest_goes_on(client: llmos.Client) -> None:
    spec = {
        "name": "branches",
        "stages": {
            "a": _art("A"),
            "bad": _art("R", "${a.model}", reject=True),
            "boom": {"kind": "diag.fail", "params": {"message": "stage boom broke"}},
            "after_bad": _art("X", "${bad.model}"),
            "after_boom": {"kind": "diag.echo", "params": {"message": "${boom.text}"}},
            "good": _art("G", "${a.model}"),
            "pick": {"kind": "diag.echo", "params": {"data": ["${bad.model?}", "${good.model?}"]}},
        },
    }
    info = client.pipeline(spec).wait(timeout=60)
    states = _states(info)
    assert states == {"a": "succeeded", "bad": "rejected", "boom": "failed", "after_bad": "skipped", "after_boom": "skipped", "good": "succeeded", "pick": "succeeded"}
    reasons = {s["name"]: s["reason"] for s in info["stages"]}
    assert "stage bad rejected" in reasons["after_bad"] and "quality gate" in reasons["after_bad"]
    assert "stage boom failed" in reasons["after_boom"] and "stage boom broke" in reasons["after_boom"]
    assert info["state"] == "failed" and "bad rejected" in info["reason"] and "boom failed" in info["reason"]
    pick = next(s for s in info["stages"] if s["name"] == "pick")
    good = next(s for s in info["stages"] if s["name"] == "good")
    assert client.job(pick["job_id"]).result()["data"] == [client.artifact(good["artifact"])["path"]]  # the rejected candidate dropped


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"stages": {}}, "at least one stage"),
        ({"stages": {"a": {"kind": "diag.nope"}}}, "stage 'a': unknown job kind 'diag.nope'"),
        ({"stages": {"a": {"kind": "diag.echo", "params": {"message": "${zz.model}"}}}}, "stage 'a': refers to ${zz...}, but there is no stage 'zz'"),
        ({"stages": {"a": _art("A", "${b.model}"), "b": _art("B", "${a.model}")}}, "the stages form a cycle: a -> b -> a"),
        ({"stages": {"a": {"kind": "diag.sleep", "params": {"seconds": "long"}}}}, "stage 'a': "),
        ({"stages": {"a": {"kind": "diag.sleep", "params": {"nap": 1}}}}, "stage 'a': "),
        ({"stages": {"a": {"kind": "diag.sleep", "resources": {"cpus": -1}}}}, "stage 'a': "),
        ({"stages": {"a": {"kind": "diag.sleep", "retries": 2}}}, "stage 'a': unknown key(s) retries"),
        ({"stages": {"a b": {"kind": "diag.sleep"}}}, "a stage name is letters"),
    ],
)
def test_a_bad_pipeline_is_refused_before_anything_runs(client: llmos.Client, spec: dict[str, Any], message: str) -> None:
    before = len(client.jobs(limit=100_000))
    with pytest.raises(ValidationError) as err:
        client.pipeline(spec)
    assert message in str(err.value)
    assert len(client.jobs(limit=100_000)) == before


def test_a_toml_error_names_the_line(client: llmos.Client, tmp_path: Path) -> None:
    bad = tmp_path / "p.toml"
    bad.write_text('name = "x"\n[stages.a]\nkind = "diag.sleep"\nparams = { seconds = }\n')
    with pytest.raises(ValidationError, match=r"p.toml: not valid TOML: .*line 4"):
        client.pipeline(bad)


def test_cancel_stops_what_runs_and_what_waits(client: llmos.Client) -> None:
    pipe = client.pipeline({"name": "long", "stages": {"slow": {"kind": "diag.sleep", "params": {"seconds": 60}}, "next": _art("N", "${slow.model}")}})
    deadline = time.monotonic() + 20
    while pipe.stages()["slow"]["state"] != "running" or client.job(pipe.stages()["slow"]["job_id"]).info().state != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pipe.cancel()
    info = pipe.wait(timeout=30)
    assert info["state"] == "cancelled" and _states(info) == {"slow": "cancelled", "next": "cancelled"}
    assert client.job(info["stages"][0]["job_id"]).info().state == "cancelled"


def test_resume_after_a_kernel_kill_runs_only_what_did_not_finish(state_dir: Path, tmp_path: Path) -> None:
    handle = KernelHandle(state_dir).boot()
    try:
        spec_file = tmp_path / "p.toml"
        spec_file.write_text(
            'name = "resumable"\n'
            '[stages.first]\nkind = "diag.artifact"\nparams = { text = "F" }\n'
            '[stages.second]\nkind = "diag.artifact"\nparams = { text = "S", inputs = ["${first.model}"], seconds = 3.0 }\n'
        )
        out = json.loads(handle.cli("pipeline", "run", str(spec_file), "--json").stdout)
        pid = out["id"]
        with handle.client() as c:
            pipe = c.get_pipeline(pid)
            deadline = time.monotonic() + 30
            while pipe.stages()["second"]["state"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            first = pipe.stages()["first"]
        handle.kill()
        handle.boot()
        with handle.client() as c:
            pipe = c.get_pipeline(pid)
            info = pipe.wait(timeout=30)  # the killed stage's job failed with the kernel
            assert info["state"] == "failed" and _states(info)["second"] == "failed" and "kernel restarted" in info["reason"]
            text = handle.cli("pipeline", "resume", str(pid)).stdout
            assert "kept: first" in text
            info = pipe.wait(timeout=60)
            assert info["state"] == "succeeded"
            assert pipe.stages()["first"]["job_id"] == first["job_id"] and pipe.stages()["first"]["artifact"] == first["artifact"]
            second = pipe.stages()["second"]
            assert c.job(second["job_id"]).result()["text"] == "F+S"
            assert c.lineage(second["artifact"])["parents"][0]["id"] == first["artifact"]
        status = handle.cli("pipeline", "status", str(pid)).stdout
        assert "resumable: succeeded" in status and "✓ first" in status and "<- first" in status
    finally:
        handle.shutdown()


def test_artifacts_are_content_addressed_with_lineage_and_checked_before_use(client: llmos.Client, kernel: KernelHandle) -> None:
    a = client.submit("diag.artifact", {"text": "base"})
    a.wait(30)
    art_a = client.artifact(f"job:{a.id}")
    assert len(art_a["id"]) == 64 and art_a["job_id"] == a.id and art_a["files"] == 2 and art_a["size"] > 0
    assert art_a["provenance"]["produced_by"]["job_id"] == a.id and art_a["provenance"]["versions"]["llmos"] == llmos.__version__
    # Inputs by artifact prefix and by job; the child's parent is recorded.
    b = client.submit("diag.artifact", {"text": "child", "inputs": [f"artifact:{art_a['id'][:8]}"]})
    b.wait(30)  # job:ID names what the job published: it must have published it
    c = client.submit("diag.artifact", {"text": "grandchild", "inputs": [f"job:{b.id}"]})
    assert c.result(30)["text"] == "base+child+grandchild"
    tree = client.lineage(f"job:{c.id}")
    assert tree["parents"][0]["job_id"] == b.id and tree["parents"][0]["parents"][0]["id"] == art_a["id"]
    drawn = kernel.cli("artifacts", "lineage", f"job:{c.id}").stdout.splitlines()
    assert len(drawn) == 3 and drawn[1].startswith("└─ ") and art_a["id"][:12] in drawn[2]
    shown = kernel.cli_json("artifacts", "show", art_a["id"][:10])
    assert shown["intact"] == "intact" and sorted(shown["used_by"]) == [b.id]
    # Bad references fail at submit.
    with pytest.raises(JobRejected, match="no artifact 'ffffffffff'"):
        client.submit("diag.artifact", {"inputs": ["artifact:ffffffffff"]})
    with pytest.raises(JobRejected, match="job 999999 has no registered model artifact"):
        client.submit("diag.artifact", {"inputs": ["job:999999"]})
    r = client.submit("diag.artifact", {"text": "bad", "reject": True})
    assert r.wait(30).state == "failed"
    with pytest.raises(JobRejected, match="rejected by its quality gate"):
        client.submit("diag.artifact", {"inputs": [f"job:{r.id}"]})
    assert client.submit("diag.artifact", {"inputs": [f"job:{r.id}"], "allow_rejected": True}).wait(30).state == "succeeded"
    # A tampered file is found before the job uses it, and reported.
    path = Path(client.artifact(f"job:{b.id}")["path"])
    (path / "weights.txt").write_text("tampered")
    bad = client.submit("diag.artifact", {"inputs": [f"job:{b.id}"]}).wait(30)
    assert bad.state == "failed" and "was altered" in (bad.reason or "") and "it is not used" in (bad.reason or "")
    assert kernel.cli_json("artifacts", "show", f"job:{b.id}")["intact"].startswith("altered")


def test_gc_keeps_what_is_referenced_and_removes_the_rest(client: llmos.Client, kernel: KernelHandle, tmp_path: Path) -> None:
    kept = client.submit("diag.artifact", {"text": "final"})
    kept.wait(30)
    failed = client.submit("diag.artifact", {"text": "loser", "reject": True})
    failed.wait(30)
    busy_in = client.submit("diag.artifact", {"text": "input"})
    busy_in.wait(30)
    busy = client.submit("diag.artifact", {"inputs": [f"job:{busy_in.id}"], "seconds": 30})
    deadline = time.monotonic() + 20
    while busy.info().state != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    outside = tmp_path / "mine"
    client.submit("diag.artifact", {"text": "user's", "output": str(outside), "reject": True}).wait(30)
    dry = {a["id"] for a in client.gc_artifacts(dry_run=True)}
    loser = client.artifact(f"job:{failed.id}")
    assert loser["id"] in dry and client.artifact(f"job:{kept.id}")["id"] not in dry and client.artifact(f"job:{busy_in.id}")["id"] not in dry
    with pytest.raises(ValidationError, match="in use"):
        client.remove_artifact(f"job:{busy_in.id}", force=True)  # a running job uses it: never
    gone = kernel.cli_json("artifacts", "gc")
    assert {a["id"] for a in gone} == dry
    assert not Path(loser["path"]).exists()  # in the state dir: deleted
    assert (outside / "weights.txt").exists()  # the user's own folder: only the record goes
    assert loser["id"] not in {a["id"] for a in client.artifacts()} and loser["id"] in {a["id"] for a in client.artifacts(all=True)}
    busy.cancel()
    busy.wait(30)
    listed = kernel.cli("artifacts", "list").stdout
    assert "MADE BY" in listed and client.artifact(f"job:{kept.id}")["id"][:12] in listed
