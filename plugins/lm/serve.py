"""The ``serve`` service: one model held in a worker, answering generation requests routed by
the kernel, with continuous batching: new requests join the running batch at the next step,
finished ones leave it, within ``max_seqs`` concurrent sequences; past that, requests wait in a
queue of ``max_queue``; past that, they get a "busy" error. A request that cannot be served
(bad options, a failure while generating) fails at its own caller: the service keeps running.
Stopping the service (cancel) fails what is running or waiting with an "is stopping" error."""

from __future__ import annotations

import collections
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llmos
from llmos.errors import ServiceBusy, ServiceError, ValidationError
from llmos.plugins.lm.engine import Engine, Sampling
from llmos.plugins.lm.runtime import load_for_job, pick_device, set_threads, tokenizer_beside
from llmos.units import format_size, parse_size

SAMPLING_KEYS = {"max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop", "stop_tokens"}


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

    def _parse(self, body: Any) -> tuple[str, Sampling, bool]:
        """The prompt, sampling and stream flag of a request body; ValueError says what is wrong."""
        if not isinstance(body, dict):
            raise ValueError("a generation request is a map with 'prompt' and optional 'sampling' and 'stream'")
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError("a generation request needs 'prompt' (a string)")
        sampling = body.get("sampling") or {}
        if not isinstance(sampling, dict):
            raise ValueError(f"'sampling' must be a map of options, got {type(sampling).__name__}")
        unknown = set(sampling) - SAMPLING_KEYS
        if unknown:
            raise ValueError(f"unknown sampling option {sorted(unknown, key=str)[0]!r}; known: {', '.join(sorted(SAMPLING_KEYS))}")
        return prompt, Sampling(**sampling).validate(), bool(body.get("stream", False))

    def _take(self, ctx: llmos.JobContext, call: Any) -> _Request | None:
        """The checked request of ``call``, or None once its caller has been told why not."""
        arrived = time.perf_counter()
        try:
            prompt, sampling, stream = self._parse(call.body)
            ids = self.engine.encode(prompt)  # too long for the context: refused now, not mid-batch
            if len(ids) + 1 > self.cache.length:
                raise ValueError(f"the prompt is {len(ids)} tokens; this service holds {self.cache.length} per sequence")
        except ValueError as exc:
            ctx.respond(call.request_id, error=str(exc), code=ValidationError.code)
            return None
        except Exception as exc:  # whatever a request holds, it fails alone: the service goes on
            self._failed(ctx, call.request_id, exc)
            return None
        return _Request(call.request_id, ids, sampling, stream, arrived)

    @staticmethod
    def _failed(ctx: llmos.JobContext, request_id: str, exc: Exception) -> None:
        ctx.log.warning("request_failed", request_id=request_id, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        ctx.respond(request_id, error=f"generation failed: {type(exc).__name__}: {exc}", code=ServiceError.code)

    def run(self, ctx: llmos.JobContext) -> dict[str, Any]:
        p, engine, cache = ctx.params, self.engine, self.cache
        ctx.register_service(self.name)
        ctx.log.info("serving", service=self.name, max_seqs=p.max_seqs, max_queue=p.max_queue, max_len=cache.length, kv_bytes=cache.k.nbytes + cache.v.nbytes)
        waiting: collections.deque[_Request] = collections.deque()
        active: dict[int, tuple[str, Any, bool]] = {}  # slot -> (request id, sequence, stream)
        free = list(range(p.max_seqs))
        served = 0

        def piece_sender(request_id: str, stream: bool) -> Any:
            def send(_slot: int, _token: int, text: str) -> None:
                if stream:
                    ctx.respond(request_id, {"text": text}, done=False)

            return send

        while not ctx.cancelled:
            # Take in everything that arrived; sleep only when there is nothing to do.
            call = ctx.next_request(timeout=0.05 if not active and not waiting else 0)
            while call is not None:
                request = self._take(ctx, call)  # None: refused, and its caller told why
                if request is not None and len(waiting) >= p.max_queue + len(free):
                    ctx.respond(call.request_id, error=f"service {self.name!r} is busy: {p.max_seqs} sequences running and {len(waiting)} waiting; try again", code=ServiceBusy.code)
                elif request is not None:
                    waiting.append(request)
                call = ctx.next_request(timeout=0)
            # Callers that went away free their place.
            for slot, (request_id, _seq, _s) in list(active.items()):
                if ctx.request_cancelled(request_id):
                    del active[slot]
                    free.append(slot)
            waiting = collections.deque(w for w in waiting if not ctx.request_cancelled(w.request_id))
            # Join: new requests take free slots at this step.
            while free and waiting:
                request = waiting.popleft()
                free.sort()
                slot = free.pop(0)  # the lowest free slot: active slots stay contiguous (cache views)
                try:
                    seq = engine.start(request.prompt, request.sampling, slot, arrived=request.arrived)
                    engine.prefill(seq, cache, piece_sender(request.request_id, request.stream))
                except Exception as exc:
                    self._failed(ctx, request.request_id, exc)
                    free.append(slot)
                    continue
                active[slot] = (request.request_id, seq, request.stream)
            # One decode step for the whole batch; then the finished leave.
            if active:
                seqs = [seq for _, seq, _ in active.values()]
                senders = {seq.slot: piece_sender(rid, stream) for rid, seq, stream in active.values()}
                try:
                    engine.decode(seqs, cache, lambda slot, token, text, senders=senders: senders[slot](slot, token, text))
                except Exception as exc:
                    # One step serves the whole batch: its sequences fail together, the service goes on.
                    for request_id, _seq, _s in active.values():
                        self._failed(ctx, request_id, exc)
                    free.extend(active)
                    active.clear()
                    continue
                for slot, (request_id, seq, _stream) in list(active.items()):
                    if seq.finish is not None:
                        ctx.respond(request_id, {"completion": engine.completion(seq).to_dict()}, done=True)
                        del active[slot]
                        free.append(slot)
                        served += 1
        # Stopping: whatever is still in flight, waiting, or not yet taken in fails cleanly at its caller.
        stopping = f"service {self.name!r} is stopping"
        for request_id in [rid for rid, _seq, _s in active.values()] + [w.request_id for w in waiting]:
            ctx.respond(request_id, error=stopping, code=ServiceError.code)
        while (call := ctx.next_request(timeout=0)) is not None:
            ctx.respond(call.request_id, error=stopping, code=ServiceError.code)
        return {"served": served}
