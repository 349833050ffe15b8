"""The gateway's ASGI app (Starlette): OpenAI's endpoints in front of llmos's ``serve`` services.

Every generation is a service call through the kernel (:class:`llmos.AsyncClient`), so replicas,
queues, cancellation and accounting stay the kernel's; a choice is one call (``n`` choices are
``n`` calls, decoded together in the replica's batch). The model name in a request is the
service name. A stream ends when the replica's answer ends; a client that goes away mid-stream
leaves the call's ``async for``, which cancels the request at the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

import llmos
from llmos.errors import (
    KernelError,
    KernelUnavailable,
    LlmosError,
    ServiceBusy,
    ServiceError,
    ServiceUnavailable,
    ValidationError,
)
from llmos.plugins.api import openai as oa
from llmos.plugins.api.metrics import Metrics
from llmos.plugins.api.openai import ApiError, Plan

INFO_TTL = 5.0  # seconds a replica's info (context, chat template) is trusted before asking again
OPEN_PATHS = frozenset({"/health", "/version"})  # answered without the API key (load balancers, probes)
IGNORED_HEADER = "x-llmos-ignored-fields"


def digest(key: str) -> str:
    """How an API key is kept: its SHA-256 (the job's parameters never hold the key itself)."""
    return hashlib.sha256(key.encode()).hexdigest()


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(data, separators=(",", ":"), ensure_ascii=False), status_code=status, media_type="application/json", headers=headers)


def _error(exc: ApiError) -> Response:
    return _json(exc.body(), exc.status)


