"""A job's checkpoint artifact as a model: ``job:ID`` in the SDK and in generate, eval and serve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llmos
from tests.conftest import KernelHandle

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def trained(kernel: KernelHandle, tmp_path_factory: pytest.TempPathFactory) -> int:
    corpus = tmp_path_factory.mktemp("c")
    (corpus / "a.txt").write_text("alpha beta gamma delta. " * 400)
    with kernel.client() as c:
        job = c.submit("train", params={"data": str(corpus), "preset": "nano", "tokenizer": "bytes", "steps": 4, "seq_len": 32, "batch_size": 4,
                                        "checkpoint_every": 2, "eval_batches": 1})
        job.result(timeout=180)
        return job.id


def test_job_reference_resolves_to_its_newest_checkpoint(client: llmos.Client, trained: int) -> None:
    job = client.job(trained)
    found = job.artifacts("checkpoint")
    assert len(found) >= 2 and found[-1]["path"] == job.info().result["checkpoint"]
    assert client.resolve_model(f"job:{trained}") == found[-1]["path"]
    assert client.resolve_model("/some/dir") == "/some/dir"
    out = client.generate(f"job:{trained}", "alpha", max_new_tokens=4, temperature=0)
    assert len(out.tokens) == 4 or out.finish_reason == "eos"


def test_bad_job_references_are_clear(client: llmos.Client) -> None:
    echo = client.submit("diag.echo", params={"message": "x"})
    echo.wait(timeout=30)
    with pytest.raises(llmos.errors.ValidationError, match=f"job {echo.id} published no checkpoint"):
        client.resolve_model(f"job:{echo.id}")
    with pytest.raises(llmos.errors.JobNotFound):
        client.resolve_model("job:999999")
    with pytest.raises(llmos.errors.ValidationError, match="job:ID"):
        client.generate("job:latest", "x")


def test_eval_and_serve_take_a_job_reference(kernel: KernelHandle, trained: int) -> None:
    ev = json.loads(kernel.cli("eval", f"job:{trained}", "-p", "batches=1", "-p", "seq_len=32", "--json").stdout)
    assert ev["state"] == "succeeded" and Path(ev["params"]["model"]).name == "checkpoint"
    served = json.loads(kernel.cli("serve", f"job:{trained}", "--json").stdout)
    assert served["name"] == f"job-{trained}"
    with kernel.client() as c:
        try:
            assert c.generate(f"job-{trained}", "alpha", max_new_tokens=3, temperature=0).text is not None
        finally:
            for replica in served["replicas"]:
                c.job(replica["job_id"]).cancel()
