"""The serve service under stress: bad requests, stop strings in streams, one client with many
requests, long and queued requests, stopping with requests in flight, and its CLI options."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import llmos
from tests.conftest import KernelHandle, write_endless_nano

torch = pytest.importorskip("torch")

from llmos.plugins.lm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from llmos.plugins.lm.config import config_from_preset  # noqa: E402
from llmos.plugins.lm.engine import Engine, Sampling  # noqa: E402
from llmos.plugins.lm.model import Llama  # noqa: E402
from llmos.plugins.lm.text import bytes_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_endless_nano(tmp_path_factory.mktemp("serve") / "long")


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Engine:
    return Engine(load_checkpoint(checkpoint)[0], bytes_tokenizer())


def _expected(engine: Engine, prompt: str, **options: object) -> llmos.Completion:
    return engine.generate([prompt], Sampling(**{**GREEDY, **options}))[0]  # type: ignore[arg-type]


def _wait(what: str, ok: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ok():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"still waiting for {what} after {timeout}s"
        time.sleep(0.05)


def _in_flight(c: llmos.Client, name: str) -> int:
    return next((s["in_flight"] for s in c.services() if s["name"] == name), 0)


@pytest.fixture
def serve(kernel: KernelHandle, checkpoint: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., tuple[str, llmos.Job]]]:
    """Start a serve job named after the test with these params; it is cancelled at the end (two
    would not fit this machine's cores together)."""
    name = request.node.name.removeprefix("test_").replace("_", "-")[:40]
    jobs: list[llmos.Job] = []
    with kernel.client() as c:

        def start(**params: object) -> tuple[str, llmos.Job]:
            jobs.append(c.submit("serve", params={"model": str(checkpoint), "name": name, "max_len": 4096, **params}))
            _wait(f"service {name}", lambda: any(s["name"] == name for s in c.services()))
            return name, jobs[-1]

        try:
            yield start
        finally:
            for job in jobs:
                if not job.info().ended:
                    job.cancel()
                job.wait(timeout=60)


def _plain(text: str, start: int, n: int) -> str:
    """The first ``n`` characters of ``text`` from ``start`` on with no U+FFFD among them (a
    character still being decoded reads as one, which a stop string should not lean on)."""
    at = next(i for i in range(start, len(text) - n) if "\ufffd" not in text[i : i + n])
    return text[at : at + n]


def test_bad_requests_fail_alone(kernel: KernelHandle, engine: Engine, serve: Callable[..., tuple[str, llmos.Job]]) -> None:
    name, job = serve(max_seqs=2)
    expected = _expected(engine, "still here: ", max_new_tokens=3000)
    with kernel.client() as c, kernel.client() as other:
        stream = c.generate(name, "still here: ", stream=True, max_new_tokens=3000, **GREEDY)
        pieces = [next(stream)]  # in flight while the bad requests come
        bad: list[dict] = [
            {"stop": 5}, {"seed": 1.5}, {"seed": "a"}, {"stop": [""]}, {"stop": ""}, {"stop": [1]},
            {"stop_tokens": ["x"]}, {"temperature": True}, {"max_new_tokens": "many"}, {"top_k": None},
        ]
        for options in bad:
            with pytest.raises(llmos.ValidationError):
                other.generate(name, "x", **options)
        for body in [{"prompt": "x", "sampling": "greedy"}, {"prompt": "x", "sampling": [["seed", 1]]}, {"prompt": 5}, {"sampling": {}}]:
            with pytest.raises(llmos.ValidationError):
                list(other.call(name, body))
        with pytest.raises(llmos.ValidationError, match="unknown request field 'max_new_tokens' \\(a sampling option: put it in 'sampling'\\)"):
            list(other.call(name, {"prompt": "x", "max_new_tokens": 5}))  # not silently 64 tokens
        pieces.extend(stream)
        assert "".join(pieces) == expected.text
        # One stop string is one string, not its characters (and the service still answers).
        text = expected.text
        at = next(i for i in range(1, len(text) - 1) if text[i] in text[:i] and text.find(text[i : i + 2]) == i and "\ufffd" not in text[i : i + 2])
        stop = text[at : at + 2]  # its first character came before: cut there if taken as characters
        cut = other.generate(name, "still here: ", stop=stop, max_new_tokens=3000, **GREEDY)
        assert cut.finish_reason == "stop" and cut.text == text[:at]
    assert job.info().state == "running"


def test_streams_never_show_what_a_stop_string_cuts(kernel: KernelHandle, engine: Engine, serve: Callable[..., tuple[str, llmos.Job]]) -> None:
    name, _ = serve(max_seqs=2)
    free = _expected(engine, "abc", max_new_tokens=200).text
    stops = [_plain(free, 40, 3), _plain(free, 100, 2) + "\x00\x00"]  # one ends the text; the other only begins in it
    with kernel.client() as c:
        for stop in stops:
            whole = c.generate(name, "abc", stop=[stop], max_new_tokens=200, **GREEDY)
            streamed = "".join(c.generate(name, "abc", stream=True, stop=[stop], max_new_tokens=200, **GREEDY))
            assert streamed == whole.text == _expected(engine, "abc", stop=(stop,), max_new_tokens=200).text
        assert whole.text == free


def test_one_client_many_requests(kernel: KernelHandle, engine: Engine, serve: Callable[..., tuple[str, llmos.Job]]) -> None:
    name, _ = serve(max_seqs=3)
    prompts = ["first: ", "second: ", "third: "]
    expected = [_expected(engine, p, max_new_tokens=300).text for p in prompts]
    with kernel.client() as c:
        # Another request while a stream is open: the stream loses nothing.
        stream = c.generate(name, prompts[0], stream=True, max_new_tokens=300, **GREEDY)
        got = [next(stream)]
        time.sleep(0.3)  # its pieces arrive meanwhile
        assert any(s["name"] == name for s in c.services())
        got.extend(stream)
        assert "".join(got) == expected[0]
        # Two streams open at once, read in turns, and a whole request between their pieces.
        streams = [c.generate(name, p, stream=True, max_new_tokens=300, **GREEDY) for p in prompts[1:]]
        texts = [next(s) for s in streams]
        assert c.generate(name, prompts[0], max_new_tokens=10, **GREEDY).text == expected[0][:10]
        reading = [True, True]
        while any(reading):
            for i, s in enumerate(streams):
                piece = next(s, None) if reading[i] else None
                reading[i] = piece is not None
                texts[i] += piece or ""
        assert texts == expected[1:]


def test_queued_and_long_requests_wait_without_timing_out(kernel: KernelHandle, engine: Engine, serve: Callable[..., tuple[str, llmos.Job]]) -> None:
    name, _ = serve(max_seqs=1, max_queue=4)
    expected = _expected(engine, "patient: ", max_new_tokens=2500)
    with kernel.client() as busy, llmos.connect(kernel.state_dir, timeout=0.5) as c:
        hog = busy.generate(name, "hog: ", stream=True, max_new_tokens=2500, **GREEDY)
        next(hog)  # the one slot is taken
        result: dict[str, object] = {}

        def streamed() -> None:
            with llmos.connect(kernel.state_dir, timeout=0.5) as cc:
                result["stream"] = "".join(cc.generate(name, "patient: ", stream=True, max_new_tokens=2500, **GREEDY))

        t = threading.Thread(target=streamed)
        t.start()
        start = time.monotonic()
        completion = c.generate(name, "patient: ", max_new_tokens=2500, **GREEDY)  # queued, then silent until done
        wall = time.monotonic() - start
        t.join(120)
        list(hog)
    assert completion.text == expected.text and result["stream"] == expected.text
    assert wall > 0.5, "the test needs a wait longer than the client's timeout"
    # Its time in the queue counts: ttft is from its arrival at the replica, not from its slot.
    timings = completion.timings
    assert timings["queue_s"] > 0.1 and timings["ttft_s"] >= timings["queue_s"]
    assert timings["total_s"] <= wall and timings["total_s"] > 0.5 * wall


def test_stopping_fails_running_and_queued_requests(kernel: KernelHandle, serve: Callable[..., tuple[str, llmos.Job]]) -> None:
    name, job = serve(max_seqs=1, max_queue=4, max_len=32768)
    errors: dict[int, BaseException | None] = {}

    def caller(i: int, stream: bool) -> None:
        with kernel.client() as cc:
            try:
                if stream:
                    for _ in cc.generate(name, f"caller {i}: ", stream=True, max_new_tokens=30000, **GREEDY):
                        pass
                else:
                    cc.generate(name, f"caller {i}: ", max_new_tokens=30000, **GREEDY)
                errors[i] = None
            except BaseException as exc:
                errors[i] = exc

    threads = [threading.Thread(target=caller, args=(i, i % 2 == 0)) for i in range(3)]
    with kernel.client() as c:
        threads[0].start()
        _wait("the first request", lambda: _in_flight(c, name) == 1)
        for t in threads[1:]:
            t.start()
        _wait("all three requests", lambda: _in_flight(c, name) == 3)
        job.cancel()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a caller hangs after its service was stopped"
        assert job.wait(timeout=60).state == "cancelled"
    assert sorted(errors) == [0, 1, 2]
    for exc in errors.values():
        assert isinstance(exc, llmos.ServiceError) and f"service {name!r} is stopping" in str(exc), exc


def test_cli_generate_options(kernel: KernelHandle, engine: Engine, serve: Callable[..., tuple[str, llmos.Job]]) -> None:
    name, _ = serve(max_seqs=1)
    free = _expected(engine, "abc", max_new_tokens=20)
    out = kernel.cli("generate", name, "abc", "--max-new-tokens", "20", "--temperature", "0", "--stop-token", str(free.tokens[5]), "--json").stdout
    completion = json.loads(out)
    assert completion["finish_reason"] == "stop" and completion["tokens"] == free.tokens[: free.tokens.index(free.tokens[5])]
    refused = kernel.cli("generate", name, "abc", "--dtype", "bfloat16", check=False)
    assert refused.returncode != 0 and "runs with the dtype it was started with" in refused.stderr


def test_cli_serve_options_and_cleanup(kernel: KernelHandle, checkpoint: Path) -> None:
    with kernel.client() as c:
        out = kernel.cli("serve", str(checkpoint), "--name", "opts", "--max-seqs", "2", "--max-len", "256", "--max-queue", "3", "--dtype", "bfloat16", "-p", "threads=1", "--json").stdout
        entry = json.loads(out)
        job = c.job(entry["replicas"][0]["job_id"])
        try:
            assert {k: job.info().params[k] for k in ("max_seqs", "max_len", "max_queue", "dtype", "threads")} == {"max_seqs": 2, "max_len": 256, "max_queue": 3, "dtype": "bfloat16", "threads": 1}
            assert c.generate("opts", "abc", max_new_tokens=300, **GREEDY).finish_reason == "length"  # within 256 tokens
        finally:
            job.cancel()
            job.wait(timeout=60)
        # Not up in time: the replicas it started are taken back, not left behind.
        before = {j.id for j in c.jobs()}
        failed = kernel.cli("serve", str(checkpoint), "--name", "late", "--replicas", "2", "--timeout", "0.01", check=False)
        assert failed.returncode != 0 and "did not come up within" in failed.stderr
        started = [c.job(j.id) for j in c.jobs() if j.id not in before]
        assert len(started) == 2
        for j in started:
            assert j.wait(timeout=60).state == "cancelled"


def test_a_waiting_caller_learns_its_replica_or_kernel_died(fresh_kernel: KernelHandle, checkpoint: Path) -> None:
    """No reply is due for a long while (a request not streamed), and then none will come: the
    caller gets an error soon, not at some timeout, and never hangs."""
    import os
    import signal

    outcome: dict[str, BaseException | float] = {}

    def wait_for_it(key: str) -> None:
        start = time.monotonic()
        with fresh_kernel.client() as cc:
            try:
                cc.generate("mortal", f"{key}: ", max_new_tokens=30000, **GREEDY)
            except BaseException as exc:
                outcome[key] = exc
        outcome[f"{key}_s"] = time.monotonic() - start

    with fresh_kernel.client() as c:
        c.submit("serve", params={"model": str(checkpoint), "name": "mortal", "max_len": 32768})
        _wait("the service", lambda: _in_flight(c, "mortal") == 0 and any(s["name"] == "mortal" for s in c.services()))
        pid = c.services()[0]["replicas"][0]["pid"]
        t = threading.Thread(target=wait_for_it, args=("replica",))
        t.start()
        _wait("the request", lambda: _in_flight(c, "mortal") == 1)
        os.kill(pid, signal.SIGKILL)
        t.join(30)
        assert isinstance(outcome["replica"], llmos.ServiceError) and "replica stopped" in str(outcome["replica"])
        # The service comes back (a new replica); then the kernel itself dies under a waiting caller.
        _wait("the service back", lambda: any(r["pid"] != pid for s in c.services() if s["name"] == "mortal" for r in s["replicas"]))
        t = threading.Thread(target=wait_for_it, args=("kernel",))
        t.start()
        _wait("the request", lambda: _in_flight(c, "mortal") == 1)
        fresh_kernel.kill()
        t.join(30)
    assert isinstance(outcome["kernel"], llmos.KernelUnavailable), outcome["kernel"]
    assert outcome["kernel_s"] < 10  # checked every half second, not after a 30 s timeout


def test_replicas_share_one_name_and_the_load(kernel: KernelHandle, checkpoint: Path) -> None:
    """`llmos serve --replicas 2`: two workers behind one name; two requests at once go one to each
    (the kernel routes to the least loaded), so killing one replica ends exactly one of them."""
    import os
    import signal

    kernel.cli("serve", str(checkpoint), "--name", "duo", "--replicas", "2", "-p", "max_len=32768", timeout=180)
    with kernel.client() as c, kernel.client() as c2:
        entry = next(s for s in c.services() if s["name"] == "duo")
        assert len(entry["replicas"]) == 2 and len({r["pid"] for r in entry["replicas"]}) == 2
        streams = [cc.generate("duo", f"{n}: ", stream=True, max_new_tokens=2000, **GREEDY) for n, cc in (("one", c), ("two", c2))]
        for stream in streams:
            next(stream)  # both running, one on each replica
        os.kill(entry["replicas"][0]["pid"], signal.SIGKILL)
        outcomes = []
        for stream in streams:
            try:
                for _ in stream:
                    pass
                outcomes.append("finished")
            except llmos.ServiceError as exc:
                assert "replica stopped" in str(exc)
                outcomes.append("failed")
        assert sorted(outcomes) == ["failed", "finished"], outcomes
        for job in c.jobs(state="running"):
            if job.kind == "serve":
                c.job(job.id).cancel()


def test_a_kv_memory_budget_bounds_each_sequence(kernel: KernelHandle, checkpoint: Path) -> None:
    """kv_memory: the cache takes at most that many bytes; each of max_seqs sequences holds what fits."""
    engine = Engine(load_checkpoint(checkpoint)[0], bytes_tokenizer())
    per_token = engine.kv_bytes_per_token()
    assert per_token == 2 * 2 * 2 * 16 * 4  # nano: k and v, 2 layers, 2 key/value heads of 16, float32
    budget = 4 * 100 * per_token
    kernel.cli("serve", str(checkpoint), "--name", "budget", "--max-seqs", "4", "--kv-memory", str(budget), timeout=180)
    with kernel.client() as c:
        job = c.job(next(s for s in c.services() if s["name"] == "budget")["replicas"][0]["job_id"])
        serving = next(e.body["fields"] for e in job.logs(follow=False) if e.body["event"] == "serving")
        assert serving["max_len"] == 100 and serving["kv_bytes"] == budget
        assert len(c.generate("budget", "x" * 90, max_new_tokens=5, **GREEDY).tokens) == 5
        with pytest.raises(llmos.ValidationError, match="the prompt is 120 tokens; this service holds 100 per sequence"):
            c.generate("budget", "x" * 120, max_new_tokens=5, **GREEDY)
        job.cancel()
        too_small = c.submit("serve", params={"model": str(checkpoint), "name": "tiny-budget", "max_seqs": 4, "kv_memory": "1KiB"}).wait(timeout=60)
        assert too_small.state == "failed" and "holds 0 tokens per sequence for max_seqs=4" in too_small.reason, too_small.reason
        assert "raise kv_memory or lower max_seqs" in too_small.reason
        with pytest.raises(llmos.JobRejected, match="kv_memory"):
            c.submit("serve", params={"model": str(checkpoint), "kv_memory": "lots"})


def test_one_name_serves_one_model(kernel: KernelHandle, checkpoint: Path, tmp_path: Path) -> None:
    """A second model under a running name is refused (CLI and SDK alike); the same model adds a
    replica; --replace swaps the model; `llmos services` shows each replica's model."""
    tok = bytes_tokenizer()
    other_model = Llama(config_from_preset("nano", tok.vocab_size, max_position_embeddings=32768, eos_token_id=tok.vocab_size + 1))
    other_model.init_weights(seed=8, std=0.5)
    other = tmp_path / "other"
    save_checkpoint(other, other_model, tok.to_json(), {})
    with kernel.client() as c:  # the cores to ourselves: earlier tests' replicas (and their restarts) go
        time.sleep(1.5)
        for j in c.jobs():
            if j.kind == "serve" and not j.ended:
                c.job(j.id).cancel()
                c.job(j.id).wait(timeout=60)
    kernel.cli("serve", str(checkpoint), "--name", "one", "--cpus", "1", timeout=180)
    with kernel.client() as c:
        refused = kernel.cli("serve", str(other), "--name", "one", "--cpus", "1", check=False)
        assert refused.returncode != 0 and f"service 'one' already serves {checkpoint.resolve()}" in refused.stderr and "--replace" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        # Through the SDK the kernel refuses the replica when it registers: its job fails, saying why.
        job = c.submit("serve", {"model": str(other), "name": "one"}, {"cpus": 1})
        info = job.wait(timeout=120)
        assert info.state == "failed" and "already serves" in info.reason, info.reason
        time.sleep(1.5)  # no restart of a refused replica
        assert not [j for j in c.jobs(state="pending") if j.kind == "serve"]
        listed = kernel.cli("services").stdout
        assert str(checkpoint.resolve()) in listed and str(other.resolve()) not in listed
        first = c.generate("one", "abc", max_new_tokens=8, **GREEDY).text
        kernel.cli("serve", str(other), "--name", "one", "--cpus", "1", "--replace", timeout=180)
        entry = next(s for s in c.services() if s["name"] == "one")
        assert {r["version"] for r in entry["replicas"]} == {str(other.resolve())}
        answers = {c.generate("one", "abc", max_new_tokens=8, **GREEDY).text for _ in range(4)}
        assert len(answers) == 1 and answers != {first}
        for r in entry["replicas"]:
            c.job(r["job_id"]).cancel()
            c.job(r["job_id"]).wait(timeout=60)