class Guard:
    """ASGI middleware: the API key (``Authorization: Bearer KEY``, compared in constant time) on
    every path but /health and /version, and OpenAI-shaped errors for whatever escapes."""

    def __init__(self, app: Any, key_sha256: str | None) -> None:
        self.app, self.key = app, key_sha256.encode() if key_sha256 else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.key is not None and scope["path"] not in OPEN_PATHS:
            given = b""
            for name, value in scope.get("headers", []):
                if name == b"authorization":
                    given = value
            scheme, _, token = given.partition(b" ")
            ok = scheme.lower() == b"bearer" and hmac.compare_digest(hashlib.sha256(token.strip()).hexdigest().encode(), self.key)
            if not ok:
                error = ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY' (the key given to llmos api --api-key or LLMOS_API_KEY)",
                                 code="invalid_api_key")
                await _error(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Gateway:
    """The endpoints, over one :class:`llmos.AsyncClient`."""

    def __init__(self, client: llmos.AsyncClient, *, key_sha256: str | None = None, max_body: int = 8 << 20, name: str = "api") -> None:
        self.client, self.max_body, self.name = client, max_body, name
        self.key_sha256 = key_sha256
        self.metrics = Metrics()
        self._info: dict[str, tuple[float, dict[str, Any]]] = {}
        self._kinds: dict[int, str] = {}

    def app(self) -> Any:
        routes = [
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/tokenizer_info", self.tokenizer_info, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/version", self.version, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]

        async def not_found(request: Request, exc: Exception) -> Response:
            status = getattr(exc, "status_code", 404)
            what = "method not allowed" if status == 405 else "no such endpoint"
            return _error(ApiError(status, f"{what}: {request.method} {request.url.path}", code="not_found" if status == 404 else "method_not_allowed"))

        async def failed(request: Request, exc: Exception) -> Response:
            return _error(ApiError(500, f"the gateway failed: {type(exc).__name__}: {exc}"))

        app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, Exception: failed})
        return Guard(app, self.key_sha256)

    # -- plumbing --

    async def _body(self, request: Request) -> Any:
        """The request's JSON, refused past ``max_body`` bytes (413) or when it is not JSON (400)."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise ApiError(413, f"the request body is {int(length)} bytes; this server takes at most {self.max_body}", code="request_too_large")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > self.max_body:
                raise ApiError(413, f"the request body is over {self.max_body} bytes, the most this server takes", code="request_too_large")
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ApiError(400, f"the request body is not JSON: {exc}", code="invalid_json") from None

    async def _failure(self, exc: BaseException, model: str | None) -> ApiError:
        """An llmos error as the HTTP error a client of OpenAI's API expects."""
        if isinstance(exc, ApiError):
            return exc
        message = str(exc)
        if isinstance(exc, ServiceBusy):
            return ApiError(429, message, code="queue_full")
        if isinstance(exc, ServiceUnavailable):
            if model is not None and await self._starting(model):
                return ApiError(503, f"model {model!r} is starting or restarting: no replica answers yet; retry shortly", code="model_not_ready")
            served = ", ".join(sorted(m["id"] for m in (await self._models()))) or "none"
            return ApiError(404, f"the model {model!r} does not exist (served models: {served}; see GET /v1/models)", param="model", code="model_not_found")
        if isinstance(exc, ValidationError):
            context = "context length" in message
            return ApiError(400, message, param="max_tokens" if context else "prompt", code="context_length_exceeded" if context else "invalid_value")
        if isinstance(exc, ServiceError) and ("is stopping" in message or "its replica stopped" in message):
            return ApiError(503, message, code="replica_unavailable")  # it restarts, or another replica answers a retry
        if isinstance(exc, KernelUnavailable | KernelError):
            return ApiError(503, f"the llmos kernel does not answer: {message}", code="kernel_unavailable")
        if isinstance(exc, LlmosError):
            return ApiError(500, message)
        return ApiError(500, f"{type(exc).__name__}: {message}")

    async def _starting(self, model: str) -> bool:
        """Whether a ``serve`` job for ``model`` is queued or running without answering yet."""
        with contextlib.suppress(LlmosError):
            for state in ("pending", "running"):
                for job in await self.client.jobs(state=state):
                    if job.kind == "serve" and (job.params.get("name") == model):
                        return True
        return False

    async def _kind(self, job_id: int) -> str:
        kind = self._kinds.get(job_id)
        if kind is None:
            kind = self._kinds[job_id] = (await (await self.client.job(job_id)).info()).kind
        return kind

    async def _models(self) -> list[dict[str, Any]]:
        """The running ``serve`` services, with their replicas' info."""
        out = []
        for service in await self.client.services():
            if not service["replicas"] or await self._kind(service["replicas"][0]["job_id"]) != "serve":
                continue
            try:
                info = await self.info(service["name"])
            except ApiError:
                continue  # it went away meanwhile
            out.append({"id": service["name"], "object": "model", "created": info.get("created", 0), "owned_by": "llmos", "root": info.get("model"),
                        "parent": None, "max_model_len": info["context"], "in_flight": service["in_flight"], "replicas": len(service["replicas"])})
        return out

    async def _one(self, service: str, body: dict[str, Any]) -> dict[str, Any]:
        """The single answer of a service call."""
        try:
            async for reply in self.client.call(service, body):
                return reply
        except Exception as exc:
            raise await self._failure(exc, service) from None
        raise ApiError(500, f"service {service!r} ended its answer without a reply")

    async def info(self, model: str, *, fresh: bool = False) -> dict[str, Any]:
        """A model's replica info (context length, chat template, tokens), kept ``INFO_TTL`` seconds."""
        now = time.monotonic()
        cached = self._info.get(model)
        if cached is not None and not fresh and now - cached[0] < INFO_TTL:
            return cached[1]
        info = await self._one(model, {"op": "info"})
        self._info[model] = (now, info)
        return info

    def _model_of(self, body: Any, query: str | None = None) -> str:
        model = query if query is not None else (body.get("model") if isinstance(body, dict) else None)
        if not isinstance(model, str) or not model:
            raise oa.bad("model", "the name of a served model (see GET /v1/models)", model)
        return model

    # -- generation --

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, oa.completion_plan)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, oa.chat_plan)

    async def _generate(self, request: Request, make: Any) -> Response:
        started = time.perf_counter()
        endpoint = request.url.path
        model = None
        try:
            plan: Plan = make(await self._body(request))
            model = plan.model
            info = await self.info(model)
            prompts = await self._prompts(plan, info)
            headers = {IGNORED_HEADER: ",".join(plan.ignored)} if plan.ignored else {}
            if plan.stream:
                stream = self._stream(plan, prompts, info, started, endpoint)
                first = await anext(stream)  # errors before the first token are a status, not a chunk
                return StreamingResponse(_prepend(first, stream), media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})
            data = await self._complete(plan, prompts, info, started, endpoint)
            return _json(data, headers=headers)
        except Exception as exc:
            error = await self._failure(exc, model)
            self.metrics.request(model, endpoint, error.status)
            return _error(error)

    async def _prompts(self, plan: Plan, info: dict[str, Any]) -> list[Any]:
        """What each prompt is sent as: completions as given, chat rendered by the template."""
        if plan.kind == "completion":
            return plan.prompts
        template = info.get("chat_template")
        if not template:
            raise ApiError(400, f"model {plan.model!r} has no chat template: add chat_template to its tokenizer_config.json, or a chat_template.jinja file "
                           "beside it (checkpoints llmos trains have one), or use /v1/completions", param="messages", code="no_chat_template")
        rendered = oa.render_chat(template, plan.prompts[0], add_generation_prompt=plan.add_generation_prompt, eos_token=info.get("eos_token"),
                                  bos_token=info.get("bos_token"), kwargs=plan.template_kwargs)
        return [rendered]

    async def _prompt_text(self, plan: Plan, prompt: Any, completion: dict[str, Any]) -> str | None:
        """The prompt as text, when the answer echoes it."""
        if not plan.echo:
            return None
        if isinstance(prompt, str):
            return prompt
        return (await self._one(plan.model, {"op": "detokenize", "tokens": prompt}))["text"]

    async def _complete(self, plan: Plan, prompts: list[Any], info: dict[str, Any], started: float, endpoint: str) -> dict[str, Any]:
        context = int(info["context"])
        calls = [(j, p) for p in prompts for j in range(plan.n)]
        results = await asyncio.gather(*(self._one(plan.model, plan.replica_body(p, j, context)) for j, p in calls))
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, ((j, prompt), result) in enumerate(zip(calls, results)):
            completion = result["completion"]
            if j == 0:
                prompt_tokens += completion["prompt_tokens"]
            completion_tokens += len(completion["tokens"])
            if plan.kind == "completion":
                choices.append(oa.completion_choice(plan, index, completion, await self._prompt_text(plan, prompt, completion)))
            else:
                choices.append(oa.chat_choice(plan, index, completion))
            self.metrics.completion(plan.model, completion, time.perf_counter() - started)
        self.metrics.request(plan.model, endpoint, 200, prompt_tokens, completion_tokens)
        return oa.reply(plan, choices, oa.usage(prompt_tokens, completion_tokens))

    async def _stream(self, plan: Plan, prompts: list[Any], info: dict[str, Any], started: float, endpoint: str) -> AsyncIterator[bytes]:
        """Server-sent events: a chunk per text piece of any choice, then the usage chunk when
        asked, an error chunk if a replica fails mid-stream, and always ``data: [DONE]``."""
        context = int(info["context"])
        calls = [(j, p) for p in prompts for j in range(plan.n)]
        arrivals = self._arrivals(plan, [plan.replica_body(p, j, context) for j, p in calls])
        open_, sent_text = len(calls), [0] * len(calls)
        prompt_tokens = completion_tokens = 0
        first_token_at: float | None = None
        failed: ApiError | None = None
        heads = plan.kind == "chat" or plan.echo  # a first chunk per choice: the role, or the echoed prompt
        pieces = oa.Pieces(plan)
        try:
            while open_ and failed is None:
                ready = await anext(arrivals)
                out: list[bytes] = []
                for index, reply, exc in ready:
                    if exc is not None:
                        open_ -= 1
                        failed = await self._failure(exc, plan.model)
                        if heads is not None and not out:
                            raise failed  # nothing sent yet: the response is this error's status
                        break
                    if reply is None:
                        open_ -= 1
                        continue
                    if heads:
                        out.append(_sse(oa.chunk(plan, [oa.piece_choice(plan, i, await self._prompt_text(plan, p, {}) or "", None, None, first=True)
                                                        for i, (_j, p) in enumerate(calls)])))
                    heads = None
                    if "completion" in reply:
                        completion = reply["completion"]
                        if calls[index][0] == 0:
                            prompt_tokens += completion["prompt_tokens"]
                        completion_tokens += len(completion["tokens"])
                        rest = completion["text"][sent_text[index]:]
                        sent_text[index] = len(completion["text"])
                        finish = oa.FINISH.get(completion["finish_reason"], "stop")
                        out.append(_sse(oa.chunk(plan, [oa.piece_choice(plan, index, rest, None, finish)])))
                        self.metrics.completion(plan.model, completion, None)
                        continue
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                        self.metrics.first_token(plan.model, first_token_at - started)
                    text = reply.get("text", "")
                    sent_text[index] += len(text)
                    if plan.logprobs is None:
                        out.append(pieces(index, text))
                    else:
                        out.append(_sse(oa.chunk(plan, [oa.piece_choice(plan, index, text, reply.get("logprobs"), None)])))
                if out:
                    yield b"".join(out)
            if failed is not None:
                self.metrics.request(plan.model, endpoint, failed.status)
                yield _sse(failed.body())
            else:
                self.metrics.request(plan.model, endpoint, 200, prompt_tokens, completion_tokens)
                if plan.include_usage:
                    yield _sse(oa.chunk(plan, [], oa.usage(prompt_tokens, completion_tokens)))
            yield b"data: [DONE]\n\n"
        finally:
            await arrivals.aclose()  # a client gone mid-stream: leaving each call cancels it at the replica

    async def _arrivals(self, plan: Plan, bodies: list[dict[str, Any]]) -> AsyncIterator[list[tuple[int, Any, BaseException | None]]]:
        """The replies of the calls for ``bodies`` as they arrive, in lists of what is ready at
        once: ``(index, reply, None)``, ``(index, None, None)`` at a call's end, ``(index, None,
        error)`` when it fails. One call is read directly; several through a task each."""
        if len(bodies) == 1:
            try:
                async for reply in self.client.call(plan.model, bodies[0]):
                    yield [(0, reply, None)]
                yield [(0, None, None)]
            except Exception as exc:
                yield [(0, None, exc)]
            return
        queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()

        async def pump(index: int, body: dict[str, Any]) -> None:
            try:
                async for reply in self.client.call(plan.model, body):
                    await queue.put((index, reply, None))
                await queue.put((index, None, None))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await queue.put((index, None, exc))

        tasks = [asyncio.create_task(pump(index, body)) for index, body in enumerate(bodies)]
        try:
            while True:
                ready = [await queue.get()]
                while not queue.empty():  # what arrived meanwhile goes out in one write
                    ready.append(queue.get_nowait())
                yield ready
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task

    # -- the rest --

    async def models(self, request: Request) -> Response:
        try:
            return _json({"object": "list", "data": await self._models()})
        except Exception as exc:
            return _error(await self._failure(exc, None))

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        try:
            found = next((m for m in await self._models() if m["id"] == name), None)
        except Exception as exc:
            return _error(await self._failure(exc, None))
        if found is None:
            return _error(await self._failure(ServiceUnavailable(f"no service named {name!r}"), name))
        return _json(found)

    async def _only_model(self, given: Any) -> str:
        """The model a tokenizer request means: the one named, or the only one served."""
        if isinstance(given, str) and given:
            return given
        served = await self._models()
        if len(served) == 1:
            return served[0]["id"]
        raise oa.bad("model", f"the name of a served model ({', '.join(m['id'] for m in served) or 'none is served'})", given)

    async def tokenize(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            if not isinstance(body, dict):
                raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
            model = await self._only_model(body.get("model"))
            info = await self.info(model)
            if "messages" in body:
                plan = oa.chat_plan({**body, "model": model})
                text = (await self._prompts(plan, info))[0]
            else:
                text = body.get("prompt")
                if not isinstance(text, str):
                    raise oa.bad("prompt", "a string (or give messages)", text)
            tokens = (await self._one(model, {"op": "tokenize", "text": text}))["tokens"]
            return _json({"count": len(tokens), "max_model_len": info["context"], "tokens": tokens})
        except Exception as exc:
            return _error(await self._failure(exc, None))

    async def detokenize(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            if not isinstance(body, dict):
                raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
            model = await self._only_model(body.get("model"))
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(type(t) is int and t >= 0 for t in tokens):
                raise oa.bad("tokens", "a list of token ids (integers >= 0)", tokens)
            return _json({"prompt": (await self._one(model, {"op": "detokenize", "tokens": tokens}))["text"]})
        except Exception as exc:
            return _error(await self._failure(exc, None))

    async def tokenizer_info(self, request: Request) -> Response:
        try:
            model = await self._only_model(request.query_params.get("model"))
            info = await self.info(model)
            return _json({
                "model": model, "tokenizer_class": info.get("tokenizer_class"), "vocab_size": info.get("vocab_size"),
                "eos_token": info.get("eos_token"), "eos_token_id": info.get("eos_token_id"), "bos_token": info.get("bos_token"),
                "model_max_length": info["context"], "chat_template": info.get("chat_template"),
            })
        except Exception as exc:
            return _error(await self._failure(exc, None))

    async def health(self, request: Request) -> Response:
        """200 once a replica of the model (``?model=``, else any) answers; 503 before."""
        want = request.query_params.get("model")
        try:
            served = [m["id"] for m in await self._models()]
        except Exception as exc:
            return _error(await self._failure(exc, None))
        ready = want in served if want else bool(served)
        if not ready:
            what = f"model {want!r}" if want else "any model"
            return _error(ApiError(503, f"no replica of {what} is ready yet (serving: {', '.join(served) or 'none'})", code="not_ready"))
        return _json({"status": "ok", "models": served})

    async def version(self, request: Request) -> Response:
        return _json({"version": llmos.__version__, "server": "llmos"})

    async def prometheus(self, request: Request) -> Response:
        try:
            for m in await self._models():
                with contextlib.suppress(ApiError):
                    info = await self.info(m["id"], fresh=True)
                    self.metrics.queue(m["id"], info.get("waiting", 0), info.get("running", 0))
        except Exception as exc:
            return _error(await self._failure(exc, None))
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for item in rest:
        yield item
