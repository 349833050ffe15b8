"""OpenAI's request and response shapes, as vLLM's server speaks them: requests checked field by
field into what a ``serve`` replica takes, replies and stream chunks built from what it answers.

Pure functions and data (no sockets, no event loop), so every rule here is tested on its own. A
field with the wrong type or range is an :class:`ApiError` naming the field and what was expected;
a field this server does not know is accepted and ignored, and reported back (``ignored``), as
vLLM does.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20  # as OpenAI allows (and the engine's MAX_LOGPROBS)
MAX_N = 128

COMMON = frozenset({
    "model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "stream", "stream_options", "user", "return_tokens_as_token_ids",
})
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "add_generation_prompt", "chat_template_kwargs"}
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error", 503: "service_unavailable_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code or kind}}


def bad(param: str, expected: str, value: Any) -> ApiError:
    shown = repr(value) if not isinstance(value, str) or len(value) < 60 else repr(value[:57] + "...")
    return ApiError(400, f"'{param}' must be {expected}, got {shown}", param=param, code="invalid_value")


# -- fields --------------------------------------------------------------------------------------


def _int(body: dict[str, Any], name: str, default: Any, lo: int, hi: int) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if type(value) is not int or not lo <= value <= hi:
        raise bad(name, f"an integer from {lo} to {hi}", value)
    return value


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float, *, open_lo: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > hi or value < lo or (open_lo and value == lo):
        raise bad(name, f"a number {'above' if open_lo else 'from'} {lo:g}{'' if open_lo else ' to'} {'and at most ' if open_lo else ''}{hi:g}", value)
    return float(value)


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, "true or false", value)
    return value


def _stop(body: dict[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value) or len(value) > 64:
        raise bad("stop", "a non-empty string or a list of up to 64 of them", value)
    return value


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "the name of a served model (see GET /v1/models)", model)
    return model


@dataclass
class Plan:
    """A checked request: what to ask the replica for each choice, and how to answer."""

    kind: str  # "completion" | "chat"
    model: str
    prompts: list[Any]  # text or token ids (completions), or the messages (chat; rendered later)
    sampling: dict[str, Any]
    n: int
    stream: bool
    include_usage: bool
    echo: bool = False
    logprobs: int | None = None  # completions: top-k per token; chat: top_logprobs (with logprobs true)
    max_tokens: int | None = None  # None: the rest of the context
    add_generation_prompt: bool = True
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    token_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprob tokens as "token_id:N"
    ignored: list[str] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""

    def replica_body(self, prompt: Any, choice: int, context: int) -> dict[str, Any]:
        """The body of one ``serve`` call: choice ``choice`` of ``prompt``."""
        sampling = dict(self.sampling)
        seed = sampling.get("seed")
        if seed is not None and choice:
            sampling["seed"] = (seed + choice) % 2**64  # n choices from one seed: repeatable and different
        if self.max_tokens is None:
            sampling["max_new_tokens"] = context  # the rest of the context: the engine stops there
        else:
            sampling["max_new_tokens"] = self.max_tokens
        if self.logprobs is not None:
            sampling["logprobs"] = self.logprobs
            if self.echo:
                sampling["prompt_logprobs"] = self.logprobs
        return {"prompt": prompt, "sampling": sampling, "stream": self.stream, "check_length": self.max_tokens is not None}


def _common(body: dict[str, Any], allowed: frozenset[str]) -> tuple[dict[str, Any], int, bool, bool, list[str]]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    sampling: dict[str, Any] = {
        "temperature": _number(body, "temperature", 1.0, 0, 100),
        "top_p": _number(body, "top_p", 1.0, 0, 1, open_lo=True),
        "presence_penalty": _number(body, "presence_penalty", 0.0, -2, 2),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2, 2),
        "repetition_penalty": _number(body, "repetition_penalty", 1.0, 0, 100, open_lo=True),
        "stop": _stop(body),
    }
    top_k = body.get("top_k")
    if top_k is not None:
        if type(top_k) is not int or top_k < -1:
            raise bad("top_k", "an integer >= 0 (0 or -1: no limit)", top_k)
        sampling["top_k"] = max(top_k, 0)
    seed = body.get("seed")
    if seed is not None:
        if type(seed) is not int or not -(2**63) <= seed < 2**64:
            raise bad("seed", "an integer", seed)
        sampling["seed"] = seed % 2**64
    n = _int(body, "n", 1, 1, MAX_N)
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options", "an object such as {\"include_usage\": true}", options)
        if not stream:
            raise ApiError(400, "'stream_options' is only allowed with \"stream\": true", param="stream_options", code="invalid_value")
        include_usage = _bool(options, "include_usage", False)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user", "a string", user)
    ignored = sorted(k for k in body if k not in allowed)
    return sampling, n, stream, include_usage, ignored


def completion_plan(body: Any) -> Plan:
    """``POST /v1/completions``: the prompt as a string, strings, token ids or lists of them."""
    sampling, n, stream, include_usage, ignored = _common(body, COMPLETION_FIELDS)
    model = _model(body)
    prompt = body.get("prompt")
    prompts: list[Any]
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)):
        prompts = [prompt]
    elif (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)) or (isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in prompt)):
        prompts = list(prompt)
    else:
        raise bad("prompt", "a string, a list of strings, a list of token ids or a list of token-id lists (none empty)", prompt)
    if any(type(t) is int and t < 0 for p in prompts if isinstance(p, list) for t in p):
        raise bad("prompt", "token ids >= 0", prompt)
    logprobs = body.get("logprobs")
    if logprobs is not None and (type(logprobs) is not int or not 0 <= logprobs <= MAX_LOGPROBS):
        raise bad("logprobs", f"an integer from 0 to {MAX_LOGPROBS} (the most likely tokens to report per position)", logprobs)
    echo = _bool(body, "echo", False)
    max_tokens = _int(body, "max_tokens", 16, 0, 10**9)
    if max_tokens == 0 and not echo:
        raise ApiError(400, "'max_tokens' must be at least 1 (0 is allowed with \"echo\": true, to score the prompt only)", param="max_tokens", code="invalid_value")
    if stream and max_tokens == 0:
        raise ApiError(400, "'max_tokens' 0 (scoring the prompt) cannot be streamed", param="stream", code="invalid_value")
    return Plan("completion", model, prompts, sampling, n, stream, include_usage, echo=echo, logprobs=logprobs, max_tokens=max_tokens,
                token_ids=_bool(body, "return_tokens_as_token_ids", False), ignored=ignored, id=f"cmpl-{uuid.uuid4().hex}")


def chat_plan(body: Any) -> Plan:
    """``POST /v1/chat/completions``: messages to render with the model's chat template."""
    sampling, n, stream, include_usage, ignored = _common(body, CHAT_FIELDS)
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "a non-empty list of {\"role\", \"content\"} objects", messages)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"messages[{i}].role", f"one of {', '.join(ROLES)}", m.get("role") if isinstance(m, dict) else m)
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text can be rendered into a prompt
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}].content[{j}]", "a {\"type\": \"text\", \"text\": ...} part (this server takes text only)", part)
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None and m["role"] == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise bad(f"messages[{i}].content", "a string or a list of text parts", content)
        out.append({**{k: v for k, v in m.items() if k != "content"}, "content": content})
    logprobs = _bool(body, "logprobs", False)
    top = body.get("top_logprobs")
    if top is not None:
        if type(top) is not int or not 0 <= top <= MAX_LOGPROBS:
            raise bad("top_logprobs", f"an integer from 0 to {MAX_LOGPROBS}", top)
        if not logprobs:
            raise ApiError(400, "'top_logprobs' needs \"logprobs\": true", param="top_logprobs", code="invalid_value")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (type(max_tokens) is not int or not 1 <= max_tokens <= 10**9):
        raise bad("max_completion_tokens" if "max_completion_tokens" in body else "max_tokens", "an integer >= 1", max_tokens)
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise bad("chat_template_kwargs", "an object", kwargs)
    return Plan("chat", model, [out], sampling, n, stream, include_usage, logprobs=(top or 0) if logprobs else None, max_tokens=max_tokens,
                add_generation_prompt=_bool(body, "add_generation_prompt", True), template_kwargs=kwargs, ignored=ignored,
                token_ids=_bool(body, "return_tokens_as_token_ids", False),
                id=f"chatcmpl-{uuid.uuid4().hex}")


