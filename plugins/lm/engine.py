"""The inference engine: prefill and batched decode over a slotted KV cache, with sampling.

Every sequence owns a cache slot; a step decodes one token for every active sequence at once,
whatever their lengths (the attention mask keeps each to its own positions). Finished sequences
leave, new ones can join between steps: the engine is built for continuous batching.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from llmos.completion import Completion
from llmos.plugins.lm.kernels import PackedLinear
from llmos.plugins.lm.model import Decoder, KVCache, Llama
from llmos.plugins.lm.text import Tok

MAX_LOGPROBS = 20  # most likely tokens reported per position, at most (as OpenAI's API allows)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. ``temperature=0`` is greedy; a ``seed`` makes sampling repeatable.

    ``stop`` and ``stop_tokens`` may be given as lists (as they arrive in JSON); ``stop`` may be
    one string, which is one stop string (not a set of characters)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_tokens: tuple[int, ...] = ()
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted once per time each token was generated so far
    logprobs: int | None = None  # each generated token's log-probability and this many most likely ones
    prompt_logprobs: int | None = None  # the same for every prompt token (the first has none)

    def __post_init__(self) -> None:
        # Only the containers are normalised here; validate() judges what is inside them.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_tokens, list):
            object.__setattr__(self, "stop_tokens", tuple(self.stop_tokens))

    def validate(self) -> Sampling:
        """Self, if every field has the right type and range; ValueError naming the first that does not."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a whole number at least 0; got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be a number from 0 to 100; got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be a whole number at least 0; got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number above 0 and at most 1; got {self.top_p!r}")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty <= 100:
            raise ValueError(f"repetition_penalty must be a number above 0 and at most 100; got {self.repetition_penalty!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be a whole number from 0 to 2**64 - 1 (or none); got {self.seed!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if "" in self.stop:
            raise ValueError("stop strings must not be empty (an empty one would end every request at once)")
        if not isinstance(self.stop_tokens, tuple) or not all(_is_int(t) and t >= 0 for t in self.stop_tokens):
            raise ValueError(f"stop_tokens must be a list of token ids (integers >= 0), got {self.stop_tokens!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be a number from -2 to 2; got {value!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer between 0 and {MAX_LOGPROBS} or None, got {value!r}")
        return self


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to a caller


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class _Seq:
    prompt: list[int]
    sampling: Sampling
    slot: int
    generator: torch.Generator | None
    started: float  # when the request arrived: ttft and total_s count from here
    admitted: float  # when it got its slot (started + the time it queued)
    out: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    finish: str | None = None
    text: str | None = ""  # None: not decoded since the last token (nobody needed it yet)
    emitted: int = 0  # characters of text already handed to on_token
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # one per token of ``out``, when asked
    prompt_logprobs: list[dict[str, Any]] | None = None
    pending_logprob: dict[str, Any] | None = None  # the picked token's, until it joins ``out``


def sample_next(logits: torch.Tensor, seen: list[int], s: Sampling, gen: torch.Generator | None) -> int:
    """One token from float32 ``logits`` [V] under the sampling settings."""
    if s.repetition_penalty != 1.0 and seen:
        idx = torch.tensor(sorted(set(seen)), dtype=torch.long)
        picked = logits[idx]
        logits[idx] = torch.where(picked > 0, picked / s.repetition_penalty, picked * s.repetition_penalty)
    if s.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        cut = probs.cumsum(-1) - probs > s.top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits[cut] = float("-inf")
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=gen))


def _greedy(s: Sampling) -> bool:
    return s.temperature == 0 and s.repetition_penalty == 1.0 and not s.presence_penalty and not s.frequency_penalty and s.logprobs is None


def _argmax(logits: torch.Tensor) -> list[int]:
    """The first largest entry of each row; NumPy's is vectorised (~3 us for 32k floats on CPU, torch's ~45 us)."""
    if logits.device.type == "cpu":
        return logits.float().numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


