"""The prune and quantize jobs as users run them: a real kernel, a model trained by llmos, the SDK
and the CLI; the gate's report, rejected outputs refused downstream, quantized checkpoints served
and streamed, bad input refused at submit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llmos
from tests.conftest import KernelHandle, write_word_corpus

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

#: A tiny shape whose widths (64, 128) every int4 group size and 2:4 divide.
SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
GATE = {"eval_windows": 8, "seq_len": 32, "speed_tokens": 4}


@pytest.fixture(scope="module")
def trained(kernel: KernelHandle, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A model llmos trained on a small word corpus (its llmos.json records the corpus), and the job id."""
    root = tmp_path_factory.mktemp("compress")
    (root / "corpus").mkdir()
    corpus = write_word_corpus(root / "corpus", 24)
    with kernel.client() as c:
        job = c.submit("train", params={"data": str(corpus), "config": SHAPE, "vocab_size": 300, "steps": 40, "batch_size": 8, "seq_len": 32,
                                        "eval_every": 0, "output": str(root / "model")})
        info = job.wait(timeout=300)
        assert info.state == "succeeded", info.reason
    return root / "model", job.id


def _quantize(c: llmos.Client, model: str, **params: object) -> llmos.JobInfo:
    return c.submit("quantize", params={"model": model, **GATE, **params}).wait(timeout=300)


def _prune(c: llmos.Client, model: str, **params: object) -> llmos.JobInfo:
    return c.submit("prune", params={"model": model, **GATE, **params}).wait(timeout=300)


def _check_report(report: dict, accepted: bool = True) -> None:
    for side in ("before", "after"):
        fig = report[side]
        for key in ("ppl", "bytes", "params", "nonzero", "peak_memory", "agreement"):
            assert fig[key] is not None and fig[key] >= 0, (side, key)
        assert fig["tokens_per_s"]["batch_1"] > 0 and fig["tokens_per_s"]["batch_8"] > 0
    assert report["before"]["agreement"] == 1.0
    assert report["accepted"] is accepted


