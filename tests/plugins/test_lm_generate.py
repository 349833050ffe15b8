"""Inference: the engine against transformers, sampling, the generate job, SDK and CLI streaming."""

from __future__ import annotations

import json
from collections.abc import Iterator
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


def test_torch_path_and_bf16_weights_agree_with_the_c_step(engine: Engine, checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The C decode step (default) and the torch path give the same greedy tokens; bfloat16
    weights (float32 activations and cache on a CPU) agree with float32 on most prompts."""
    from llmos.plugins.lm import kernels
    from llmos.plugins.lm.checkpoint import load_checkpoint

    greedy = Sampling(max_new_tokens=24, temperature=0)
    expected = [c.tokens for c in engine.generate(PROMPTS, greedy)]
    runs = {}
    for path in ("auto", "torch"):
        monkeypatch.setenv("LLMOS_BF16_KERNEL", path)
        kernels._reset()
        try:
            f32 = Engine(load_checkpoint(checkpoint)[0], bytes_tokenizer())
            b16 = Engine(load_checkpoint(checkpoint)[0], bytes_tokenizer(), dtype="bfloat16")
            assert (f32.decoder.native is None) == (kernels.kernel_status().path == "torch")
            assert b16.dtype == torch.float32 and b16.new_cache(1, 8).k.dtype == torch.float32
            assert b16.model.lm_head.weight.dtype == torch.bfloat16 and b16.model.model.embed_tokens.weight.dtype == torch.float32
            runs[path] = [c.tokens for c in f32.generate(PROMPTS, greedy)], [c.tokens for c in b16.generate(PROMPTS, greedy)]
        finally:
            kernels._reset()
    assert runs["auto"][0] == expected and runs["torch"][0] == expected
    for _, bf16 in runs.values():
        same = sum(a == b for a, b in zip(bf16, expected))
        assert same >= len(PROMPTS) // 2 + 1, f"bfloat16 agreed with float32 on {same} of {len(PROMPTS)}"


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


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"seed": 1.5}, "seed"),
        ({"seed": "a"}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
        ({"stop": 5}, "stop"),
        ({"stop": ("ok", 5)}, "stop"),
        ({"stop": ("",)}, "must not be empty"),
        ({"stop": ""}, "must not be empty"),
        ({"stop_tokens": ("a",)}, "stop_tokens"),
        ({"stop_tokens": 5}, "stop_tokens"),
        ({"stop_tokens": (-1,)}, "stop_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"max_new_tokens": "8"}, "max_new_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_p": None}, "top_p"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ],
)
def test_sampling_checks_every_field(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Sampling(**options).validate()


def test_sampling_takes_lists_and_one_stop_string() -> None:
    s = Sampling(stop=["a", "bc"], stop_tokens=[1, 2], seed=3, temperature=1).validate()
    assert s.stop == ("a", "bc") and s.stop_tokens == (1, 2)
    assert Sampling(stop="END").validate().stop == ("END",)  # one stop string, not three


def test_the_stream_never_shows_what_a_stop_string_cuts(engine: Engine) -> None:
    free = engine.generate(["abc"], Sampling(max_new_tokens=30, temperature=0))[0]
    stop = free.text[5:8]
    unfinished = free.text[10:12] + "\x00\x00"  # its start appears; the whole never does
    for stops in [(stop,), (unfinished,), (unfinished, stop)]:
        pieces: list[str] = []
        completion = engine.generate(["abc"], Sampling(max_new_tokens=30, temperature=0, stop=stops), on_token=lambda _i, _t, piece, pieces=pieces: pieces.append(piece))[0]
        assert "".join(pieces) == completion.text, stops
        assert completion.text == (free.text[: free.text.find(stop)] if stop in stops else free.text)


def test_timings_count_from_arrival(engine: Engine) -> None:
    import time

    arrived = time.perf_counter()
    time.sleep(0.2)  # as if it waited in a service's queue
    cache = engine.new_cache(1, 64)
    seq = engine.start("abc", Sampling(max_new_tokens=4, temperature=0), 0, arrived=arrived)
    engine.prefill(seq, cache)
    while seq.finish is None:
        engine.decode([seq], cache)
    timings = engine.completion(seq).timings
    assert timings["queue_s"] >= 0.2 and timings["ttft_s"] >= timings["queue_s"] and timings["total_s"] >= timings["ttft_s"]
    direct = engine.generate(["abc"], Sampling(max_new_tokens=4, temperature=0))[0].timings
    assert direct["queue_s"] < 0.05 and direct["ttft_s"] < 0.2


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
        # A directory that is not a checkpoint (this one has no config.json): refused at submit, saying what it lacks.
        with pytest.raises(llmos.JobRejected, match=r"is not a checkpoint: it has no config\.json and no model\.safetensors"):
            c.generate(tmp_path, "x")
        with pytest.raises(llmos.JobRejected, match="does not exist"):
            c.generate(tmp_path / "no-such-model", "x")
        with pytest.raises(llmos.JobRejected, match="temperature"):
            c.generate(checkpoint, "x", temperature=-1)
        too_long = c.submit("generate", params={"model": str(checkpoint), "prompts": ["y" * 600]}).wait(timeout=120)
        assert too_long.state == "failed" and "context window" in too_long.reason
    out = kernel.cli("generate", str(checkpoint), PROMPTS[3], "--max-new-tokens", "12", "--temperature", "0").stdout
    assert out.rstrip("\n") == expected[3].text.rstrip("\n") or out.startswith(expected[3].text[:5])


@pytest.fixture(autouse=True)
def _services_stopped(request: pytest.FixtureRequest) -> Iterator[None]:
    """The kernel is shared by this module's tests: a test's services (and the cores they hold)
    end with it, whether it passed or not."""
    yield
    if "kernel" not in request.fixturenames:
        return
    kernel: KernelHandle = request.getfixturevalue("kernel")
    with kernel.client() as c:
        serving = [c.job(job.id) for job in c.jobs(state="running") if job.kind == "serve"]
        for job in serving:
            job.cancel()
        for job in serving:
            job.wait(timeout=30)


def _wait_replicas(c: llmos.Client, name: str, n: int = 1, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not any(s["name"] == name and len(s["replicas"]) >= n for s in c.services()):
        assert time.monotonic() < deadline, c.services()
        time.sleep(0.05)


@pytest.mark.slow
def test_serve_continuous_batching_streams_and_recovers(kernel: KernelHandle, checkpoint: Path, engine: Engine) -> None:
    import os
    import signal
    import threading
    import time

    out = kernel.cli("serve", str(checkpoint), "--name", "tiny", "--max-seqs", "3", timeout=120).stdout
    assert "serving" in out and "'tiny'" in out
    listed = kernel.cli_json("services")
    assert listed[0]["name"] == "tiny" and len(listed[0]["replicas"]) == 1
    prompts = [f"request {i}: " for i in range(8)]
    expected = {p: engine.generate([p], Sampling(max_new_tokens=20, temperature=0))[0] for p in prompts}
    with kernel.client() as c:
        solo = c.generate("tiny", prompts[0], max_new_tokens=20, temperature=0)
        assert solo.tokens == expected[prompts[0]].tokens and solo.timings["ttft_s"] > 0
        # Eight concurrent streaming clients on three slots: each gets its own complete, ordered text.
        got: dict[str, str] = {}

        def client_thread(prompt: str) -> None:
            with kernel.client() as cc:
                got[prompt] = "".join(cc.generate("tiny", prompt, stream=True, max_new_tokens=20, temperature=0))

        threads = [threading.Thread(target=client_thread, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got == {p: expected[p].text for p in prompts}
        with pytest.raises(llmos.ValidationError, match="top_p"):
            c.generate("tiny", "x", top_p=5)
        with pytest.raises(llmos.ServiceUnavailable, match="no service named 'nope'"):
            c.generate("nope", "x")
        # Kill the replica with a stream in flight: the caller gets an error, not a hang; the
        # service comes back. The replica is stopped first, so the stream cannot end before the kill.
        pid = c.services()[0]["replicas"][0]["pid"]
        os.kill(pid, signal.SIGSTOP)
        failure: list[BaseException] = []

        def follow() -> None:
            try:
                for _ in c.generate("tiny", "long one: ", stream=True, max_new_tokens=400, temperature=0):
                    pass
            except BaseException as exc:  # what the caller was told, checked below
                failure.append(exc)

        follower = threading.Thread(target=follow)
        follower.start()
        deadline = time.monotonic() + 30
        while c.services()[0]["in_flight"] < 1:
            assert time.monotonic() < deadline, c.services()
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        follower.join(60)
        assert not follower.is_alive(), "the stream hung after its replica died"
        assert failure and isinstance(failure[0], llmos.ServiceError) and "replica stopped" in str(failure[0]), failure
        _wait_replicas(c, "tiny")
        assert c.generate("tiny", prompts[1], max_new_tokens=20, temperature=0).tokens == expected[prompts[1]].tokens


@pytest.mark.slow
def test_serve_says_busy_past_its_queue(kernel: KernelHandle, checkpoint: Path) -> None:
    import threading

    with kernel.client() as c:
        job = c.submit("serve", params={"model": str(checkpoint), "name": "narrow", "max_seqs": 1, "max_queue": 0})
        _wait_replicas(c, "narrow")
        errors: list[str] = []

        def hammer() -> None:
            with kernel.client() as cc:
                try:
                    cc.generate("narrow", "busy? ", max_new_tokens=200, temperature=0)
                except llmos.ServiceBusy as exc:
                    errors.append(str(exc))

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors and "is busy" in errors[0]
        job.cancel()
        assert job.wait(timeout=30).state == "cancelled"


@pytest.mark.slow
def test_a_caller_that_dies_frees_its_slot(kernel: KernelHandle, checkpoint: Path) -> None:
    import subprocess
    import sys
    import time

    with kernel.client() as c:
        job = c.submit("serve", params={"model": str(checkpoint), "name": "solo", "max_seqs": 1, "max_queue": 0})
        _wait_replicas(c, "solo")
        code = (
            "import llmos, os\n"
            f"c = llmos.connect({str(kernel.state_dir)!r})\n"
            "s = c.generate('solo', 'x', stream=True, max_new_tokens=100000, temperature=0)\n"
            "next(s)\n"
            "os._exit(0)\n"  # gone without closing the stream
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        deadline = time.monotonic() + 30
        while True:  # the one slot comes free once the kernel finds the caller gone
            try:
                assert c.generate("solo", "y", max_new_tokens=3, temperature=0).finish_reason in ("length", "eos")
                break
            except llmos.ServiceBusy:
                assert time.monotonic() < deadline, "the dead caller's slot was never freed"
                time.sleep(0.2)
        job.cancel()
        job.wait(timeout=30)


def test_a_checkpoint_carries_its_sampling_defaults_and_generate_uses_them(kernel: KernelHandle, checkpoint: Path, tmp_path: Path) -> None:
    """save_checkpoint writes generation_config.json (transformers reads it); a generate job that
    names no sampling options takes the model's, and what it names wins."""
    import shutil

    from transformers import GenerationConfig

    from llmos.plugins.lm.checkpoint import GENERATION_DEFAULTS, read_generation_config

    hf = GenerationConfig.from_pretrained(checkpoint)
    assert hf.do_sample is True and hf.temperature == GENERATION_DEFAULTS["temperature"] and hf.top_p == GENERATION_DEFAULTS["top_p"]
    assert read_generation_config(checkpoint)["temperature"] == 0.7
    greedy = tmp_path / "greedy"
    shutil.copytree(checkpoint, greedy)
    (greedy / "generation_config.json").write_text(json.dumps({"do_sample": False, "top_k": 1}))
    with kernel.client() as c:
        used = c.submit("generate", params={"model": str(checkpoint), "prompts": ["ab"], "max_new_tokens": 4}).result(timeout=120)["sampling"]
        assert used == {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.0}
        asked = c.submit("generate", params={"model": str(checkpoint), "prompts": ["ab"], "max_new_tokens": 4, "temperature": 0.2}).result(timeout=120)
        assert asked["sampling"]["temperature"] == 0.2 and asked["sampling"]["top_p"] == 0.9
        assert c.submit("generate", params={"model": str(greedy), "prompts": ["ab"], "max_new_tokens": 4}).result(timeout=120)["sampling"]["temperature"] == 0.0
