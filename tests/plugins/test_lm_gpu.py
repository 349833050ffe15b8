"""The lm plugin on a real GPU (the device machine): train with bfloat16 autocast, generate in
float32 and bfloat16 against transformers, serve from a GPU. Skipped where CUDA is absent."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from tests.conftest import KernelHandle, wait_for_gpu_probe

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]

from llmos.plugins.lm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from llmos.plugins.lm.config import config_from_preset  # noqa: E402
from llmos.plugins.lm.engine import Engine, Sampling  # noqa: E402
from llmos.plugins.lm.model import Llama  # noqa: E402
from llmos.plugins.lm.text import bytes_tokenizer  # noqa: E402

PROMPTS = ["hello world", "abc", "the quick brown fox jumps over", "def main():\n    "]
GPU = {"gpus": 1, "gpu_memory": "4GiB", "cpus": 1}


@pytest.fixture(scope="module")
def gpu_kernel(tmp_path_factory: pytest.TempPathFactory):
    handle = KernelHandle(tmp_path_factory.mktemp("k") / "state").boot()
    try:
        with handle.client() as c:
            wait_for_gpu_probe(c, timeout=90)
            assert any(d["kind"] == "gpu" and not d["fake"] for d in c.devices())
        yield handle
    finally:
        handle.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = bytes_tokenizer()
    model = Llama(config_from_preset("nano", tok.vocab_size))
    model.init_weights(seed=7, std=0.5)
    path = tmp_path_factory.mktemp("gen") / "ck"
    save_checkpoint(path, model, tok.to_json(), {})
    return path


def test_train_on_a_gpu_with_bf16_autocast(gpu_kernel: KernelHandle) -> None:
    with gpu_kernel.client() as c:
        job = c.submit("train", params={"data": "stdlib", "max_bytes": 400_000, "preset": "nano", "tokenizer": "bytes", "steps": 60,
                                        "seq_len": 64, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "eval_every": 30, "eval_batches": 4},
                       resources=GPU)
        result = job.result(timeout=300)
        assert result["val_loss"] < math.log(257) - 1.0, result
        logs = " ".join(str(e.body) for e in job.events(follow=False) if e.type == "job.log")
        assert "cuda" in logs, "the job should say it trains on the GPU"
        model, _ = load_checkpoint(result["checkpoint"], device="cuda")
        cpu_model, _ = load_checkpoint(result["checkpoint"])
        ids = torch.tensor([list(b"def f(x):\n    return x")])
        with torch.no_grad():
            assert torch.allclose(model(ids.cuda()).float().cpu(), cpu_model(ids), atol=2e-3, rtol=2e-3)


def test_generate_on_gpu_float32_equals_transformers_and_bf16_mostly_agrees(checkpoint: Path) -> None:
    model, _ = load_checkpoint(checkpoint, device="cuda")
    engine = Engine(model, bytes_tokenizer(), device="cuda")
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).cuda().eval()
    greedy = Sampling(max_new_tokens=24, temperature=0)
    completions = engine.generate(PROMPTS, greedy)
    for prompt, completion in zip(PROMPTS, completions):
        ids = torch.tensor([engine.tok.encode(prompt)], device="cuda")
        expected = hf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=engine.eos, pad_token_id=engine.eos)[0, ids.shape[1] :].tolist()
        if expected[-1] == engine.eos:
            expected = expected[:-1]
        assert completion.tokens == expected, prompt
    # bfloat16 on a GPU rounds every activation to 8 mantissa bits, so on these random weights a
    # 24-token greedy run drifts apart at its first near-tie (1 of 4 runs stayed equal on an H200).
    # What must hold is each step's choice: teacher-forced on float32's text, bfloat16 picks the
    # same next token at most positions (90-96 % with torch's bfloat16 on a CPU), and its logits
    # stay close (within 8-17 % of the largest there).
    model16, _ = load_checkpoint(checkpoint, device="cuda")
    engine16 = Engine(model16, bytes_tokenizer(), dtype="bfloat16", device="cuda")
    assert [c.finish_reason in ("length", "eos") for c in engine16.generate(PROMPTS, greedy)] == [True] * len(PROMPTS)
    agree = total = 0
    worst = 0.0
    for prompt, completion in zip(PROMPTS, completions):
        n = len(engine.tok.encode(prompt))
        ids = torch.tensor([engine.tok.encode(prompt) + completion.tokens], device="cuda")
        with torch.no_grad():
            ref = engine.model(ids).float()[0, n - 1 : -1]
            got = engine16.model(ids).float()[0, n - 1 : -1]
        agree += int((got.argmax(-1) == torch.tensor(completion.tokens, device="cuda")).sum())
        total += len(completion.tokens)
        worst = max(worst, float((ref - got).abs().max() / ref.abs().max()))
    assert agree >= 0.85 * total and worst < 0.25, f"bfloat16 chose float32's token at {agree} of {total} positions; logits off by {worst:.3f} of the largest"


def test_serve_from_a_gpu(gpu_kernel: KernelHandle, checkpoint: Path) -> None:
    with gpu_kernel.client() as c:
        job = c.submit("serve", params={"model": str(checkpoint), "name": "gpu-nano", "dtype": "bfloat16"}, resources=GPU)
        try:
            deadline = time.monotonic() + 120
            while not any(s["name"] == "gpu-nano" and s["replicas"] for s in c.services()):
                assert time.monotonic() < deadline and not job.info().ended, job.info()
                time.sleep(0.2)
            out = c.generate("gpu-nano", "hello", max_new_tokens=16, temperature=0)
            assert len(out.tokens) > 0 and out.finish_reason in ("length", "eos")
            pieces = list(c.generate("gpu-nano", "abc", max_new_tokens=8, temperature=0, stream=True))
            assert "".join(pieces) == c.generate("gpu-nano", "abc", max_new_tokens=8, temperature=0).text
        finally:
            job.cancel()
            job.wait(timeout=60)
