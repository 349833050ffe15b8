"""The ``serve`` service: one model held in a worker, answering generation requests routed by
the kernel, with continuous batching: new requests join the running batch at the next step,
finished ones leave it, within ``max_seqs`` concurrent sequences; past that, requests wait in a
queue of ``max_queue``; past that, they get a "busy" error. A request that cannot be served
(bad options, a failure while generating) fails at its own caller: the service keeps running.
Stopping the service (cancel) fails what is running or waiting with an "is stopping" error.

A request body is ``{"prompt": text or token ids, "sampling": {...}, "stream": bool}``, with
``"check_length": true`` to refuse a prompt whose ``max_new_tokens`` would not fit the context
(instead of stopping at it). A stream sends ``{"text", "tokens", "logprobs"}`` pieces (the new
tokens since the last piece, their log-probabilities when asked), then ``{"completion"}``.
``{"op": "info" | "tokenize" | "detokenize"}`` bodies are answered at once, outside the batch:
what an HTTP gateway needs (the context length, the chat template, the tokenizer)."""

from __future__ import annotations

import collections
import dataclasses
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llmos
from llmos.errors import ServiceBusy, ServiceError, ValidationError
from llmos.plugins.lm.checkpoint import read_chat_template
from llmos.plugins.lm.engine import Engine, Sampling
from llmos.plugins.lm.runtime import load_for_job, pick_device, set_threads, tokenizer_beside
from llmos.units import format_size, parse_size

SAMPLING_KEYS = frozenset(f.name for f in dataclasses.fields(Sampling))
REQUEST_KEYS = frozenset({"prompt", "sampling", "stream", "check_length"})


def service_name(model: str, name: str | None) -> str:
    return name or Path(model).resolve().name


@dataclass
class _Request:
    """A request taken in and checked, waiting for a slot."""

    request_id: str
    prompt: list[int]
    sampling: Sampling
    stream: bool
    arrived: float  # time.perf_counter() when the replica took it in: its timings count from here


class _Batch:
    """What a serving replica holds between steps: the requests waiting, the sequences running
    (a KV-cache slot each) and the free slots. One loop turn: admit, drop the cancelled, join,
    one decode step for everyone."""

    def __init__(self, runner: ServeRunner, ctx: llmos.JobContext) -> None:
        self.runner, self.ctx = runner, ctx
        self.engine, self.cache = runner.engine, runner.cache
        self.max_queue = ctx.params.max_queue
        self.max_seqs = ctx.params.max_seqs
        self.waiting: collections.deque[_Request] = collections.deque()
        self.active: dict[int, tuple[str, Any, Any]] = {}  # slot -> (request id, sequence, its sender)
        self.free = list(range(self.max_seqs))
        self.served = 0

    def _sender(self, request_id: str, stream: bool, seq: Any) -> Any:
        """What the engine calls with each text piece of ``seq``: sent on with the tokens since
        the last piece (and their log-probabilities), when the caller streams."""
        respond, sent = self.ctx.respond, 0

        def send(_slot: int, _token: int, text: str) -> None:
            nonlocal sent
            if not stream:
                return
            body: dict[str, Any] = {"text": text, "tokens": seq.out[sent:]}
            if seq.sampling.logprobs is not None:
                body["logprobs"] = seq.logprobs[sent:]
            sent = len(seq.out)
            respond(request_id, body, done=False)

        return send

    def admit(self) -> None:
        """Take in everything that arrived (refusing what does not fit in the queue); sleep
        briefly only when there is nothing to do."""
        ctx = self.ctx
        call = ctx.next_request(timeout=0.05 if not self.active and not self.waiting else 0)
        while call is not None:
            request = self.runner._take(ctx, call)  # None: refused, and its caller told why
            if request is not None and len(self.waiting) >= self.max_queue + len(self.free):
                ctx.respond(
                    call.request_id,
                    error=f"service {self.runner.name!r} is busy: {self.max_seqs} sequences running and {len(self.waiting)} waiting; try again",
                    code=ServiceBusy.code,
                )
            elif request is not None:
                self.waiting.append(request)
            call = ctx.next_request(timeout=0)

    def drop_cancelled(self) -> None:
        """Callers that went away free their place."""
        cancelled = self.ctx.request_cancelled
        for slot, (request_id, _seq, _s) in list(self.active.items()):
            if cancelled(request_id):
                del self.active[slot]
                self.free.append(slot)
        self.waiting = collections.deque(w for w in self.waiting if not cancelled(w.request_id))

    def join(self) -> None:
        """New requests take free slots at this step (prefilled now, decoded with the batch)."""
        while self.free and self.waiting:
            request = self.waiting.popleft()
            self.free.sort()
            slot = self.free.pop(0)  # the lowest free slot: active slots stay contiguous (cache views)
            try:
                seq = self.engine.start(request.prompt, request.sampling, slot, arrived=request.arrived)
                send = self._sender(request.request_id, request.stream, seq)
                self.engine.prefill(seq, self.cache, send)
            except Exception as exc:
                self.runner._failed(self.ctx, request.request_id, exc)
                self.free.append(slot)
                continue
            if seq.finish is not None:  # nothing to decode (max_new_tokens=0: the prompt scored only)
                self.ctx.respond(request.request_id, {"completion": self.engine.completion(seq).to_dict()}, done=True)
                self.free.append(slot)
                self.served += 1
                continue
            self.active[slot] = (request.request_id, seq, send)

    def step(self) -> None:
        """One decode step for the whole batch; then the finished leave."""
        if not self.active:
            return
        seqs = [seq for _, seq, _ in self.active.values()]
        active = self.active
        try:
            self.engine.decode(seqs, self.cache, lambda slot, token, text: active[slot][2](slot, token, text))
        except Exception as exc:
            # One step serves the whole batch: its sequences fail together, the service goes on.
            for request_id, _seq, _s in self.active.values():
                self.runner._failed(self.ctx, request_id, exc)
            self.free.extend(self.active)
            self.active.clear()
            return
        for slot, (request_id, seq, _send) in list(self.active.items()):
            if seq.finish is not None:
                self.ctx.respond(request_id, {"completion": self.engine.completion(seq).to_dict()}, done=True)
                del self.active[slot]
                self.free.append(slot)
                self.served += 1

    def stop(self) -> None:
        """Stopping: whatever is in flight, waiting, or not yet taken in fails cleanly at its caller."""
        ctx = self.ctx
        stopping = f"service {self.runner.name!r} is stopping"
        for request_id in [rid for rid, _seq, _s in self.active.values()] + [w.request_id for w in self.waiting]:
            ctx.respond(request_id, error=stopping, code=ServiceError.code)
        while (call := ctx.next_request(timeout=0)) is not None:
            ctx.respond(call.request_id, error=stopping, code=ServiceError.code)


