"""The ``serve`` service: one model held in a worker, answering generation requests routed by
the kernel, with continuous batching: new requests join the running batch at the next step,
finished ones leave it, within ``max_seqs`` concurrent sequences; past that, requests wait in a
queue of ``max_queue``; past that, they get a "busy" error."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import llmos
from llmos.errors import ServiceBusy, ServiceError, ValidationError
from llmos.plugins.lm.checkpoint import load_checkpoint
from llmos.plugins.lm.engine import Engine, Sampling
from llmos.plugins.lm.text import load_tokenizer
from llmos.plugins.lm.train import pick_device, set_threads

SAMPLING_KEYS = {"max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop", "stop_tokens"}


def service_name(model: str, name: str | None) -> str:
    return name or Path(model).resolve().name


class ServeRunner(llmos.Runner):
    def setup(self, ctx: llmos.JobContext) -> None:
        p = ctx.params
        set_threads(ctx, p.threads)
        device = pick_device(ctx)
        model, _ = load_checkpoint(p.model, device=device)
        self.engine = Engine(model, load_tokenizer(p.model), dtype=p.dtype, device=device)
        self.cache = self.engine.new_cache(p.max_seqs, p.max_len)
        self.name = service_name(p.model, p.name)

    def _parse(self, body: dict[str, Any]) -> tuple[str, Sampling, bool]:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError("a generation request needs 'prompt' (a string)")
        sampling = dict(body.get("sampling") or {})
        unknown = set(sampling) - SAMPLING_KEYS
        if unknown:
            raise ValueError(f"unknown sampling option {sorted(unknown)[0]!r}; known: {', '.join(sorted(SAMPLING_KEYS))}")
        for key in ("stop", "stop_tokens"):
            if key in sampling:
                sampling[key] = tuple(sampling[key])
        try:
            s = Sampling(**sampling).validate()
        except TypeError as exc:
            raise ValueError(f"bad sampling options: {exc}") from None
        return prompt, s, bool(body.get("stream", False))

    def run(self, ctx: llmos.JobContext) -> dict[str, Any]:
        p, engine, cache = ctx.params, self.engine, self.cache
        ctx.register_service(self.name)
        ctx.log.info("serving", service=self.name, max_seqs=p.max_seqs, max_queue=p.max_queue, max_len=cache.length)
        waiting: collections.deque[tuple[str, str, Sampling, bool]] = collections.deque()
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
                try:
                    prompt, sampling, stream = self._parse(call.body)
                    engine.encode(prompt)  # too long for the context: refused now, not mid-batch
                    if len(engine.encode(prompt)) + 1 > cache.length:
                        raise ValueError(f"the prompt is {len(engine.encode(prompt))} tokens; this service holds {cache.length} per sequence")
                except ValueError as exc:
                    ctx.respond(call.request_id, error=str(exc), code=ValidationError.code)
                else:
                    if len(waiting) >= p.max_queue + len(free):
                        ctx.respond(call.request_id, error=f"service {self.name!r} is busy: {p.max_seqs} sequences running and {len(waiting)} waiting; try again", code=ServiceBusy.code)
                    else:
                        waiting.append((call.request_id, prompt, sampling, stream))
                call = ctx.next_request(timeout=0)
            # Callers that went away free their place.
            for slot, (request_id, _seq, _s) in list(active.items()):
                if ctx.request_cancelled(request_id):
                    del active[slot]
                    free.append(slot)
            waiting = collections.deque(w for w in waiting if not ctx.request_cancelled(w[0]))
            # Join: new requests take free slots at this step.
            while free and waiting:
                request_id, prompt, sampling, stream = waiting.popleft()
                free.sort()
                slot = free.pop(0)  # the lowest free slot: active slots stay contiguous (cache views)
                seq = engine.start(prompt, sampling, slot)
                try:
                    engine.prefill(seq, cache, piece_sender(request_id, stream))
                except Exception as exc:
                    ctx.respond(request_id, error=f"generation failed: {exc}", code=ServiceError.code)
                    free.append(slot)
                    continue
                active[slot] = (request_id, seq, stream)
            # One decode step for the whole batch; then the finished leave.
            if active:
                seqs = [seq for _, seq, _ in active.values()]
                senders = {seq.slot: piece_sender(rid, stream) for rid, seq, stream in active.values()}
                engine.decode(seqs, cache, lambda slot, token, text, senders=senders: senders[slot](slot, token, text))
                for slot, (request_id, seq, _stream) in list(active.items()):
                    if seq.finish is not None:
                        ctx.respond(request_id, {"completion": engine.completion(seq).to_dict()}, done=True)
                        del active[slot]
                        free.append(slot)
                        served += 1
        # Stopping: whatever is still in flight fails cleanly at its caller.
        for request_id, _seq, _s in active.values():
            ctx.respond(request_id, error=f"service {self.name!r} is stopping", code=ServiceError.code)
        for request_id, *_ in waiting:
            ctx.respond(request_id, error=f"service {self.name!r} is stopping", code=ServiceError.code)
        return {"served": served}
