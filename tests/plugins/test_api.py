"""The OpenAI-compatible gateway (``llmos api``), driven by the real ``openai`` client (sync and
async, streaming and not) and raw HTTP, against real ``serve`` replicas through a real kernel."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import llmos
from tests.conftest import KernelHandle

torch = pytest.importorskip("torch")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from llmos.plugins.lm.checkpoint import save_checkpoint  # noqa: E402
from llmos.plugins.lm.config import config_from_preset  # noqa: E402
from llmos.plugins.lm.model import Llama  # noqa: E402
from llmos.plugins.lm.text import bytes_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "test-key-1234"


def _checkpoint(path: Path, *, template: bool = True, eos: bool = False) -> Path:
    """A nano model on bytes; it never ends by itself unless ``eos`` (its end id is outside the vocabulary)."""
    tok = bytes_tokenizer()
    config = config_from_preset("nano", tok.vocab_size, max_position_embeddings=256, **({} if eos else {"eos_token_id": tok.vocab_size + 1}))
    model = Llama(config)
    model.init_weights(seed=11, std=0.4)
    save_checkpoint(path, model, tok.to_json(), {})
    if not template:
        (path / "chat_template.jinja").unlink()
    return path


def _wait(what: str, ok: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"still waiting for {what} after {timeout}s"
        time.sleep(0.05)


class Stack:
    """One kernel with two models served and two gateways (one open, one with a key)."""

    def __init__(self, kernel: KernelHandle, root: Path) -> None:
        self.kernel = kernel
        self.model = _checkpoint(root / "tiny")
        self.bare = _checkpoint(root / "bare", template=False)
        self.small = _checkpoint(root / "small")
        k = kernel
        k.cli("serve", str(self.model), "--name", "tiny", "--cpus", "1", "--max-len", "256")
        k.cli("serve", str(self.bare), "--name", "bare", "--cpus", "1", "--max-len", "256")
        k.cli("serve", str(self.small), "--name", "small", "--cpus", "1", "--max-len", "256", "--max-seqs", "1", "--max-queue", "0")
        self.api = k.cli_json("api", "--port", "0")
        self.url = self.api["url"]
        self.keyed = json.loads(k.cli("api", "--port", "0", "--name", "api-keyed", "--json", env={"LLMOS_API_KEY": KEY}).stdout)

    def openai(self, **kw: Any) -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kw)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Four cores handed out on this two-core machine: three small replicas and the gateways fit.
    handle = KernelHandle(tmp_path_factory.mktemp("k") / "state", env={"LLMOS_DEVICES_CPUS": "4"}).boot()
    try:
        yield Stack(handle, tmp_path_factory.mktemp("models"))
    finally:
        handle.shutdown()


def _sdk(stack: Stack, prompt: str, **sampling: Any) -> llmos.Completion:
    with stack.kernel.client() as c:
        return c.generate("tiny", prompt, **sampling)


def test_models_lists_served_models_with_their_context(stack: Stack) -> None:
    models = {m.id: m for m in stack.openai().models.list().data}
    assert {"tiny", "bare", "small"} <= set(models)
    assert "api" not in models and "api-keyed" not in models  # gateways are services, not models
    assert models["tiny"].model_extra["max_model_len"] == 256
    assert stack.openai().models.retrieve("tiny").id == "tiny"
    services = {s["name"] for s in stack.kernel.cli_json("services")}
    assert {"api", "api-keyed"} <= services  # llmos services lists the gateways


def test_greedy_completion_equals_the_sdk_alone_and_among_16_streams(stack: Stack) -> None:
    prompts = [f"def f{i}(x):" for i in range(16)]
    expected = [_sdk(stack, p, max_new_tokens=24, temperature=0).text for p in prompts]
    one = stack.openai().completions.create(model="tiny", prompt=prompts[0], max_tokens=24, temperature=0)
    assert one.choices[0].text == expected[0]
    assert one.usage.completion_tokens == 24 and one.usage.prompt_tokens == len(prompts[0])

    async def streams() -> list[str]:
        client = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)

        async def one(prompt: str) -> str:
            parts = []
            async for chunk in await client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True):
                parts.extend(c.text for c in chunk.choices)
            return "".join(parts)

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await client.close()

    assert asyncio.run(streams()) == expected


def test_prompt_forms_strings_lists_and_token_ids(stack: Stack) -> None:
    client = stack.openai()
    as_text = client.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0).choices[0].text
    ids = httpx.post(stack.url + "/tokenize", json={"model": "tiny", "prompt": "hello"}).json()["tokens"]
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0).choices[0].text == as_text
    many = client.completions.create(model="tiny", prompt=["hello", "world"], max_tokens=6, temperature=0)
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text == as_text
    lists = client.completions.create(model="tiny", prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [c.text for c in lists.choices] == [as_text, as_text]
    assert lists.usage.prompt_tokens == 2 * len(ids)


def test_echo_with_logprobs_scores_every_prompt_token_as_the_model_does(stack: Stack) -> None:
    from transformers import AutoModelForCausalLM

    prompt = "The quick brown fox"
    r = stack.openai().completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=3, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt
    assert len(lp.tokens) == len(prompt) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    hf = AutoModelForCausalLM.from_pretrained(stack.model, dtype=torch.float32).eval()
    ids = httpx.post(stack.url + "/tokenize", json={"model": "tiny", "prompt": prompt}).json()["tokens"]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    want = [float(ref[i, t]) for i, t in enumerate(ids[1:])]
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)) < 1e-4
    for i, top in enumerate(lp.top_logprobs[1:]):
        assert abs(max(top.values()) - float(ref[i].max())) < 1e-4  # the most likely token is among them
    # Bytes of longer characters all read as U+FFFD: with vLLM's return_tokens_as_token_ids they stay apart.
    r = stack.openai().completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=3, extra_body={"return_tokens_as_token_ids": True})
    by_id = r.choices[0].logprobs
    assert by_id.tokens == [f"token_id:{t}" for t in ids]
    for i, top in enumerate(by_id.top_logprobs[1:]):
        top3 = torch.topk(ref[i], 3).indices.tolist()
        assert set(top) == {f"token_id:{t}" for t in top3} | {f"token_id:{ids[i + 1]}"}  # the top 3, and the prompt's own token
    # With generated tokens too: the prompt's entries, then one per generated token.
    r = stack.openai().completions.create(model="tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=1, temperature=0)
    assert len(r.choices[0].logprobs.tokens) == len(prompt) + 3
    assert r.choices[0].logprobs.token_logprobs[1 : len(prompt)] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)


def test_n_choices_and_seeds_reproduce(stack: Stack) -> None:
    client = stack.openai()
    kw = dict(model="tiny", prompt="seed", max_tokens=12, temperature=1.0, n=3, seed=1234)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # n choices differ from each other
    assert a.usage.completion_tokens == 36
    other = client.completions.create(**{**kw, "seed": 99})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]


def test_stop_strings_end_the_text_before_them(stack: Stack) -> None:
    client = stack.openai()
    full = client.completions.create(model="tiny", prompt="abc", max_tokens=30, temperature=0).choices[0].text
    stop = full[10:12]
    cut = full[: full.find(stop)]
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=30, temperature=0, stop=[stop, "\x00never"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="tiny", prompt="abc", max_tokens=30, temperature=0, stop=stop, stream=True))
    assert streamed == cut


def _sse(response: Any) -> list[Any]:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_streams_send_usage_when_asked_and_always_done(stack: Stack) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 5, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", stack.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    assert all(e["usage"] is None for e in events[:-2])
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    with httpx.stream("POST", stack.url + "/v1/completions", json={**body, "stream_options": None}) as r:
        events = _sse(r)
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])
    # The openai client reads the same usage chunk.
    chunks = list(stack.openai().completions.create(model="tiny", prompt="hi", max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 5


def test_chat_renders_the_template_and_matches_the_completion_of_the_rendered_prompt(stack: Stack) -> None:
    client = stack.openai()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    rendered = httpx.post(stack.url + "/tokenize", json={"model": "tiny", "messages": messages}).json()["tokens"]
    assert bytes_tokenizer().decode(rendered) == "<|system|>\nbe brief\n<|user|>\nhello\n<|assistant|>\n"  # the end-of-text token decodes to nothing
    plain = client.completions.create(model="tiny", prompt=rendered, max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == plain.choices[0].text and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(rendered)
    deltas = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True))
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == chat.choices[0].message.content
    with_lp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = with_lp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)


def test_a_model_without_a_chat_template_gets_a_400_that_says_how_to_add_one(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        stack.openai().chat.completions.create(model="bare", messages=[{"role": "user", "content": "hi"}])
    assert "chat_template" in str(e.value) and "tokenizer_config.json" in str(e.value)
    assert stack.openai().completions.create(model="bare", prompt="hi", max_tokens=2).choices  # completions still work


def test_each_error_has_its_status_and_openai_shape(stack: Stack) -> None:
    client = stack.openai()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", temperature="hot")  # type: ignore[arg-type]
    assert e.value.body["param"] == "temperature" and "number" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x" * 200, max_tokens=100)
    body = e.value.body
    assert body["code"] == "context_length_exceeded" and "256" in body["message"] and "200" in body["message"] and "100" in body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x")
    assert e.value.body["code"] == "model_not_found" and "tiny" in e.value.body["message"]
    r = httpx.post(stack.url + "/v1/completions", content=b"{not json")
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(stack.url + "/v1/completions", json={"model": "tiny", "prompt": "x" * (9 << 20)})
    assert r.status_code == 413
    assert httpx.get(stack.url + "/v2/nothing").status_code == 404


def test_unknown_fields_are_ignored_and_listed(stack: Stack) -> None:
    r = httpx.post(stack.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2, "best_of": 3, "my_field": 1})
    assert r.status_code == 200 and r.headers["x-llmos-ignored-fields"] == "best_of,my_field"


def test_the_api_key_is_required_where_one_was_given(stack: Stack) -> None:
    url = stack.keyed["url"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/health").status_code == 200  # probes need no key
    models = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0).models.list()
    assert "tiny" in {m.id for m in models.data}
    job = stack.kernel.cli_json("job", str(stack.keyed["job_id"]))
    assert KEY not in json.dumps(job)  # the key itself is never stored


def test_a_full_queue_is_429(stack: Stack) -> None:
    # small: one sequence at a time and no queue.
    def one(_: int) -> int:
        try:
            stack.openai().completions.create(model="small", prompt="x", max_tokens=200, temperature=0)
            return 200
        except openai.RateLimitError as exc:
            assert exc.body["code"] == "queue_full"
            return 429

    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(one, range(4)))
    assert 429 in codes and 200 in codes


def test_a_disconnect_mid_stream_frees_the_slot(stack: Stack) -> None:
    body = {"model": "small", "prompt": "x", "max_tokens": 250, "temperature": 0, "stream": True}
    with httpx.stream("POST", stack.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    with stack.kernel.client() as c:
        _wait("the slot to be freed", lambda: next(s["in_flight"] for s in c.services() if s["name"] == "small") == 0, timeout=10)
    # The one slot is free again: a request that needs it is answered, not refused.
    assert stack.openai().completions.create(model="small", prompt="x", max_tokens=2).choices


def test_tokenizer_endpoints_health_version_and_metrics(stack: Stack) -> None:
    ids = httpx.post(stack.url + "/tokenize", json={"model": "tiny", "prompt": "abc"}).json()
    assert ids == {"count": 3, "max_model_len": 256, "tokens": bytes_tokenizer().encode("abc")}
    assert httpx.post(stack.url + "/detokenize", json={"model": "tiny", "tokens": ids["tokens"]}).json() == {"prompt": "abc"}
    info = httpx.get(stack.url + "/tokenizer_info", params={"model": "tiny"}).json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 256 and "<|assistant|>" in info["chat_template"]
    assert httpx.get(stack.url + "/tokenizer_info").status_code == 400  # several models: which one must be said
    assert httpx.get(stack.url + "/health").json()["status"] == "ok"
    assert httpx.get(stack.url + "/health", params={"model": "none"}).status_code == 503
    assert httpx.get(stack.url + "/version").json()["version"] == llmos.__version__
    stack.openai().completions.create(model="tiny", prompt="m", max_tokens=3)
    text = httpx.get(stack.url + "/metrics").text
    for name in ("llmos_api_requests_total", "llmos_api_time_to_first_token_seconds_bucket", "llmos_api_time_per_output_token_seconds_bucket",
                 "llmos_api_queue_depth", "llmos_api_generation_tokens_total"):
        assert name in text
    assert 'llmos_api_requests_total{endpoint="/v1/completions",model="tiny",status="200"}' in text


def test_a_restarting_replica_is_503_then_answers_again(stack: Stack) -> None:
    with stack.kernel.client() as c:
        entry = next(s for s in c.services() if s["name"] == "bare")
        os.kill(entry["replicas"][0]["pid"], signal.SIGKILL)
        _wait("the replica to go", lambda: not any(s["name"] == "bare" for s in c.services()), timeout=10)
        with pytest.raises(openai.APIStatusError) as e:
            stack.openai().completions.create(model="bare", prompt="x", max_tokens=2)
        assert e.value.status_code == 503
        assert httpx.get(stack.url + "/health", params={"model": "bare"}).status_code == 503
        _wait("the restarted replica", lambda: any(s["name"] == "bare" for s in c.services()), timeout=60)
    assert stack.openai().completions.create(model="bare", prompt="x", max_tokens=2).choices


def test_gateway_cli_refuses_a_public_address_without_a_key(stack: Stack) -> None:
    r = stack.kernel.cli("api", "--host", "0.0.0.0", check=False, env={"LLMOS_API_KEY": ""})
    assert r.returncode != 0 and "API key" in r.stderr
    r = stack.kernel.cli("serve", str(stack.model), "--http", "0.0.0.0:8123", check=False, env={"LLMOS_API_KEY": ""})
    assert r.returncode != 0 and "API key" in r.stderr


def test_serve_http_starts_a_gateway_and_serve_takes_the_free_cores(tmp_path: Path, short_tmp: Path) -> None:
    model = _checkpoint(tmp_path / "m")
    handle = KernelHandle(short_tmp / "state").boot()
    try:
        out = handle.cli_json("serve", str(model), "--name", "m", "--http", "127.0.0.1:0")
        url = out["http"]["url"]
        assert [m.id for m in openai.OpenAI(base_url=url + "/v1", api_key="x").models.list().data] == ["m"]
        assert httpx.get(url + "/health").status_code == 200
        with handle.client() as c:
            job = c.job(out["replicas"][0]["job_id"]).info()
            cores = next(d for d in c.devices() if d["kind"] == "cpu")["capacity"]
            assert job.resources["cpus"] == cores  # no --cpus: every free core
            job_id = job.id
            c.job(job_id).cancel()
            _wait("the replica to stop", lambda: c.job(job_id).info().ended)
        assert httpx.get(url + "/health").status_code == 503  # the gateway stays; no model is ready
    finally:
        handle.shutdown()
