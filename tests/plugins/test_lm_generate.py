"""Inference: the engine against transformers, sampling, the generate job, SDK and CLI streaming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llmos
from tests.conftest import KernelHandle

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmos.plugins.lm.checkpoint import save_checkpoint  # noqa: E402
from llmos.plugins.lm.config import config_from_preset  # noqa: E402
from llmos.plugins.lm.engine import Engine, Sampling  # noqa: E402
from llmos.plugins.lm.model import Llama  # noqa: E402
from llmos.plugins.lm.text import bytes_tokenizer  # noqa: E402

PROMPTS = ["hello world", "abc", "the quick brown fox jumps over", "def main():\n    "]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = bytes_tokenizer()
    model = Llama(config_from_preset("nano", tok.vocab_size))
    model.init_weights(seed=7, std=0.5)  # well-separated logits: greedy has no near-ties
    path = tmp_path_factory.mktemp("gen") / "ck"
    save_checkpoint(path, model, tok.to_json(), {})
    return path


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Engine:
    from llmos.plugins.lm.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    return Engine(model, bytes_tokenizer())


def test_greedy_equals_transformers_token_for_token(engine: Engine, checkpoint: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    completions = engine.generate(PROMPTS, Sampling(max_new_tokens=24, temperature=0))
    for prompt, completion in zip(PROMPTS, completions):
        ids = torch.tensor([engine.tok.encode(prompt)])
        expected = hf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=engine.eos, pad_token_id=engine.eos)[0, ids.shape[1] :].tolist()
        if expected[-1] == engine.eos:  # transformers keeps the end-of-sequence token; a Completion does not
            assert completion.finish_reason == "eos"
            expected = expected[:-1]
        else:
            assert completion.finish_reason == "length"
        assert completion.tokens == expected, prompt
        assert completion.text == engine.tok.decode(expected)


def test_alone_equals_in_a_batch_and_seeds_reproduce(engine: Engine) -> None:
    s = Sampling(max_new_tokens=16, temperature=0.8, top_k=40, top_p=0.9, seed=11)
    batch = engine.generate(PROMPTS, s)
    alone = engine.generate([PROMPTS[2]], s)[0]
    assert alone.tokens == batch[2].tokens
    again = engine.generate([PROMPTS[2]], s)[0]
    assert again.tokens == alone.tokens
    other = engine.generate([PROMPTS[2]], Sampling(max_new_tokens=16, temperature=0.8, top_k=40, top_p=0.9, seed=12))[0]
    assert other.tokens != alone.tokens


def test_stops_and_limits(engine: Engine) -> None:
    free = engine.generate(["abc"], Sampling(max_new_tokens=30, temperature=0))[0]
    stop = free.text[5:8]
    cut = engine.generate(["abc"], Sampling(max_new_tokens=30, temperature=0, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]
    tok_stop = engine.generate(["abc"], Sampling(max_new_tokens=30, temperature=0, stop_tokens=(free.tokens[3],)))[0]
    assert tok_stop.finish_reason == "stop" and tok_stop.tokens == free.tokens[: free.tokens.index(free.tokens[3])]
    with pytest.raises(ValueError, match="context window is 512"):
        engine.generate(["x" * 600], Sampling(max_new_tokens=1))
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(["x"], Sampling(top_p=0))
    penalized = engine.generate(["abc"], Sampling(max_new_tokens=30, temperature=0, repetition_penalty=5.0))[0]
    assert len(set(penalized.tokens)) >= len(set(free.tokens))


def test_generate_job_sdk_and_cli(kernel: KernelHandle, checkpoint: Path, engine: Engine, tmp_path: Path) -> None:
    expected = engine.generate(PROMPTS, Sampling(max_new_tokens=12, temperature=0))
    with kernel.client() as c:
        completion = c.generate(checkpoint, PROMPTS[0], max_new_tokens=12, temperature=0)
        assert isinstance(completion, llmos.Completion) and completion.tokens == expected[0].tokens
        assert completion.timings["ttft_s"] >= 0 and completion.finish_reason == expected[0].finish_reason
        pieces = list(c.generate(checkpoint, PROMPTS[1], stream=True, max_new_tokens=12, temperature=0))
        assert len(pieces) > 1 and "".join(pieces) == expected[1].text
        prompts_file = tmp_path / "prompts.jsonl"
        prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
        job = c.submit("generate", params={"model": str(checkpoint), "prompts_file": str(prompts_file), "max_new_tokens": 12, "temperature": 0, "batch_size": 3})
        result = job.result(timeout=120)
        lines = [json.loads(line) for line in Path(result["output"]).read_text().splitlines()]
        assert [r["prompt"] for r in lines] == PROMPTS and [r["tokens"] for r in lines] == [e.tokens for e in expected]
        assert [e.body["kind"] for e in job.events(follow=False) if e.type == "job.artifact"] == ["completions"]
        with pytest.raises(llmos.JobRejected, match="not a checkpoint"):
            c.generate(tmp_path, "x")
        with pytest.raises(llmos.JobRejected, match="temperature"):
            c.generate(checkpoint, "x", temperature=-1)
        too_long = c.submit("generate", params={"model": str(checkpoint), "prompts": ["y" * 600]}).wait(timeout=120)
        assert too_long.state == "failed" and "context window" in too_long.reason
    out = kernel.cli("generate", str(checkpoint), PROMPTS[3], "--max-new-tokens", "12", "--temperature", "0").stdout
    assert out.rstrip("\n") == expected[3].text.rstrip("\n") or out.startswith(expected[3].text[:5])