# -- chat templates ------------------------------------------------------------------------------

_TEMPLATES: dict[str, Any] = {}


def render_chat(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool, eos_token: str | None, bos_token: str | None,
                kwargs: dict[str, Any]) -> str:
    """The prompt for ``messages`` under a chat template, rendered as transformers renders it
    (jinja2's immutable sandbox, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``,
    ``strftime_now``). A template that fails is a 400 that says so."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    compiled = _TEMPLATES.get(template)
    if compiled is None:

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def strftime_now(fmt: str) -> str:
            return time.strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: __import__("json").dumps(x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        try:
            compiled = _TEMPLATES[template] = env.from_string(template)
        except jinja2.exceptions.TemplateError as exc:
            raise ApiError(400, f"the model's chat template does not compile: {exc}", param="messages", code="invalid_chat_template") from None
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, eos_token=eos_token or "", bos_token=bos_token or "",
                               tools=None, **kwargs)
    except jinja2.exceptions.TemplateError as exc:
        raise ApiError(400, f"the model's chat template refused these messages: {exc}", param="messages", code="invalid_chat_template") from None


# -- replies -------------------------------------------------------------------------------------

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _name(entry: dict[str, Any], as_ids: bool) -> str:
    return f"token_id:{entry['id']}" if as_ids else entry["token"]


def _top(entry: dict[str, Any], as_ids: bool) -> dict[str, float] | None:
    """OpenAI's ``top_logprobs`` map for one position: the most likely tokens and, as vLLM adds
    it, the chosen one. Tokens that read the same (bytes of a longer character all show as
    U+FFFD) keep the likeliest's figure; ``return_tokens_as_token_ids`` names them apart."""
    if entry.get("top") is None:
        return None
    out: dict[str, float] = {}
    for t in entry["top"]:  # most likely first
        out.setdefault(_name(t, as_ids), t["logprob"])
    out.setdefault(_name(entry, as_ids), entry["logprob"])
    return out


