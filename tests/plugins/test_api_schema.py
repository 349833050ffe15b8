"""OpenAI request checking and reply shapes of the gateway, without a server: every bad field
is a 400 naming it, unknown fields are listed, and the replica body carries what was asked."""

from __future__ import annotations

import pytest

pytest.importorskip("jinja2")

from llmos.plugins.api import check_api, is_loopback
from llmos.plugins.api import openai as oa
from llmos.plugins.api.app import digest
from llmos.plugins.lm.checkpoint import DEFAULT_CHAT_TEMPLATE


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x"}, "model"),
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": []}, "prompt"),
        ({"model": "m", "prompt": [1, "a"]}, "prompt"),
        ({"model": "m", "prompt": [-1]}, "prompt"),
        ({"model": "m", "prompt": "x", "temperature": "hot"}, "temperature"),
        ({"model": "m", "prompt": "x", "temperature": -1}, "temperature"),
        ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "m", "prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "prompt": "x", "n": 0}, "n"),
        ({"model": "m", "prompt": "x", "logprobs": 21}, "logprobs"),
        ({"model": "m", "prompt": "x", "stop": ""}, "stop"),
        ({"model": "m", "prompt": "x", "stop": [1]}, "stop"),
        ({"model": "m", "prompt": "x", "seed": 1.5}, "seed"),
        ({"model": "m", "prompt": "x", "top_k": -2}, "top_k"),
        ({"model": "m", "prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": "m", "prompt": "x", "user": 3}, "user"),
    ],
)
def test_a_bad_completion_field_is_a_400_naming_it(body: dict, param: str) -> None:
    with pytest.raises(oa.ApiError) as e:
        oa.completion_plan(body)
    assert e.value.status == 400 and e.value.param == param
    error = e.value.body()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ],
)
def test_a_bad_chat_field_is_a_400_naming_it(body: dict, param: str) -> None:
    with pytest.raises(oa.ApiError) as e:
        oa.chat_plan(body)
    assert e.value.status == 400 and e.value.param == param


def test_prompt_forms_and_what_the_replica_is_asked() -> None:
    assert oa.completion_plan({"model": "m", "prompt": "a"}).prompts == ["a"]
    assert oa.completion_plan({"model": "m", "prompt": ["a", "b"]}).prompts == ["a", "b"]
    assert oa.completion_plan({"model": "m", "prompt": [1, 2]}).prompts == [[1, 2]]
    assert oa.completion_plan({"model": "m", "prompt": [[1], [2, 3]]}).prompts == [[1], [2, 3]]
    plan = oa.completion_plan({"model": "m", "prompt": "a", "max_tokens": 0, "echo": True, "logprobs": 2, "seed": 7, "top_k": -1, "stop": "\n", "n": 2})
    first, second = plan.replica_body("a", 0, 100), plan.replica_body("a", 1, 100)
    assert first["sampling"] == {**first["sampling"], "max_new_tokens": 0, "logprobs": 2, "prompt_logprobs": 2, "seed": 7, "top_k": 0, "stop": ["\n"]}
    assert second["sampling"]["seed"] == 8 and first["check_length"] is True
    assert oa.completion_plan({"model": "m", "prompt": "a"}).replica_body("a", 0, 100)["sampling"]["max_new_tokens"] == 16  # OpenAI's default
    chat = oa.chat_plan({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.replica_body("p", 0, 100)["sampling"]["max_new_tokens"] == 100 and chat.replica_body("p", 0, 100)["check_length"] is False


def test_unknown_fields_are_listed() -> None:
    assert oa.completion_plan({"model": "m", "prompt": "a", "zeta": 1, "best_of": 2}).ignored == ["best_of", "zeta"]
    assert oa.chat_plan({"model": "m", "messages": [{"role": "user", "content": "a"}], "tools": []}).ignored == ["tools"]


def test_the_default_chat_template_renders_as_documented() -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    text = oa.render_chat(DEFAULT_CHAT_TEMPLATE, messages, add_generation_prompt=True, eos_token="<|endoftext|>", bos_token=None, kwargs={})
    assert text == "<|system|>\ns<|endoftext|>\n<|user|>\nu<|endoftext|>\n<|assistant|>\n"
    with pytest.raises(oa.ApiError) as e:
        oa.render_chat("{{ raise_exception('no system messages') }}", messages, add_generation_prompt=True, eos_token=None, bos_token=None, kwargs={})
    assert "no system messages" in e.value.message and e.value.status == 400
    with pytest.raises(oa.ApiError):  # the sandbox: no attribute walks to Python internals
        oa.render_chat("{{ messages.__class__.__mro__ }}", messages, add_generation_prompt=True, eos_token=None, bos_token=None, kwargs={})


def test_logprob_shapes() -> None:
    entries = [{"token": "a", "id": 1, "logprob": -0.5, "top": [{"token": "b", "id": 2, "logprob": -0.1}, {"token": "b", "id": 3, "logprob": -2.0}]}]
    lp = oa.completion_logprobs(entries)
    assert lp == {"tokens": ["a"], "token_logprobs": [-0.5], "top_logprobs": [{"b": -0.1, "a": -0.5}], "text_offset": [0]}
    assert oa.completion_logprobs(entries, as_ids=True)["top_logprobs"] == [{"token_id:2": -0.1, "token_id:3": -2.0, "token_id:1": -0.5}]
    chat = oa.chat_logprobs(entries)["content"][0]
    assert chat["token"] == "a" and chat["bytes"] == [97] and [t["logprob"] for t in chat["top_logprobs"]] == [-0.1, -2.0]


def test_the_gateway_params_refuse_a_public_address_without_a_key() -> None:
    from llmos.plugins.api import ApiParams

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    check_api(ApiParams())
    with pytest.raises(ValueError, match="API key"):
        check_api(ApiParams(host="0.0.0.0"))
    check_api(ApiParams(host="0.0.0.0", api_key_sha256=digest("k")))
    with pytest.raises(ValueError, match="64"):
        check_api(ApiParams(api_key_sha256="abc"))


@pytest.mark.parametrize("usage", [False, True])
@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_fast_pieces_are_the_same_json_as_chunks(kind: str, usage: bool) -> None:
    import json

    body = {"model": "m\u00e9", "stream": True, "stream_options": {"include_usage": usage}}
    plan = oa.completion_plan({**body, "prompt": "x"}) if kind == "completion" else oa.chat_plan({**body, "messages": [{"role": "user", "content": "x"}]})
    for text in ("plain", 'quo"te\n\\ \u00e9\u4e2d \U0001f600', ""):
        fast = oa.Pieces(plan)(3, text)
        assert fast.startswith(b"data: ") and fast.endswith(b"\n\n")
        assert json.loads(fast[6:]) == oa.chunk(plan, [oa.piece_choice(plan, 3, text, None, None)])
