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
    """

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": self.tokens, "finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens, "timings": self.timings}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Completion:
        return cls(
            text=data["text"], tokens=list(data["tokens"]), finish_reason=data["finish_reason"],
            prompt_tokens=int(data.get("prompt_tokens", 0)), timings=dict(data.get("timings", {})),
        )


__all__ = ["Completion"]