def completion_logprobs(entries: list[dict[str, Any]], offset: int = 0, as_ids: bool = False) -> dict[str, Any]:
    """``choices[i].logprobs`` of a completion: tokens, their log-probabilities, the most likely
    tokens at each position and each token's offset in the text."""
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        tokens.append(_name(e, as_ids))
        lps.append(e["logprob"])
        tops.append(_top(e, as_ids))
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: list[dict[str, Any]], as_ids: bool = False) -> dict[str, Any]:
    """``choices[i].logprobs`` of a chat completion: ``content``, one entry per token."""

    def one(e: dict[str, Any]) -> dict[str, Any]:
        return {"token": _name(e, as_ids), "logprob": e["logprob"], "bytes": list(e["token"].encode("utf-8"))}

    return {"content": [{**one(e), "top_logprobs": [one(t) for t in e.get("top") or []]} for e in entries]}


def completion_choice(plan: Plan, index: int, completion: dict[str, Any], prompt_text: str | None) -> dict[str, Any]:
    text = completion["text"]
    logprobs = None
    if plan.logprobs is not None:
        entries = list(completion.get("logprobs") or [])
        if plan.echo:
            entries = list(completion.get("prompt_logprobs") or []) + entries
        logprobs = completion_logprobs(entries, as_ids=plan.token_ids)
    if plan.echo:
        text = (prompt_text or "") + text
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": FINISH.get(completion["finish_reason"], "stop"), "stop_reason": None}


def chat_choice(plan: Plan, index: int, completion: dict[str, Any]) -> dict[str, Any]:
    logprobs = chat_logprobs(completion.get("logprobs") or [], plan.token_ids) if plan.logprobs is not None else None
    return {"index": index, "message": {"role": "assistant", "content": completion["text"], "tool_calls": []}, "logprobs": logprobs,
            "finish_reason": FINISH.get(completion["finish_reason"], "stop"), "stop_reason": None}


def reply(plan: Plan, choices: list[dict[str, Any]], used: dict[str, int]) -> dict[str, Any]:
    return {"id": plan.id, "object": "text_completion" if plan.kind == "completion" else "chat.completion", "created": plan.created,
            "model": plan.model, "choices": choices, "usage": used}


def chunk(plan: Plan, choices: list[dict[str, Any]], used: dict[str, int] | None = None) -> dict[str, Any]:
    out = {"id": plan.id, "object": "text_completion" if plan.kind == "completion" else "chat.completion.chunk", "created": plan.created,
           "model": plan.model, "choices": choices}
    if plan.include_usage:
        out["usage"] = used
    return out


def piece_choice(plan: Plan, index: int, text: str, entries: list[dict[str, Any]] | None, finish: str | None, *, first: bool = False) -> dict[str, Any]:
    """One choice of a stream chunk: ``text`` (a completion) or a ``delta`` (chat)."""
    if plan.kind == "completion":
        logprobs = completion_logprobs(entries or [], as_ids=plan.token_ids) if plan.logprobs is not None else None
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": None}
    delta: dict[str, Any] = {"role": "assistant", "content": text} if first else ({"content": text} if text or finish is None else {})
    logprobs = chat_logprobs(entries or [], plan.token_ids) if plan.logprobs is not None and entries else None
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


class Pieces:
    """Server-sent events for a stream's text pieces without log-probabilities, the most common
    chunk by far: the chunk's fixed parts are encoded once per stream, only the text per piece
    (the same JSON as ``chunk(plan, [piece_choice(...)])``, a few times faster)."""

    def __init__(self, plan: Plan) -> None:
        import json

        self.dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
        head = chunk(plan, [])
        prefix = json.dumps({k: head[k] for k in ("id", "object", "created", "model")}, ensure_ascii=False, separators=(",", ":"))[:-1]
        self.head = ("data: " + prefix + ',"choices":[').encode()
        self.tail = ("]" + (',"usage":null' if plan.include_usage else "") + "}\n\n").encode()
        self.field = '{"index":%d,"text":' if plan.kind == "completion" else '{"index":%d,"delta":{"content":'
        self.end = ',"logprobs":null,"finish_reason":null,"stop_reason":null}' if plan.kind == "completion" else '},"logprobs":null,"finish_reason":null}'

    def __call__(self, index: int, text: str) -> bytes:
        return self.head + (self.field % index + self.dumps(text) + self.end).encode() + self.tail


__all__ = ["ApiError", "Pieces", "Plan", "chat_plan", "completion_plan", "render_chat"]
