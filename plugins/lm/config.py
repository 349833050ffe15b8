"""Llama-family model shapes: the config (Hugging Face field names) and named presets.

Torch-free, so the kernel can validate a ``train`` job's preset or config at submit time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class LlamaConfig:
    """The shape of a Llama-style decoder, with the field names of ``config.json``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    #: The width of one attention head. Default hidden_size // num_attention_heads; explicit once
    #: heads are pruned: structured pruning keeps head_dim and drops heads, so the query width
    #: num_attention_heads * head_dim is then narrower than hidden_size (transformers honours an
    #: explicit head_dim too).
    head_dim: int | None = None

    def __post_init__(self) -> None:
        h, n = self.hidden_size, self.num_attention_heads
        # Filled in only where the default is defined; otherwise validate() says what is wrong.
        if self.head_dim is None and _positive_int(h) and _positive_int(n):
            object.__setattr__(self, "head_dim", h // n)

    def validate(self) -> LlamaConfig:
        """ValueError naming what is wrong with the shape."""
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model config: {f} must be a positive integer, got {value!r}")
        # Also with an explicit head_dim: transformers (5.x) refuses a Llama config otherwise.
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model config: num_attention_heads ({self.num_attention_heads}) must divide hidden_size ({self.hidden_size})"
            )
        if not _positive_int(self.head_dim):
            raise ValueError(f"model config: head_dim must be a positive integer, got {self.head_dim!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model config: num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"model config: the head size ({self.head_dim}) must be even for rotary embeddings")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError("model config: rms_norm_eps and rope_theta must be positive")
        return self

    def num_parameters(self) -> int:
        """How many weights a model of this shape has."""
        h, v, i, n = self.hidden_size, self.vocab_size, self.intermediate_size, self.num_hidden_layers
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        per_layer = h * q * 2 + h * kv * 2 + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + n * per_layer + h

    def to_hf_dict(self) -> dict[str, Any]:
        """``config.json`` as transformers writes it for ``LlamaForCausalLM``."""
        out = asdict(self)
        out.update(
            model_type="llama",
            architectures=["LlamaForCausalLM"],
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            head_dim=self.head_dim,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            torch_dtype="float32",
        )
        return out

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> LlamaConfig:
        """Read a Llama-family ``config.json`` (unknown keys are ignored, unsupported ones refused)."""
        if data.get("model_type") not in ("llama", None):
            raise ValueError(f"config.json: model_type {data.get('model_type')!r} is not llama")
        if data.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {data.get('hidden_act')!r} is not supported (silu only)")
        if data.get("attention_bias") or data.get("mlp_bias"):
            raise ValueError("config.json: attention or MLP biases are not supported")
        rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
        if rope and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"config.json: rope type {rope.get('rope_type')!r} is not supported (default only)")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "rope_theta" not in values and rope.get("rope_theta"):
            values["rope_theta"] = rope["rope_theta"]
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = values["eos_token_id"][0]
        values.setdefault("num_key_value_heads", values.get("num_attention_heads"))
        return cls(**values).validate()


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


#: Named shapes. Small ones for tests and this machine; the big ones are the shapes of common models.
#: Parameter counts depend on the vocabulary: nano is under 1M with vocabularies up to 6k; micro
#: is about 10M with a 10k vocabulary (5.8M with the default 2,048-token BPE); small is about 125M
#: with a 32k vocabulary, as GPT-2 small and Llama tokenizers have (79M with 2,048 tokens).
#: micro's and small's widths are multiples of 128, so int4 in groups of 32, 64 or 128 fits every
#: layer (nano's MLP width, 176, takes none of them).
PRESETS: dict[str, dict[str, Any]] = {
    "nano": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "micro": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024),
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
}


def config_from_preset(name: str, vocab_size: int, **overrides: Any) -> LlamaConfig:
    """The preset's shape with this vocabulary; ValueError listing the presets for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return LlamaConfig(vocab_size=vocab_size, **{**PRESETS[name], **overrides}).validate()


def config_from_dict(data: dict[str, Any], vocab_size: int | None = None) -> LlamaConfig:
    """A full config given as a job parameter (Hugging Face names); vocab_size may come from the tokenizer."""
    known = {f.name for f in fields(LlamaConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"model config: unknown field {unknown[0]!r}; known fields: {', '.join(sorted(known))}")
    values = dict(data)
    if vocab_size is not None:
        values.setdefault("vocab_size", vocab_size)
    values.setdefault("num_key_value_heads", values.get("num_attention_heads"))
    missing = [f for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") if f not in values]
    if missing:
        raise ValueError(f"model config: missing {', '.join(missing)}")
    return LlamaConfig(**values).validate()