def test_quantize_int8_passes_the_gate_and_serves(client: llmos.Client, trained: tuple[Path, int], tmp_path: Path) -> None:
    model, _ = trained
    info = _quantize(client, str(model), scheme="int8", output=str(tmp_path / "int8"))
    assert info.state == "succeeded", info.reason
    report = info.result["report"]
    _check_report(report)
    assert report["after"]["bytes"] < 0.6 * report["before"]["bytes"]
    assert report["after"]["agreement"] > 0.9
    assert report["ppl_increase"] <= 0.05
    manifest = json.loads((tmp_path / "int8" / "llmos.json").read_text())
    assert manifest["quantization"]["scheme"] == "int8" and manifest["report"]["accepted"] is True
    assert json.loads((tmp_path / "int8" / "config.json").read_text())["quantization_config"]["format"] == "int-quantized"
    # The quantized checkpoint is an ordinary model to the other jobs: generate, eval, serve.
    completion = client.generate(str(tmp_path / "int8"), "alpha beta", max_new_tokens=8, temperature=0)
    assert completion.tokens
    assert client.submit("eval", {"model": str(tmp_path / "int8"), "batches": 2, "batch_size": 2, "seq_len": 32, "max_new_tokens": 2}).wait(timeout=120).state == "succeeded"
    job = client.submit("serve", {"model": str(tmp_path / "int8"), "name": "q8", "max_len": 64, "max_seqs": 4})
    try:
        import time

        deadline = time.monotonic() + 60
        while not any(s["name"] == "q8" for s in client.services()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pieces = list(client.generate("q8", "alpha beta", stream=True, max_new_tokens=8, temperature=0))
        assert "".join(pieces) == completion.text
    finally:
        job.cancel()


def test_int4_gptq_from_a_job_reference(client: llmos.Client, trained: tuple[Path, int], tmp_path: Path) -> None:
    _, train_id = trained
    info = _quantize(client, f"job:{train_id}", scheme="int4", method="gptq", group_size=32, calib_tokens=512, output=str(tmp_path / "q4"))
    assert info.state == "succeeded", info.reason
    report = info.result["report"]
    _check_report(report)
    assert report["after"]["bytes"] < 0.5 * report["before"]["bytes"]
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (group["num_bits"], group["group_size"], group["strategy"]) == (4, 32, "group")


def test_tight_gate_rejects_and_rejected_models_are_refused(client: llmos.Client, trained: tuple[Path, int], tmp_path: Path) -> None:
    model, _ = trained
    out = tmp_path / "wrecked"
    info = _prune(client, str(model), method="magnitude", sparsity=0.9, max_ppl_increase=0.0, output=str(out))
    assert info.state == "failed"
    assert "perplexity rose" in info.reason and "max_ppl_increase 0.0%" in info.reason
    manifest = json.loads((out / "llmos.json").read_text())
    assert manifest["rejected"]["reason"].startswith("perplexity rose") and manifest["report"]["accepted"] is False
    for kind, params in (("serve", {"name": "nope"}), ("eval", {}), ("generate", {"prompts": ["a"]}), ("quantize", {}), ("prune", {"method": "magnitude", "sparsity": 0.1})):
        with pytest.raises(llmos.JobRejected, match="rejected by its quality gate"):
            client.submit(kind, {"model": str(out), **params})
    ok = client.submit("eval", {"model": str(out), "allow_rejected": True, "batches": 1, "batch_size": 2, "seq_len": 32, "max_new_tokens": 1}).wait(timeout=120)
    assert ok.state == "succeeded", ok.reason


def test_loose_gate_passes_wanda(client: llmos.Client, trained: tuple[Path, int], tmp_path: Path) -> None:
    model, _ = trained
    info = _prune(client, str(model), method="wanda", sparsity=0.5, max_ppl_increase=100.0, calib_tokens=512, output=str(tmp_path / "w"))
    assert info.state == "succeeded", info.reason
    report = info.result["report"]
    _check_report(report)
    assert report["after"]["params"] == report["before"]["params"]
    assert report["after"]["nonzero"] < report["before"]["nonzero"]
    manifest = json.loads((tmp_path / "w" / "llmos.json").read_text())
    assert manifest["sparsity"]["method"] == "wanda"
    assert abs(manifest["pruning"]["achieved"]["sparsity"] - 0.5) < 0.01


def test_structured_with_healing_gives_a_smaller_dense_model(client: llmos.Client, trained: tuple[Path, int], tmp_path: Path) -> None:
    model, _ = trained
    info = _prune(client, str(model), method="structured", sparsity=0.3, heal_steps=10, distill=True, max_ppl_increase=100.0, calib_tokens=512,
                  output=str(tmp_path / "s"))
    assert info.state == "succeeded", info.reason
    report = info.result["report"]
    assert report["after"]["params"] < report["before"]["params"]
    assert report["prune"]["healed"]["steps"] == 10 and report["prune"]["healed"]["distill"] is True
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["intermediate_size"] < SHAPE["intermediate_size"] or config["num_key_value_heads"] < SHAPE["num_key_value_heads"]


def test_cli_prints_the_table_and_eval_compares(kernel: KernelHandle, trained: tuple[Path, int], tmp_path: Path) -> None:
    model, _ = trained
    gate = [f"-p{k}={v}" for k, v in GATE.items()]
    out = kernel.cli("quantize", str(model), "--scheme", "w8a8", "--output", str(tmp_path / "w8"), *gate)
    assert "perplexity" in out.stdout and "decode tok/s b1" in out.stdout and "accepted" in out.stdout
    data = json.loads(kernel.cli("prune", str(model), "--method", "2:4", "--scores", "magnitude", "--output", str(tmp_path / "24"), "--max-ppl-increase", "100", *gate, "--json").stdout)
    assert data["state"] == "succeeded" and data["result"]["report"]["accepted"] is True
    table = kernel.cli("eval", str(model), str(tmp_path / "w8"), str(tmp_path / "24"), *gate).stdout
    assert "w8" in table and "24" in table and "agreement" in table
    kernels = kernel.cli("kernels", str(tmp_path / "w8")).stdout
    assert "w8a8:" in kernels


def test_bad_input_fails_at_submit(client: llmos.Client, trained: tuple[Path, int], tmp_path: Path) -> None:
    from llmos.plugins.compress.quantize import quantize_model
    from llmos.plugins.lm.checkpoint import save_checkpoint
    from llmos.plugins.lm.config import LlamaConfig
    from llmos.plugins.lm.model import Llama

    model, _ = trained
    record = json.loads((model / "llmos.json").read_text())["data"]
    odd = Llama(LlamaConfig(vocab_size=300, hidden_size=72, intermediate_size=90, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    save_checkpoint(tmp_path / "odd", odd, None, {"data": record})
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ("prune", {"model": str(model), "method": "magnitude", "sparsity": 1.0}, "sparsity"),
        ("prune", {"model": str(model), "method": "magnitude", "sparsity": -0.1}, "sparsity"),
        ("prune", {"model": str(model), "method": "magnitude"}, "needs sparsity"),
        ("prune", {"model": str(model), "method": "pick"}, "method"),
        ("prune", {"model": str(tmp_path / "odd"), "method": "2:4"}, "divisible by 4"),
        ("prune", {"model": str(model), "method": "structured", "heads": 0.99}, "all 2 key/value groups"),
        ("prune", {"model": str(model), "method": "wanda", "sparsity": 0.5, "calib_data": str(empty)}, "no text"),
        ("quantize", {"model": str(model), "scheme": "int3"}, "scheme"),
        ("quantize", {"model": str(tmp_path / "odd"), "scheme": "int4", "group_size": 64}, "does not divide the input width 72"),
        ("quantize", {"model": str(model), "scheme": "int8", "method": "gptq"}, "gptq is for scheme=int4"),
        ("quantize", {"model": str(tmp_path / "missing")}, "does not exist"),
        ("quantize", {"model": "job:x"}, "job number"),
    ]
    quantized = quantize_model(Llama(odd.config), "int8")
    from llmos.plugins.compress.ctformat import quantization_config

    save_checkpoint(tmp_path / "q", quantized, None, {"data": record}, config_extra={"quantization_config": quantization_config("int8", 128, True, "quantize", "rtn")})
    cases += [
        ("quantize", {"model": str(tmp_path / "q"), "scheme": "int4"}, "already quantized"),
        ("prune", {"model": str(tmp_path / "q"), "method": "magnitude", "sparsity": 0.5}, "is quantized"),
    ]
    for kind, params, message in cases:
        with pytest.raises(llmos.JobRejected, match=message):
            client.submit(kind, params)
            pytest.fail(f"{kind} {params} was accepted")
