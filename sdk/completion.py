"""What a text generation returns (torch-free, so the SDK can hand it out)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Completion:
    """One finished generation.

    ``text``: the generated text (stop strings cut off); ``tokens``: the generated token ids;
    ``finish_reason``: ``"length"`` (max_new_tokens or the context window), ``"stop"`` (a stop
    string or stop token) or ``"eos"`` (end of sequence); ``timings``: ``ttft_s`` (time to the
    first token), ``tokens_per_s`` (decode rate), ``total_s``, and ``queue_s`` (time waiting for a
    slot; from a service, all of them count from the request's arrival at the replica).

    ``logprobs`` (when asked for): one entry per generated token, ``{"token", "id", "logprob",
    "top"}`` with ``top`` the most likely tokens at that position (``[{"token", "id",
    "logprob"}]``); ``prompt_logprobs`` the same for the prompt's tokens, the first with
    ``logprob`` and ``top`` None.
    """

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    logprobs: list[dict[str, Any]] | None = None
    prompt_logprobs: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"text": self.text, "tokens": self.tokens, "finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens, "timings": self.timings}
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        if self.prompt_logprobs is not None:
            out["prompt_logprobs"] = self.prompt_logprobs
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Completion:
        return cls(
            text=data["text"], tokens=list(data["tokens"]), finish_reason=data["finish_reason"],
            prompt_tokens=int(data.get("prompt_tokens", 0)), timings=dict(data.get("timings", {})),
            logprobs=data.get("logprobs"), prompt_logprobs=data.get("prompt_logprobs"),
        )


__all__ = ["Completion"]