class Engine:
    """Generate from a Llama model with a KV cache; ``generate`` runs a batch to completion.

    The engine takes the model over: it is cast and its projections fused in place (one copy of
    the weights; parameter names unchanged). ``dtype="bfloat16"`` on a CPU means bfloat16 weights
    with float32 activations, norms and KV cache (the linear layers become
    :class:`~llmos.plugins.lm.kernels.BF16Linear` views of the decoder's fused bfloat16 weights,
    and the float32 weights are dropped); elsewhere it is bfloat16 throughout.
    """

    def __init__(self, model: Llama, tok: Tok, dtype: str = "float32", device: str | torch.device = "cpu") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.device = torch.device(device)
        self.weights_dtype = DTYPES[dtype]
        packed = any(isinstance(m, PackedLinear) for m in model.modules())
        if packed and self.device.type == "cpu" and self.weights_dtype != torch.float32:
            raise ValueError(f"dtype={dtype}: this model's weights are quantized (packed); on the CPU it runs with float32 activations, so use dtype=float32")
        weight_only = self.weights_dtype == torch.bfloat16 and self.device.type == "cpu"
        self.dtype = torch.float32 if weight_only else self.weights_dtype  # activations and the cache
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.decoder = Decoder(self.model, bf16_weights=weight_only)  # fuses projections in place: one copy of the weights
        self.tok = tok
        self.eos = model.config.eos_token_id if model.config.eos_token_id is not None else tok.eos_id
        self.context = model.config.max_position_embeddings
        self._texts: dict[int, str] = {}

    def encode(self, prompt: str | list[int]) -> list[int]:
        ids = list(prompt) if isinstance(prompt, list) else self.tok.encode(prompt)
        if not ids:
            ids = [self.eos if self.eos is not None else 0]
        if len(ids) >= self.context:
            raise ValueError(f"the prompt is {len(ids)} tokens; the model's context window is {self.context}")
        return ids

    def new_cache(self, slots: int, length: int) -> KVCache:
        """A cache for ``slots`` sequences of up to ``length`` tokens (prompt and completion)."""
        return KVCache(self.model.config, slots, min(length, self.context), self.dtype, self.device)

    def kv_bytes_per_token(self) -> int:
        """Bytes one token of one sequence takes in a cache of this engine (keys and values, every layer)."""
        c = self.model.config
        return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * torch.finfo(self.dtype).bits // 8

    def start(self, prompt: str | list[int], sampling: Sampling, slot: int, arrived: float | None = None) -> _Seq:
        """A sequence for ``prompt`` in cache ``slot`` (not run yet: see :meth:`prefill`).

        ``arrived`` (a ``time.perf_counter()`` reading) is when the request came in, if it waited
        before this call (a service's queue): its timings count from then, not from now."""
        sampling.validate()
        gen = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        now = time.perf_counter()
        return _Seq(prompt=self.encode(prompt), sampling=sampling, slot=slot, generator=gen, started=now if arrived is None else min(arrived, now), admitted=now)

    @torch.inference_mode()
    def prefill(self, seq: _Seq, cache: KVCache, on_token: Any = None) -> None:
        """Run the prompt through the model and pick the first token (with ``prompt_logprobs``,
        score every prompt token on the way; with ``max_new_tokens=0``, only that)."""
        s = seq.sampling
        if s.max_new_tokens == 0 and s.prompt_logprobs is None:
            seq.finish = "length"
            return
        if len(seq.prompt) + (s.max_new_tokens > 0) > cache.length:
            raise ValueError(f"the prompt is {len(seq.prompt)} tokens; this cache holds {cache.length} per sequence")
        scored = s.prompt_logprobs is not None
        logits = self.decoder(torch.tensor([seq.prompt], device=self.device), [0], [seq.slot], cache, last_only=not scored)
        if scored:
            seq.prompt_logprobs = self._prompt_logprobs(seq.prompt, logits[0], s.prompt_logprobs)
        if s.max_new_tokens == 0:
            seq.finish = "length"
            return
        self._accept(seq, self._pick(seq, logits[0, -1]), on_token, cache.length)

    @torch.inference_mode()
    def decode(self, seqs: list[_Seq], cache: KVCache, on_token: Any = None) -> None:
        """One token for every unfinished sequence in ``seqs``, in one batched step."""
        active = sorted((q for q in seqs if q.finish is None), key=lambda q: q.slot)  # contiguous slots read as views
        if not active:
            return
        last = torch.tensor([[q.out[-1]] for q in active], device=self.device)
        logits = self.decoder(last, [len(q.prompt) + len(q.out) - 1 for q in active], [q.slot for q in active], cache)[:, -1]
        if all(_greedy(q.sampling) for q in active):  # one argmax for the batch
            tokens = _argmax(logits)
        else:
            tokens = [self._pick(q, logits[row]) for row, q in enumerate(active)]
        for seq, token in zip(active, tokens):
            self._accept(seq, token, on_token, cache.length)

    def token_text(self, token: int) -> str:
        """One token on its own, as text (a byte of a longer character shows as U+FFFD)."""
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tok.decode([token])
        return text

    def _entry(self, token: int, row: torch.Tensor, k: int) -> dict[str, Any]:
        """``token``'s log-probability under log-softmax ``row``, with the ``k`` most likely."""
        top = []
        if k:
            values, ids = torch.topk(row, k)
            top = [{"token": self.token_text(i), "id": i, "logprob": v} for i, v in zip(ids.tolist(), values.tolist())]
        return {"token": self.token_text(token), "id": token, "logprob": float(row[token]), "top": top}

    def _prompt_logprobs(self, prompt: list[int], logits: torch.Tensor, k: int) -> list[dict[str, Any]]:
        """Each prompt token's log-probability given the tokens before it (none for the first)."""
        rows = torch.log_softmax(logits[:-1].float(), -1)
        out = [{"token": self.token_text(prompt[0]), "id": prompt[0], "logprob": None, "top": None}]
        return out + [self._entry(token, rows[i], k) for i, token in enumerate(prompt[1:])]

    def completion(self, seq: _Seq) -> Completion:
        done = time.perf_counter()
        if seq.text is None:
            seq.text = self.tok.decode(seq.out)
        decode_time = done - (seq.first_token_at or done)
        return Completion(
            text=seq.text,
            tokens=seq.out,
            finish_reason=seq.finish or "length",
            prompt_tokens=len(seq.prompt),
            logprobs=seq.logprobs if seq.sampling.logprobs is not None else None,
            prompt_logprobs=seq.prompt_logprobs,
            timings={
                "ttft_s": (seq.first_token_at or done) - seq.started,
                "total_s": done - seq.started,
                "queue_s": seq.admitted - seq.started,
                "tokens_per_s": (len(seq.out) - 1) / decode_time if len(seq.out) > 1 and decode_time > 0 else 0.0,
            },
        )

    def generate(self, prompts: list[str | list[int]], sampling: Sampling | list[Sampling], on_token: Any = None) -> list[Completion]:
        """Complete every prompt; ``on_token(index, token_id, text_piece)`` sees tokens as they come."""
        samplings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        seqs = [self.start(p, s, i) for i, (p, s) in enumerate(zip(prompts, samplings))]
        length = max(len(q.prompt) + q.sampling.max_new_tokens for q in seqs) + 1
        cache = self.new_cache(len(seqs), length)
        for seq in seqs:  # prompts differ in length: prefill each, then decode all together
            self.prefill(seq, cache, on_token)
        while any(q.finish is None for q in seqs):
            self.decode(seqs, cache, on_token)
        return [self.completion(q) for q in seqs]

    def _pick(self, seq: _Seq, logits: torch.Tensor) -> int:
        """The next token of ``seq`` from its raw ``logits`` (which may be changed in place).

        Log-probabilities, when asked, are the model's own (before penalties and temperature), as
        OpenAI's API and vLLM report them."""
        s = seq.sampling
        logits = logits.float()
        if s.logprobs is not None:
            row = torch.log_softmax(logits, -1)
        if (s.presence_penalty or s.frequency_penalty) and seq.out:
            ids, counts = torch.unique(torch.tensor(seq.out, device=logits.device), return_counts=True)
            logits[ids] -= s.frequency_penalty * counts.to(logits.dtype) + s.presence_penalty
        token = sample_next(logits, seq.prompt + seq.out if s.repetition_penalty != 1.0 else [], s, seq.generator)
        if s.logprobs is not None:
            seq.pending_logprob = self._entry(token, row, s.logprobs)
        return token

    def _accept(self, seq: _Seq, token: int, on_token: Any, cache_length: int) -> None:
        s = seq.sampling
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        if token in s.stop_tokens:
            self._finish(seq, "stop", token, on_token)
            return
        if self.eos is not None and token == self.eos:
            self._finish(seq, "eos", token, on_token)
            return
        seq.out.append(token)
        if seq.pending_logprob is not None:
            seq.logprobs.append(seq.pending_logprob)
            seq.pending_logprob = None
        if not on_token and not s.stop:  # nobody reads the text before the end: decode it then
            seq.text = None
        else:
            self._text_step(seq, token, on_token)
        total = len(seq.prompt) + len(seq.out)
        if seq.finish is None and (len(seq.out) >= s.max_new_tokens or total >= min(self.context, cache_length)):
            self._finish(seq, "length", token, on_token)

    def _text_step(self, seq: _Seq, token: int, on_token: Any) -> None:
        """Decode the text so far: stop strings, and pieces for ``on_token``.

        What goes to ``on_token`` is always a prefix of the Completion's text: a tail that could be
        the start of a stop string is held until the next tokens show it is not (or the sequence
        ends), since the Completion cuts a stop string off."""
        text = self.tok.decode(seq.out)
        for stop in seq.sampling.stop:
            at = text.find(stop)
            if at != -1:
                seq.text = text[:at]
                self._finish(seq, "stop", token, on_token)
                return
        seq.text = text
        # A character split across tokens decodes as U+FFFD until its last byte arrives: hold it.
        if not on_token or text.endswith("\ufffd"):
            return
        end = len(text) - _stop_prefix_at_end(text, seq.sampling.stop, seq.emitted)
        if end > seq.emitted:
            on_token(seq.slot, token, text[seq.emitted : end])
            seq.emitted = end

    @staticmethod
    def _finish(seq: _Seq, reason: str, token: int, on_token: Any) -> None:
        """End the sequence; whatever text was held back goes out now."""
        seq.finish = reason
        if seq.text is None:  # nobody streams it: completion() decodes it
            return
        if on_token and len(seq.text) > seq.emitted:
            on_token(seq.slot, token, seq.text[seq.emitted :])
        seq.emitted = len(seq.text)


def _stop_prefix_at_end(text: str, stops: tuple[str, ...], start: int) -> int:
    """The length of the longest end of ``text[start:]`` that begins some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text) - start), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