class ServeRunner(llmos.Runner):
    def setup(self, ctx: llmos.JobContext) -> None:
        p = ctx.params
        set_threads(ctx, p.threads)
        device = pick_device(ctx)
        model, _ = load_for_job(ctx, p.model, device)  # through the llmos_load_model hook
        self.engine = Engine(model, tokenizer_beside(p.model), dtype=p.dtype, device=device)
        length = p.max_len
        budget = parse_size(p.kv_memory)
        if budget:
            # A memory budget: as many tokens per sequence (up to max_len) as max_seqs sequences fit in.
            per_token = self.engine.kv_bytes_per_token()
            length = min(length, budget // (p.max_seqs * per_token))
            if length < 2:
                raise ValueError(
                    f"kv_memory {format_size(budget)} holds {length} tokens per sequence for max_seqs={p.max_seqs} "
                    f"({per_token} bytes a token): raise kv_memory or lower max_seqs"
                )
        self.cache = self.engine.new_cache(p.max_seqs, length)
        self.name = service_name(p.model, p.name)
        self.model, self.ctx_params, self.started = p.model, p, int(time.time())
        self.chat_template = read_chat_template(p.model)
        self.batch: _Batch | None = None

    def _parse(self, body: Any) -> tuple[str | list[int], Sampling, bool, bool]:
        """The prompt, sampling, stream and check_length flags of a request body; ValueError says what is wrong."""
        if not isinstance(body, dict):
            raise ValueError("a generation request is a map with 'prompt' and optional 'sampling' and 'stream'")
        unknown = set(body) - REQUEST_KEYS
        if unknown:
            first = sorted(unknown, key=str)[0]
            where = " (a sampling option: put it in 'sampling')" if first in SAMPLING_KEYS else ""
            raise ValueError(f"unknown request field {first!r}{where}; a request has {', '.join(sorted(REQUEST_KEYS))}")
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            vocab = self.engine.model.config.vocab_size
            if not prompt or not all(type(t) is int and 0 <= t < vocab for t in prompt):
                raise ValueError(f"a prompt of token ids must be a non-empty list of integers in [0, {vocab})")
        elif not isinstance(prompt, str):
            raise ValueError("a generation request needs 'prompt' (a string or a list of token ids)")
        sampling = body.get("sampling") or {}
        if not isinstance(sampling, dict):
            raise ValueError(f"'sampling' must be a map of options, got {type(sampling).__name__}")
        unknown = set(sampling) - SAMPLING_KEYS
        if unknown:
            raise ValueError(f"unknown sampling option {sorted(unknown, key=str)[0]!r}; known: {', '.join(sorted(SAMPLING_KEYS))}")
        return prompt, Sampling(**sampling).validate(), bool(body.get("stream", False)), bool(body.get("check_length", False))

    def _take(self, ctx: llmos.JobContext, call: Any) -> _Request | None:
        """The checked request of ``call``, or None once its caller has been told why not (or,
        for an ``op``, answered)."""
        arrived = time.perf_counter()
        try:
            if isinstance(call.body, dict) and "op" in call.body:
                ctx.respond(call.request_id, self._op(call.body), done=True)
                return None
            prompt, sampling, stream, check_length = self._parse(call.body)
            ids = list(prompt) if isinstance(prompt, list) else self.engine.tok.encode(prompt)
            length = self.cache.length
            if check_length and len(ids) + sampling.max_new_tokens > length:
                raise ValueError(
                    f"this model's maximum context length is {length} tokens, but {len(ids) + sampling.max_new_tokens} were asked for "
                    f"({len(ids)} in the prompt and {sampling.max_new_tokens} to generate); shorten the prompt or lower max_tokens"
                )
            if len(ids) + (sampling.max_new_tokens > 0) > length:
                raise ValueError(f"the prompt is {len(ids)} tokens; this service holds {length} per sequence")
            ids = self.engine.encode(ids)  # past the model's own context: refused now, not mid-batch
        except ValueError as exc:
            ctx.respond(call.request_id, error=str(exc), code=ValidationError.code)
            return None
        except Exception as exc:  # whatever a request holds, it fails alone: the service goes on
            self._failed(ctx, call.request_id, exc)
            return None
        return _Request(call.request_id, ids, sampling, stream, arrived)

    def _eos_text(self) -> str | None:
        """The end-of-text token as text (for chat templates): the tokenizer's, else the model's."""
        tk, engine = self.engine.tok.tk, self.engine
        for token in (engine.tok.eos_id, engine.eos):
            text = tk.id_to_token(token) if token is not None else None
            if text is not None:
                return text
        return None

    def _op(self, body: dict[str, Any]) -> dict[str, Any]:
        """Answer an ``op`` request: ``info``, ``tokenize`` (``text``) or ``detokenize`` (``tokens``)."""
        op, engine = body["op"], self.engine
        if op == "info":
            eos = engine.eos
            return {
                "model": self.model, "service": self.name, "context": self.cache.length, "model_context": engine.context,
                "vocab_size": engine.model.config.vocab_size, "eos_token": self._eos_text(),
                "eos_token_id": eos, "bos_token": None, "chat_template": self.chat_template, "max_seqs": self.ctx_params.max_seqs,
                "max_queue": self.ctx_params.max_queue, "tokenizer_class": "PreTrainedTokenizerFast", "created": self.started,
                "running": len(self.batch.active) if self.batch else 0, "waiting": len(self.batch.waiting) if self.batch else 0,
            }
        if op == "tokenize":
            text = body.get("text")
            if not isinstance(text, str):
                raise ValueError("tokenize needs 'text' (a string)")
            return {"tokens": engine.tok.encode(text)}
        if op == "detokenize":
            tokens = body.get("tokens")
            vocab = engine.model.config.vocab_size
            if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < vocab for t in tokens):
                raise ValueError(f"detokenize needs 'tokens' (a list of integers in [0, {vocab}))")
            return {"text": engine.tok.decode(tokens)}
        raise ValueError(f"unknown op {op!r}; expected info, tokenize or detokenize")

    @staticmethod
    def _failed(ctx: llmos.JobContext, request_id: str, exc: Exception) -> None:
        ctx.log.warning("request_failed", request_id=request_id, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        ctx.respond(request_id, error=f"generation failed: {type(exc).__name__}: {exc}", code=ServiceError.code)

    def run(self, ctx: llmos.JobContext) -> dict[str, Any]:
        p, cache = ctx.params, self.cache
        ctx.register_service(self.name, version=str(Path(p.model).resolve()))
        ctx.log.info("serving", service=self.name, max_seqs=p.max_seqs, max_queue=p.max_queue, max_len=cache.length, kv_bytes=cache.k.nbytes + cache.v.nbytes)
        batch = self.batch = _Batch(self, ctx)
        while not ctx.cancelled:
            batch.admit()
            batch.drop_cancelled()
            batch.join()
            with ctx.responding_together():  # one message for the whole step's pieces
                batch.step()
        batch.stop()
        return {"served": batch.served}

